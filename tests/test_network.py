"""Guest networking with real kernel networking: bridge, isolated and passt groups.

The session runs in a network namespace of its own (conftest); the "outside world" is one more
namespace made here, joined by a veth, serving HTTP on 198.51.100.10 and .11 and DNS on .10
(documentation addresses). No traffic leaves these namespaces.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import Daemon

pytestmark = pytest.mark.vm

UP_A, UP_B, HOST_UP = "198.51.100.10", "198.51.100.11", "198.51.100.1"
METADATA = "169.254.169.254"  # a cloud's instance metadata, served here by the upstream namespace

GROUPS = [  # (name, boot, network): every group small, DNS at the test's upstream
    ("br", "snapshot", "{}"),
    ("iso", "snapshot", "{mode: isolated, drop: [198.51.100.11/32]}"),
    # Slicer's proxy lock-down form: everything dropped but one port of one address (and metadata)
    ("isoa", "cold", f"{{mode: isolated, drop: [0.0.0.0/0], allow: ['198.51.100.11:80', {METADATA}/32]}}"),
    ("pst", "cold", "{mode: passt}"),
]
CONFIG = "config:\n  host_groups:\n" + "".join(
    f"  - {{name: {name}, count: 0, vcpu: 1, ram_mb: 384, storage_size: 2G, boot: {boot}, "
    f"dns_servers: [198.51.100.10], network: {net}}}\n" for name, boot, net in GROUPS
) + "  api:\n    bind_address: 127.0.0.1\n    port: PORT\n"


def sh(*cmd: str, check: bool = True) -> str:
    return subprocess.run(cmd, check=check, capture_output=True, text=True).stdout


class Upstream:
    """A namespace standing for the internet: HTTP on two addresses, DNS for upstream.test."""

    def __init__(self) -> None:
        self.ns = f"slt-up-{os.getpid()}"
        self.dir = Path(tempfile.mkdtemp(prefix="slt-up-"))
        (self.dir / "index.html").write_text("upstream-ok\n")
        sh("ip", "netns", "add", self.ns)
        sh("ip", "link", "add", "sltup0", "type", "veth", "peer", "name", "eth0", "netns", self.ns)
        sh("ip", "addr", "add", f"{HOST_UP}/24", "dev", "sltup0")
        sh("ip", "link", "set", "sltup0", "up")
        for cmd in (f"addr add {UP_A}/24 dev eth0", f"addr add {UP_B}/24 dev eth0", f"addr add {METADATA}/32 dev eth0",
                    "link set eth0 up",
                    "link set lo up", f"route add default via {HOST_UP}"):
            sh("ip", "-n", self.ns, *cmd.split())
        sh("ip", "route", "replace", "default", "via", UP_A)  # passt needs a default route to pick its interface
        sh("ip", "route", "replace", f"{METADATA}/32", "via", UP_A)  # as a cloud host routes it
        ns_exec = ["ip", "netns", "exec", self.ns]
        self.http_log = open(self.dir / "http.log", "wb")
        self.procs = [
            *(subprocess.Popen([*ns_exec, sys.executable, "-m", "http.server", port, "--directory", str(self.dir)],
                               stdout=self.http_log, stderr=self.http_log) for port in ("80", "8080")),
            subprocess.Popen([*ns_exec, "dnsmasq", "--no-daemon", "--no-resolv", "--no-hosts", "--bind-interfaces",
                              f"--listen-address={UP_A}", f"--address=/upstream.test/{UP_B}", "--user=root"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        ]
        time.sleep(1)

    def clients(self) -> str:
        return (self.dir / "http.log").read_text(errors="replace")

    def close(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()
        sh("ip", "route", "del", "default", check=False)
        sh("ip", "route", "del", f"{METADATA}/32", check=False)
        sh("ip", "netns", "del", self.ns, check=False)
        self.http_log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class HostService:
    """A TCP service of the host's (on every address), answering 'host-ok'."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("0.0.0.0", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    conn.recv(100)  # the probe's request, then the answer
                    conn.sendall(b"host-ok\n")
                except OSError:
                    pass


@pytest.fixture(scope="module")
def net(guest_image):
    up = Upstream()
    d = Daemon(CONFIG).start()
    host = HostService()
    yield d, up, host
    d.cleanup()
    host.sock.close()
    up.close()


