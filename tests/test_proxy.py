"""Slicer Proxy with real guests: an isolated host group locked down to the proxy, the proxy
(``slicer proxy up``, mitmproxy) on the host, and an HTTPS upstream of the test's own, with its own
CA, in a network namespace made here (203.0.113.0/24, a documentation range). No traffic leaves
these namespaces.

The proxy resolves the upstream's names through an /etc/hosts of the test's, bind-mounted in a
mount namespace of the proxy's own (nothing of the host's is changed).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from slicer.core.ca import ensure_group_ca, issue_leaf
from tests.conftest import Daemon, qemu_pids
from tests.proxy_upstream import auth_digest

pytestmark = pytest.mark.vm

UP, HOST_SIDE, PROXY = "203.0.113.10", "203.0.113.1", "192.168.222.1"
NAMES = ("api.upstream.test", "other.upstream.test", "ttl.upstream.test", "evil.upstream.test")
# names the proxy resolves into networks it must refuse: loopback always, the upper half by --deny-cidr
DENIED = {"loop.upstream.test": "127.0.0.1", "deny.upstream.test": "203.0.113.200"}
SECRET = "sk-proxy-test-4f1c9a7e2b"  # what no guest may ever see
CONFIG = f"""config:
  host_groups:
  - name: px
    count: 0
    vcpu: 1
    ram_mb: 384
    storage_size: 2G
    ca: {{generate: true}}
    network: {{mode: isolated, drop: [0.0.0.0/0], allow: ['{PROXY}:3128', '{PROXY}:3129']}}
  api:
    bind_address: 127.0.0.1
    port: PORT
