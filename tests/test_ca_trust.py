"""CA trust per host group (``ca:``), end to end: one daemon, one small VM.

The group trusts a CA of its own (``generate``) and one made by the test (``files``). In the guest:
/runner/ca.crt holds both, the system store trusts both (bundle, hash links, Python's default
context, curl), a leaf from ``slicer ca issue`` verifies, exec's environment points runtimes at the
bundles, and no byte of the CA's private key is anywhere on the guest's disks.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from slicer.core import ca
from tests.conftest import BOOT_TIMEOUT, Daemon, wait_agent

pytestmark = pytest.mark.vm

CONFIG = """
config:
  host_groups:
  - name: catrust
    count: 1
    vcpu: 1
    ram_mb: 384
    storage_size: 2G
    ca:
      generate: true
      files: [extra-ca.pem]
  api:
    bind_address: 127.0.0.1
    port: PORT
"""
HOST = "catrust-1"


def sh(api: httpx.Client, script: str, stdin: bytes | None = None, env: tuple[str, ...] = ()) -> dict:
    params = [("cmd", script), ("buffered", "true"), *(("env", e) for e in env)]
    if stdin is not None:
        params.append(("stdin", "true"))
    r = api.post(f"/vm/{HOST}/exec", params=params, content=stdin, timeout=600)
    assert r.status_code == 200, r.text
    return r.json()


def ok(api: httpx.Client, script: str, **kw) -> str:
    r = sh(api, script, **kw)
    assert r["exit_code"] == 0, f"{script}: {r}"
    return r["stdout"]


@pytest.fixture(scope="module")
def setup(guest_image):
    extra_dir = Path(tempfile.mkdtemp(prefix="slt-ca-"))
    ca.ensure_group_ca(extra_dir, "corp")  # someone else's CA, given by file
    d = Daemon(CONFIG)
    (d.data_dir / "extra-ca.pem").write_bytes((extra_dir / "ca/corp/ca.crt").read_bytes())
    try:
        d.start()
        api = d.client()
        wait_agent(api, HOST)
        deadline = time.monotonic() + BOOT_TIMEOUT  # the CA is pushed just after the agent answers
        while sh(api, "test -s /runner/ca.crt")["exit_code"] != 0:
            assert time.monotonic() < deadline, d.log()
            time.sleep(0.5)
        yield d, api
    finally:
        d.cleanup()
        subprocess.run(["rm", "-rf", str(extra_dir)], check=False)


def test_the_guest_trusts_the_groups_ca_and_its_files(setup, tmp_path: Path):
    d, api = setup
    assert '[CA] host group "catrust" generated CA: ' in d.log_path.read_text()
    own = (d.data_dir / "ca/catrust/ca.crt").read_text()
    extra = (d.data_dir / "extra-ca.pem").read_text()
    bundle = ok(api, "cat /runner/ca.crt")
    assert bundle == own + extra
    assert ok(api, "stat -c %a /runner/ca.crt").strip() == "644"

    system = ok(api, "cat /etc/ssl/certs/ca-certificates.crt")
    assert system.count("# SLICER_DYNAMIC_CA ") == 2 and own in system and extra in system
    assert system.count("BEGIN CERTIFICATE") > 100, "the public CAs are still there"
    assert len(ok(api, "ls /etc/slicer/ca-trust").split()) == 2
    assert len(ok(api, "ls /usr/local/share/ca-certificates/slicer-*.crt").split()) == 2

    # A leaf the host issues for a service: verified by the system bundle and, through the
    # <hash>.0 links alone, by capath; then a real handshake with Python's default context and curl.
    subprocess.run([sys.executable, "-m", "slicer", "ca", "issue", "--hostgroup", "catrust", "--host", "svc.test",
                    "--host", "127.0.0.1", "--out", str(tmp_path / "leaf"), "--data-dir", str(d.data_dir)],
                   check=True, capture_output=True)
    ok(api, "cat > /tmp/leaf.crt", stdin=(tmp_path / "leaf.crt").read_bytes())
    ok(api, "cat > /tmp/leaf.key", stdin=(tmp_path / "leaf.key").read_bytes())
    assert ok(api, "openssl verify -CAfile /etc/ssl/certs/ca-certificates.crt /tmp/leaf.crt").strip().endswith("OK")
    assert ok(api, "openssl verify -no-CAfile -CApath /etc/ssl/certs /tmp/leaf.crt").strip().endswith("OK")
    names = ok(api, "python3 -c \"import ssl; print([dict(x[0] for x in c['subject']).get('commonName') "
                    "for c in ssl.create_default_context().get_ca_certs()])\"")
    assert "'catrust'" in names and "'corp'" in names
    handshake = """
openssl s_server -quiet -accept 127.0.0.1:8443 -cert /tmp/leaf.crt -key /tmp/leaf.key -www >/dev/null 2>&1 &
server=$!
trap 'kill $server' EXIT
for i in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/8443) 2>/dev/null && break; sleep 0.1; done
python3 - <<'EOF'
import socket, ssl
for ctx in (ssl.create_default_context(), ssl.create_default_context(capath="/etc/ssl/certs")):
    with socket.create_connection(("127.0.0.1", 8443)) as s, ctx.wrap_socket(s, server_hostname="svc.test") as t:
        print("python", t.version())
EOF
curl -sS -o /dev/null -w 'curl %{http_code}\\n' --resolve svc.test:8443:127.0.0.1 https://svc.test:8443/
"""
    out = ok(api, handshake)
    assert out.count("python TLS") == 2 and "curl 200" in out, out


def test_exec_env_points_runtimes_at_the_bundles(setup):
    _, api = setup
    env = dict(line.split("=", 1) for line in ok(api, "env").splitlines() if "=" in line)
    assert env["NODE_EXTRA_CA_CERTS"] == "/runner/ca.crt"
    assert env["SSL_CERT_FILE"] == env["REQUESTS_CA_BUNDLE"] == "/etc/ssl/certs/ca-certificates.crt"
    mine = ok(api, 'echo "$SSL_CERT_FILE $NODE_EXTRA_CA_CERTS"', env=("SSL_CERT_FILE=/mine.pem",)).strip()
    assert mine == "/mine.pem /runner/ca.crt", "the request's own env wins"


def test_the_ca_key_is_nowhere_in_the_guest(setup):
    d, api = setup
    key_lines = (d.data_dir / "ca/catrust/ca.key").read_text().splitlines()[1:-1]
    cert_lines = (d.data_dir / "ca/catrust/ca.crt").read_text().splitlines()[1:-1]
    assert len(key_lines) > 20
    probes = [key_lines[i] for i in (1, len(key_lines) // 2, len(key_lines) - 2)]
    found = sh(api, grep_guest(probes))
    assert found["exit_code"] == 1 and found["stdout"] == "", found
    control = sh(api, grep_guest([cert_lines[5]]))  # the same search finds what is there
    assert control["exit_code"] == 0 and "/runner/ca.crt" in control["stdout"].split(), control


def grep_guest(needles: list[str]) -> str:
    """Files holding any of ``needles``, on every file system but the kernel's views and devices."""
    return ("grep -rlsF -D skip " + " ".join(f"-e {shlex.quote(n)}" for n in needles)
            + " $(ls -d /* | grep -v -x -e /proc -e /sys -e /dev)")