@pytest.fixture(scope="module")
def vms(net):
    d, _, _ = net
    # a VM of "iso" with its own policy, the opposite of its group's: only UP_B (the group drops UP_B)
    wanted = {"br": [{}, {}], "iso": [{}, {}], "isoa": [{}], "pst": [{}], "iso-own": [{"network": OWN_POLICY}]}

    def create(key: str) -> list[dict]:  # one group's VMs one after another (the first builds its template)
        with d.client() as c:
            made = []
            for body in wanted[key]:
                r = c.post(f"/hostgroup/{key.split('-')[0]}/nodes?wait=agent&timeout=300s", json=body,
                           timeout=330)  # past the daemon's own: its answer, not ours, says what failed
                assert r.status_code == 201, r.text
                made.append(r.json())
            return made

    order = ["br", "iso", "isoa", "pst"]  # the groups side by side; iso-own once iso has its template
    try:
        with concurrent.futures.ThreadPoolExecutor(len(order)) as pool:
            made = dict(zip(order, pool.map(create, order), strict=True))
        made["iso-own"] = create("iso-own")
    except BaseException:
        print(d.log(tail=30000))  # the daemon's last words: its data dir goes with the module's fixture
        raise
    return made


OWN_POLICY = {"allow": ["198.51.100.11/32"], "drop": []}


def guest(d: Daemon, vm: str, script: str) -> str:
    with d.client() as c:
        r = c.post(f"/vm/{vm}/exec", params={"cmd": "bash", "args": ["-c", script], "buffered": "true"})
    assert r.status_code == 200, r.text
    return r.json()["stdout"]


PROBE = ("probe() { timeout 6 bash -c \"exec 3<>/dev/tcp/$1/$2 && printf 'GET / HTTP/1.0\\r\\n\\r\\n' >&3 "
         "&& head -c 400 <&3\" 2>/dev/null || echo closed; }; ")


def probe(d: Daemon, vm: str, ip: str, port: int) -> str:
    return probe_all(d, [(vm, ip, port)])[0]


def probe_all(d: Daemon, targets: list[tuple[str, str, int]]) -> list[str]:
    """``probe`` for every (vm, ip, port) at once: one exec per VM runs its probes in parallel,
    and the VMs' execs run side by side (a dropped one waits out its 6 s; run one by one, those
    waits were most of this file's time). The answers come back in the order asked."""
    by_vm: dict[str, list[int]] = {}
    for i, (vm, _, _) in enumerate(targets):
        by_vm.setdefault(vm, []).append(i)

    def batch(vm: str) -> list[str]:
        script = PROBE + "d=$(mktemp -d); " + " ".join(
            f"probe {targets[i][1]} {targets[i][2]} > $d/{n} & " for n, i in enumerate(by_vm[vm]))
        script += "wait; " + " ".join(f"cat $d/{n}; echo '@@END@@'; " for n in range(len(by_vm[vm]))) + "rm -rf $d"
        answers = guest(d, vm, script).split("@@END@@\n")[:-1]
        assert len(answers) == len(by_vm[vm]), answers
        return [a.strip() for a in answers]

    found: list[str] = [""] * len(targets)
    with concurrent.futures.ThreadPoolExecutor(len(by_vm)) as pool:
        for vm, answers in zip(by_vm, pool.map(batch, by_vm), strict=True):
            for i, answer in zip(by_vm[vm], answers, strict=True):
                found[i] = answer
    return found


def test_bridge_vms_reach_each_other_the_host_and_the_outside(net, vms):
    d, up, host = net
    (b1, b2) = vms["br"]
    assert "SSH-2.0" in probe(d, b1["hostname"], b2["ip"], 22)  # VM to VM
    gw = guest(d, b1["hostname"], "ip route show default").split()[2]
    assert "host-ok" in probe(d, b1["hostname"], gw, host.port)  # the host, at the group's gateway
    assert "upstream-ok" in probe(d, b1["hostname"], UP_A, 80)  # egress through NAT
    assert f"{HOST_UP} " in up.clients() and b1["ip"] not in up.clients()  # masqueraded
    with socket.create_connection((b2["ip"], 22), timeout=10) as s:  # host to VM, at the ip /nodes reports
        assert s.recv(7) == b"SSH-2.0"
    view = next(n for n in d.client().get("/nodes").json() if n["hostname"] == b1["hostname"])
    assert view["ip"] == b1["ip"]
    assert guest(d, b1["hostname"], "ip -4 -o addr show eth0").split()[3].split("/")[0] == b1["ip"]