"""


def sh(*cmd: str, check: bool = True) -> str:
    return subprocess.run(cmd, check=check, capture_output=True, text=True).stdout


class Upstream:
    """The "internet": HTTPS echo on 443 and 8443, plain HTTP on 80, at one address."""

    def __init__(self, work: Path) -> None:
        self.ns = f"slt-px-{os.getpid()}"
        ensure_group_ca(work / "upca", "upstream")
        self.ca = work / "upca" / "ca" / "upstream" / "ca.crt"
        self.cert, self.key = issue_leaf(work / "upca", "upstream", [*NAMES, UP], work / "upstream")
        sh("ip", "netns", "add", self.ns)
        sh("ip", "link", "add", "sltpx0", "type", "veth", "peer", "name", "eth0", "netns", self.ns)
        sh("ip", "addr", "add", f"{HOST_SIDE}/24", "dev", "sltpx0")
        sh("ip", "link", "set", "sltpx0", "up")
        for cmd in (f"addr add {UP}/24 dev eth0", "link set eth0 up", "link set lo up"):
            sh("ip", "-n", self.ns, *cmd.split())
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, sys.executable, "-m", "tests.proxy_upstream", str(self.cert),
             str(self.key), UP, "443", "8443", "80"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        sh("ip", "link", "del", "sltpx0", check=False)
        sh("ip", "netns", "del", self.ns, check=False)


class Proxy:
    """``slicer proxy up`` in a mount namespace whose /etc/hosts names the upstream."""

    def __init__(self, d: Daemon, work: Path, upstream: Upstream, bind: str = PROXY, *options: str) -> None:
        hosts = work / "hosts"
        hosts.write_text("127.0.0.1 localhost\n" + f"{UP} {' '.join(NAMES)}\n"
                         + "".join(f"{ip} {name}\n" for name, ip in DENIED.items()))
        self.log_path = work / f"proxy-{bind}.log"
        script = (f"mount --bind {hosts} /etc/hosts && exec {sys.executable} -m slicer proxy up --hostgroup px "
                  f"--bind {bind} --data-dir {d.data_dir} {' '.join(options)}")
        env = {**os.environ, "SSL_CERT_FILE": str(upstream.ca)}  # the upstream's CA is the host's trust here
        self.proc = subprocess.Popen(["unshare", "-m", "sh", "-c", script], env=env,
                                     stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while "slicer proxy:" not in self.log():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log()
            time.sleep(0.2)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def lab(guest_image):
    work = Path(tempfile.mkdtemp(prefix="slt-px-"))
    upstream = Upstream(work)
    d = Daemon(CONFIG).start()
    proxy = Proxy(d, work, upstream)
    try:
        with d.client() as c:
            r = c.post("/hostgroup/px/nodes?wait=agent&timeout=300s", json={})
            assert r.status_code == 201, r.text
            vm = r.json()["hostname"]
            token = c.post("/proxy/v1/clients", json={"name": "agent"}).json()["token"]
            assert c.post("/proxy/v1/secrets", json={"name": "api", "host": "api.upstream.test",
                                                     "value": SECRET}).status_code == 201
            for rule in ({"host": "api.upstream.test", "secret": "api", "methods": ["GET"], "paths": ["/v1/*"]},
                         {"host": "other.upstream.test", "ports": [8443], "passthrough": True},
                         {"host": "other.upstream.test", "paths": ["/plain/*"]}):
                assert c.post("/proxy/v1/allows", json={"client": "agent", **rule}).status_code == 201
        yield d, vm, token, upstream, proxy, work
    finally:
        proxy.close()
        d.cleanup()
        upstream.close()
        shutil.rmtree(work, ignore_errors=True)


def guest(d: Daemon, vm: str, script: str) -> tuple[int, str, str]:
    with d.client() as c:
        r = c.post(f"/vm/{vm}/exec", params={"cmd": "bash", "args": ["-c", script], "buffered": "true"})
    assert r.status_code == 200, r.text
    doc = r.json()
    return doc["exit_code"], doc["stdout"], doc["stderr"]


def curl(d: Daemon, vm: str, token: str, url: str, *extra: str, proxy: str = "") -> tuple[int, str]:
    """curl in the guest through the proxy; (status or curl's exit code as -N, body)."""
    proxy = proxy or f"http://x:{token}@{PROXY}:3128"
    args = " ".join(f"'{a}'" for a in extra)
    code, out, err = guest(d, vm, f"curl -sS --max-time 20 -o /tmp/body -w '%{{http_code}}' -x '{proxy}' {args} "
                                  f"'{url}'; rc=$?; echo; cat /tmp/body 2>/dev/null; exit $rc")
    status, _, body = out.partition("\n")
    return (int(status) if code == 0 else -code), body if code == 0 else body + err


def test_a_guest_request_gets_the_secret_and_loses_its_own_header(lab):
    d, vm, token, *_ = lab
    status, body = curl(d, vm, token, "https://api.upstream.test/v1/models", "-H", "Authorization: Bearer GUEST-KEY")
    assert status == 200, body
    seen = json.loads(body)
    assert seen["headers"]["Authorization"] == auth_digest(f"Bearer {SECRET}")  # the guest's own went
    assert "Proxy-Authorization" not in seen["headers"] and seen["path"] == "/v1/models"
    # the same through the TLS listener (HTTPS_PROXY=https://…:3129), the proxy's certificate from the group's CA
    status, body = curl(d, vm, token, "https://api.upstream.test/v1/x", proxy=f"https://x:{token}@{PROXY}:3129")
    assert status == 200 and json.loads(body)["headers"]["Authorization"] == auth_digest(f"Bearer {SECRET}"), body
    # the guest trusts the group's CA in its system store and in the environment its commands get
    _, env, _ = guest(d, vm, "echo $SSL_CERT_FILE $REQUESTS_CA_BUNDLE $NODE_EXTRA_CA_CERTS")
    assert env.split() == ["/etc/ssl/certs/ca-certificates.crt"] * 2 + ["/runner/ca.crt"]


def test_filters_refuse_what_they_should(lab):
    d, vm, token, *_ = lab
    assert curl(d, vm, token, "https://api.upstream.test/v1/x", "-X", "POST")[0] == 403  # method
    assert curl(d, vm, token, "https://api.upstream.test/admin")[0] == 403  # path
    assert curl(d, vm, token, "https://api.upstream.test/v1/../admin", "--path-as-is")[0] == 403  # dot segments
    assert curl(d, vm, token, "https://evil.upstream.test/v1/x")[0] == -56  # host: CONNECT refused (403)
    assert curl(d, vm, token, "https://api.upstream.test:8443/v1/x")[0] == -56  # port: no ports means 80/443
    assert curl(d, vm, token, "https://api.upstream.test/v1/x", "-H", "Host: evil.upstream.test")[0] == 403
    status, body = curl(d, vm, "wrong-token", "https://api.upstream.test/v1/x")
    assert status == -56 and "407" in body
    assert curl(d, vm, token, "http://other.upstream.test/plain/x")[0] == 200  # plain HTTP, token per request
    assert curl(d, vm, "wrong-token", "http://other.upstream.test/plain/x")[0] == 407
    with d.client() as c:  # a TTL ends a rule
        assert c.post("/proxy/v1/allows", json={"client": "agent", "host": "ttl.upstream.test",
                                                "ttl_seconds": 3}).status_code == 201
        assert curl(d, vm, token, "https://ttl.upstream.test/a")[0] == 200
        time.sleep(3.5)
        assert curl(d, vm, token, "https://ttl.upstream.test/a")[0] == -56


def test_revoke_and_secret_deletion_stop_matching(lab):
    d, vm, token, *_ = lab
    with d.client() as c:
        assert c.post("/proxy/v1/secrets", json={"name": "tmp", "host": "evil.upstream.test", "type": "basic",
                                                 "value": "u:p"}).status_code == 201
        rule = {"client": "agent", "host": "evil.upstream.test", "secret": "tmp", "paths": ["/r/*"]}
        assert c.post("/proxy/v1/allows", json=rule).status_code == 201
        status, body = curl(d, vm, token, "https://evil.upstream.test/r/1")
        basic = "Basic " + base64.b64encode(b"u:p").decode()
        assert status == 200 and json.loads(body)["headers"]["Authorization"] == auth_digest(basic)
        assert c.delete("/proxy/v1/secrets/tmp").status_code == 204
        assert curl(d, vm, token, "https://evil.upstream.test/r/1")[0] == -56  # never a plain allow
        assert c.post("/proxy/v1/allows", json={"client": "agent", "host": "evil.upstream.test",
                                                "paths": ["/q/*"]}).status_code == 201
        assert curl(d, vm, token, "https://evil.upstream.test/q/1")[0] == 200
        r = c.post("/proxy/v1/allows/revoke", json={"client": "agent", "host": "evil.upstream.test", "paths": ["/q/*"]})
        assert r.status_code == 204
        assert curl(d, vm, token, "https://evil.upstream.test/q/1")[0] == -56


def test_passthrough_shows_the_upstreams_own_certificate(lab):
    d, vm, token, upstream, *_ = lab
    with d.client() as c:
        assert c.post(f"/vm/{vm}/cp", params={"path": "/tmp/upstream-ca.crt"},
                      content=upstream.ca.read_bytes(),
                      headers={"Content-Type": "application/octet-stream"}).status_code in (200, 201, 204)
    # only the upstream's CA: the TLS the guest sees is the upstream's, not one the proxy minted
    status, body = curl(d, vm, token, "https://other.upstream.test:8443/p", "--cacert", "/tmp/upstream-ca.crt")
    assert status == 200 and json.loads(body)["port"] == 8443
    assert curl(d, vm, token, "https://other.upstream.test:8443/p")[0] == -60  # the system store lacks that CA


def test_an_isolated_guest_reaches_the_upstream_only_through_the_proxy(lab):
    d, vm, token, *_ = lab
    code, _, _ = guest(d, vm, f"curl -sS --max-time 5 -k https://{UP}/ >/dev/null")
    assert code != 0  # straight out: dropped
    code, _, _ = guest(d, vm, f"curl -sS --max-time 5 http://{PROXY}:{d.port}/healthz >/dev/null")
    assert code != 0  # the host's other ports, even at the proxy's address: closed
    assert curl(d, vm, token, "https://api.upstream.test/v1/ok")[0] == 200


def test_no_secret_value_in_the_guests_disk_environment_or_memory(lab):
    d, vm, token, *_ = lab
    assert curl(d, vm, token, "https://api.upstream.test/v1/mem")[0] == 200  # the secret just went by
    code, out, err = guest(d, vm, f"grep -rIl --exclude-dir=proc --exclude-dir=sys -F '{SECRET}' / 2>/dev/null; "
                                  f"cat /proc/*/environ 2>/dev/null | grep -c -F '{SECRET}'")
    assert out.strip().splitlines() == ["0"], out + err
    (pid,) = qemu_pids(str(d.data_dir / "run" / vm))
    memfds = [p for p in Path(f"/proc/{pid}/fd").iterdir() if os.readlink(p).startswith("/memfd:slicer:")]
    assert memfds
    needle, carry, scanned = SECRET.encode(), b"", 0
    with open(memfds[0], "rb") as ram:  # all of the guest's RAM, read from the host
        while chunk := ram.read(8 << 20):
            assert needle not in carry + chunk
            carry, scanned = chunk[-len(needle):], scanned + len(chunk)
    assert scanned >= 384 << 20


def test_audit_lines_and_the_audit_route_record_every_decision(lab):
    d, vm, token, _, proxy, _ = lab
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 1))
    curl(d, vm, token, "https://api.upstream.test/v1/audited")
    curl(d, vm, token, "https://api.upstream.test/not-audited")
    curl(d, vm, "bad-token-1", "https://api.upstream.test/v1/x")
    with d.client() as c:
        entries = c.get("/proxy/v1/audit", params={"since": since}).json()
        time.sleep(1.5)  # the proxy leaves its counts for /metrics once a second
        metrics = c.get("/metrics").text
    got = [(e["msg"], e.get("path"), e.get("status"), e.get("reason")) for e in entries]
    assert ("allow", "/v1/audited", 200, None) in got
    assert ("deny", "/not-audited", 403, "path-not-allowed") in got
    assert ("deny", None, 407, "bad-token") in got
    allow = next(e for e in entries if e.get("path") == "/v1/audited")
    assert allow["client"] == "agent" and allow["inject"] == "api" and allow["host"] == "api.upstream.test"
    assert SECRET not in json.dumps(entries)
    log = proxy.log()
    assert "msg=allow client=agent method=GET scheme=https host=api.upstream.test port=443 path=/v1/audited " \
           "inject=api status=200" in log and SECRET not in log
    assert 'slicer_proxy_decisions_total{client="agent",decision="allow"}' in metrics