def test_no_guest_reaches_host_loopback_services(net, vms):
    """The API listens on 127.0.0.1: reachable from no guest, whatever address it tries."""
    d, _, _ = net
    targets = []
    for group in ("br", "iso", "pst"):
        vm = vms[group][0]["hostname"]
        gw = guest(d, vm, "ip route show default").split()[2]
        targets += [(vm, target, d.port) for target in (gw, "127.0.0.1", HOST_UP)]
    for target, answer in zip(targets, probe_all(d, targets), strict=True):
        assert "closed" in answer and "status" not in answer, (target, answer)


def test_no_guest_reaches_cloud_metadata_or_the_hosts_other_addresses(net, vms):
    """169.254.169.254 (on a cloud host: the instance's credentials) and the host's addresses but
    the gateway are closed in every mode; an isolated group's ``allow`` can open the former."""
    d, up, host = net
    targets = []
    for group in ("br", "iso", "pst"):
        vm = vms[group][0]["hostname"]
        # the host, on an address of its own; then egress itself, which still works
        targets += [(vm, METADATA, 80), (vm, HOST_UP, host.port), (vm, UP_A, 80)]
    answers = probe_all(d, targets + [(vms["isoa"][0]["hostname"], METADATA, 80)])
    for n in range(3):
        assert answers[3 * n:3 * n + 2] == ["closed", "closed"], (targets[3 * n], answers)
        assert "upstream-ok" in answers[3 * n + 2], (targets[3 * n], answers)
    assert "upstream-ok" in answers[-1]  # allow opens it


UDP_SEND = ("python3 -c \"import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
            "s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1); "
            "[s.sendto(b'from-guest', (a, int(sys.argv[1]))) for a in sys.argv[2:]]\" ")


def test_a_bridge_vm_reaches_no_host_service_by_broadcast(net, vms):
    """A UDP service of the host's bound to 0.0.0.0 would answer a bridge VM's broadcasts and
    multicasts: they are dropped; the gateway itself is reachable (Slicer's rule)."""
    d, _, _ = net
    vm = vms["br"][0]["hostname"]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", 0))
    sock.settimeout(3)
    port = sock.getsockname()[1]
    try:
        gw = guest(d, vm, "ip route show default").split()[2]
        own = guest(d, vm, "ip -4 -o addr show eth0").split()[3]
        subnet_broadcast = ipaddress.ip_interface(own).network.broadcast_address
        guest(d, vm, UDP_SEND + f"{port} 255.255.255.255 {subnet_broadcast} 224.0.0.251 {HOST_UP}")
        with pytest.raises(TimeoutError):
            print(sock.recvfrom(100))
        guest(d, vm, UDP_SEND + f"{port} {gw}")
        assert sock.recvfrom(100)[0] == b"from-guest"
    finally:
        sock.close()


def test_isolated_vms_reach_only_what_they_may(net, vms):
    d, _, host = net
    (i1, i2), (a1,) = vms["iso"], vms["isoa"]
    vm, only = i1["hostname"], a1["hostname"]
    (a_80, a_8080, b_80, to_i2, to_br, to_host, only_b_80, only_b_8080, only_a_80) = probe_all(d, [
        (vm, UP_A, 80), (vm, UP_A, 8080), (vm, UP_B, 80), (vm, i2["ip"], 22), (vm, vms["br"][0]["ip"], 22),
        (vm, HOST_UP, host.port), (only, UP_B, 80), (only, UP_B, 8080), (only, UP_A, 80)])
    assert "upstream-ok" in a_80  # neither rule: allowed
    assert "upstream-ok" in a_8080  # the upstream answers on its second port too
    assert b_80 == "closed"  # drop
    assert to_i2 == "closed"  # no VM to VM
    assert to_br == "closed"  # not even a bridge group's VM
    assert to_host == "closed"  # not the host
    assert UP_B in guest(d, vm, "getent hosts upstream.test")  # DNS works
    assert i1["ip"] != i2["ip"] and guest(d, vm, "ip -4 -o addr show eth0").split()[3].endswith("/30")
    assert "upstream-ok" in only_b_80  # allow: UP_B's port 80
    assert only_b_8080 == "closed"  # not its other ports
    assert only_a_80 == "closed"  # everything else blocked
    assert UP_B in guest(d, only, "getent hosts upstream.test")  # but DNS still passes


def test_a_vm_with_a_policy_of_its_own(net, vms):
    """create's ``network`` (the Go SDK's SlicerCreateNodeNetworkPolicy) replaces the group's lists
    for that VM only; fork of a commit takes one too (the SDK's cold-fork example: ``allow: []``)."""
    d, _, _ = net
    own, sibling = vms["iso-own"][0]["hostname"], vms["iso"][0]["hostname"]
    own_b, own_a, sibling_b = probe_all(d, [(own, UP_B, 80), (own, UP_A, 80), (sibling, UP_B, 80)])
    assert "upstream-ok" in own_b  # its own allow, though the group drops UP_B
    assert own_a == "closed"  # its allow list blocks the rest
    assert UP_B in guest(d, own, "getent hosts upstream.test")  # DNS still passes
    assert sibling_b == "closed"  # the group's other VMs keep the group's rules
    with d.client() as c:
        network = c.get(f"/vm/{own}").json()["network"]
        assert network == {"mode": "isolated", "policy_source": "vm", "override": OWN_POLICY,
                           "host_group": {"allow": [], "drop": ["198.51.100.11/32"]},
                           "effective": {"allow": ["198.51.100.11/32"], "drop": []}}, network
        assert c.get(f"/vm/{sibling}").json()["network"]["policy_source"] == "host_group"
        for group, body, words in (("br", {"network": {"allow": []}}, "apply to isolated host groups"),
                                   ("iso", {"network": {"allow": ["nope"]}}, "is not an IPv4 address"),
                                   ("iso", {"network": {"allow": ["2001:db8::/32"]}}, "is not IPv4"),
                                   ("iso", {"network": {"deny": []}}, "deny")):
            r = c.post(f"/hostgroup/{group}/nodes", json=body)
            assert r.status_code == 400 and words in r.json()["error"], (body, r.text)
        # a commit of a stopped persistent VM of "isoa" (UP_B:80 only), forked with empty lists
        # (timeout=0s and a JSON body's action, as the TypeScript SDK sends them)
        r = c.post("/hostgroup/isoa/nodes?wait=agent&timeout=0s", json={"persistent": True})
        assert r.status_code == 201, r.text
        src = r.json()["hostname"]
        child = cid = None
        try:
            assert c.post(f"/vm/{src}/shutdown", json={"action": "shutdown"}).status_code == 200
            deadline = time.monotonic() + 120
            while c.get(f"/vm/{src}").json()["status"] != "Stopped" and time.monotonic() < deadline:
                time.sleep(0.3)
            r = c.post(f"/vm/{src}/commit")
            assert r.status_code == 200, r.text
            cid = r.json()["commit_id"]
            r = c.post(f"/vm/commits/{cid}/fork", params={"wait": "agent", "timeout": "5m"},
                       json={"network": {"allow": [], "drop": []}, "hostname": "own-child"})
            assert r.status_code == 200, r.text
            child = r.json()["hostname"]
            assert child == r.json()["child_hostname"] == "own-child" and r.json()["persistent"] is True
            assert c.get(f"/vm/{child}").json()["network"]["effective"] == {"allow": [], "drop": []}
            assert "upstream-ok" in probe(d, child, UP_A, 80)  # the group would block it
        finally:
            for h in (child, src):
                if h:
                    c.delete(f"/hostgroup/isoa/nodes/{h}")
            if cid:
                c.delete(f"/vm/commits/{cid}")


def test_passt_group_has_egress(net, vms):
    d, _, _ = net
    (p1,) = vms["pst"]
    assert "upstream-ok" in probe(d, p1["hostname"], UP_A, 80)
    assert json.loads(d.client().get("/info").text)["network"]["pst"]["mode"] == "passt"