def host_curl(d: Daemon, token: str, url: str, proxy_address: str) -> tuple[int, str]:
    """curl from the host (the test's namespace) through a proxy, trusting the group's CA."""
    ca = d.data_dir / "ca" / "px" / "ca.crt"
    r = subprocess.run(["curl", "-sS", "--max-time", "20", "--cacert", str(ca), "-o", "/dev/null", "-w", "%{http_code}",
                        "-x", f"http://x:{token}@{proxy_address}:3128", url], capture_output=True, text=True)
    return (int(r.stdout) if r.returncode == 0 else -r.returncode), r.stderr


def test_denied_networks_hold_after_dns_and_audit_mode_refuses_what_no_rule_names(lab):
    """A second proxy, on the host side: --mode audit and --deny-cidr (the first proxy's guests are
    covered above; these need no VM)."""
    d, _, token, upstream, _, work = lab
    second = "192.168.222.2"
    with d.client() as c:
        for name in DENIED:
            assert c.post("/proxy/v1/allows", json={"client": "agent", "host": name}).status_code == 201
    audit_proxy = Proxy(d, work, upstream, second, "--mode", "audit", "--deny-cidr", "203.0.113.128/25")
    try:
        for name in DENIED:  # a rule allows it, DNS points into a denied network: refused
            status, err = host_curl(d, token, f"https://{name}/x", second)
            assert status == -56 and "502" in err, (name, status, err)
        assert host_curl(d, token, "https://api.upstream.test/v1/fine", second)[0] == 200
        # audit mode: no rule names this host, so it is intercepted, its request logged and refused
        with d.client() as c:
            assert c.delete("/proxy/v1/allows/agent/evil.upstream.test").status_code in (204, 404)
        assert host_curl(d, token, "https://evil.upstream.test/what/was/asked", second)[0] == 403
        time.sleep(0.5)
        log = audit_proxy.log()
        assert ("msg=deny client=agent method=GET scheme=https host=evil.upstream.test port=443 "
                "path=/what/was/asked status=403 mode=audit reason=no-rule") in log
        for name in DENIED:
            assert f"msg=deny client=agent host={name} port=443 status=403 reason=denied-network" in log
    finally:
        audit_proxy.close()