@pytest.mark.parametrize("group", ["br", "iso"])
def test_spoofed_addresses_get_nothing_through(net, vms, group):
    d, _, host = net
    vm, other = vms[group][1], vms[group][0]
    target = (other["ip"], 22) if group == "br" else (UP_A, 80)
    answer = "SSH-2.0" if group == "br" else "upstream-ok"
    prefix = guest(d, vm["hostname"], "ip -4 -o addr show eth0").split()[3].split("/")[1]
    gw = guest(d, vm["hostname"], "ip route show default").split()[2]
    # bridge: an address nobody has, talking to a neighbour; isolated: another VM's address
    fake_ip = other["ip"].rsplit(".", 1)[0] + ".250" if group == "br" else vms["isoa"][0]["ip"]
    restore = f"ip addr flush dev eth0; ip addr add {vm['ip']}/{prefix} dev eth0; ip route replace default via {gw}"
    spoof_ip = (f"ip addr flush dev eth0; ip addr add {fake_ip}/{prefix} dev eth0; "
                f"ip route replace default via {gw}; " + PROBE + f"probe {target[0]} {target[1]}; " + restore)
    assert answer not in guest(d, vm["hostname"], spoof_ip)
    other_mac = "02:5c:" + ":".join(f"{int(b):02x}" for b in other["ip"].split("."))
    spoof_mac = (f"ip link set eth0 address {other_mac}; " + PROBE + f"probe {target[0]} {target[1]}; "
                 f"ip link set eth0 address {guest(d, vm['hostname'], 'cat /sys/class/net/eth0/address').strip()}")
    assert answer not in guest(d, vm["hostname"], spoof_mac)
    assert answer in probe(d, vm["hostname"], *target)  # itself again, it gets through


def _ours(tag: str) -> dict:
    links = [line.split(":")[1].strip().split("@")[0] for line in sh("ip", "-o", "link").splitlines()]
    links = [name for name in links if tag in name]
    tables = [t for t in sh("nft", "list", "tables").splitlines() if f"slicer_{tag}" in t]
    netns = [n for n in sh("ip", "netns", "list").split() if f"slicer-{tag}-" in n]
    return {"links": links, "tables": tables, "netns": netns}


def test_restart_after_sigkill_adopts_every_vm_and_stop_removes_everything(net, vms):
    d, _, host = net
    tag = d.client().get("/info").json()["network"]["br"]["bridge"][2:6]
    before = _ours(tag)
    assert len(before["tables"]) == 2 and len(before["netns"]) == 4 and f"sb{tag}br" in before["links"]
    every = [vm["hostname"] for group in vms.values() for vm in group]
    pids = {h: d.client().get(f"/vm/{h}").json()["vmm"]["pid"] for h in every}
    d.stop(signal.SIGKILL)
    d.start()  # a new daemon on the same data dir: the VMs are adopted, nothing is duplicated
    after = _ours(tag)
    assert sorted(after["netns"]) == sorted(before["netns"]) and len(after["tables"]) == 2
    assert sorted(after["links"]) == sorted(before["links"])
    with d.client() as c:
        for h in every:
            view = c.get(f"/vm/{h}").json()
            assert view["boot"] == "adopted" and view["vmm"]["pid"] == pids[h], view
    # Every mode's link works as before, its rules included.
    (b1, b2), (i1, _), (a1,), (p1,) = vms["br"], vms["iso"], vms["isoa"], vms["pst"]
    b1, i1, a1, p1 = b1["hostname"], i1["hostname"], a1["hostname"], p1["hostname"]
    own = vms["iso-own"][0]["hostname"]  # its own policy too
    gw = guest(d, b1, "ip route show default").split()[2]
    answers = probe_all(d, [(b1, b2["ip"], 22), (b1, gw, host.port), (b1, METADATA, 80), (i1, UP_A, 80),
                            (i1, UP_B, 80), (a1, UP_A, 80), (a1, UP_B, 80), (p1, UP_A, 80), (own, UP_B, 80),
                            (own, UP_A, 80)])
    for answer, expected in zip(answers, ("SSH-2.0", "host-ok", "closed", "upstream-ok", "closed", "closed",
                                          "upstream-ok", "upstream-ok", "upstream-ok", "closed"), strict=True):
        assert answer == "closed" if expected == "closed" else expected in answer, answers
    with d.client() as c:
        r = c.post("/hostgroup/iso/nodes?wait=agent&timeout=300s", json={})
        assert r.status_code == 201, r.text
        assert "upstream-ok" in probe(d, r.json()["hostname"], UP_A, 80)
        assert len(_ours(tag)["netns"]) == 5
        assert c.delete(f"/hostgroup/iso/nodes/{r.json()['hostname']}").status_code == 200
        assert len(_ours(tag)["netns"]) == 4
    assert d.stop() == 0
    assert _ours(tag) == {"links": [], "tables": [], "netns": []}