def tunnel_bytes(token: str, payload: bytes, target: str = "api.upstream.test:443") -> tuple[bytes, bytes]:
    """CONNECT through the proxy from the host, then raw bytes: (the CONNECT's answer, what follows)."""
    auth = base64.b64encode(f"x:{token}".encode()).decode()
    with socket.create_connection((PROXY, 3128), timeout=10) as s:
        s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: Basic {auth}\r\n\r\n".encode())
        head = s.recv(200)
        s.sendall(payload)
        try:
            rest = s.recv(400)
        except (TimeoutError, ConnectionResetError):
            rest = b""
    return head, rest


def test_what_a_hostile_client_tries_is_refused(lab):
    """The review's attacks, from the host side: a malformed token, raw TCP or a fronted request
    in an intercepted tunnel, a fronted plain-HTTP request, a secret over plain HTTP."""
    d, _, token, *_ = lab
    weird = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-x", f"http://{PROXY}:3128",
                            "-H", "Proxy-Authorization: Basic \u00e9", "http://other.upstream.test/plain/x"],
                           capture_output=True, text=True)
    assert weird.stdout == "407", weird
    # not TLS, not quite HTTP: parsed as HTTP or dropped, never relayed raw past the filters
    head, rest = tunnel_bytes(token, b"\r\nDELETE /admin HTTP/1.1\r\nHost: api.upstream.test\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and (rest == b"" or rest.startswith(b"HTTP/1.1 4")), rest
    assert b'"method"' not in rest  # the upstream's echo never came back
    head, rest = tunnel_bytes(token, b"GET https://evil.upstream.test/v1/x HTTP/1.1\r\nHost: api.upstream.test\r\n\r\n")
    assert b"403" in rest.split(b"\r\n")[0], rest  # an absolute URI naming another host
    head, rest = tunnel_bytes(token, b"SSH-2.0-OpenSSH_9.2\r\n")  # not TLS, not HTTP: never relayed raw
    assert b"upstream" not in rest and not rest.startswith(b"SSH"), rest
    fronted = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-x",
                              f"http://x:{token}@{PROXY}:3128", "-H", "Host: evil.upstream.test",
                              "http://other.upstream.test/plain/x"], capture_output=True, text=True)
    assert fronted.stdout == "403", fronted
    with d.client() as c:  # a secret's rule on plain HTTP: refused rather than sent in the clear
        assert c.post("/proxy/v1/allows", json={"client": "agent", "host": "api.upstream.test", "secret": "api",
                                                "paths": ["/clear/*"]}).status_code == 201
    clear = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-x",
                            f"http://x:{token}@{PROXY}:3128", "http://api.upstream.test/clear/x"],
                           capture_output=True, text=True)
    assert clear.stdout == "403", clear
    with d.client() as c:
        entries = c.get("/proxy/v1/audit", params={"limit": 50}).json()
    reasons = {e.get("reason") for e in entries}
    assert {"host-mismatch", "secret-needs-tls", "bad-token"} <= reasons, reasons
