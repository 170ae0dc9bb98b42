"""Defence in depth (issue 22): each test makes an attack as the attacker would, on real VMs,
and checks it fails with nothing changed on the host."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from slicer.net.backends import held_tap
from slicer.vmm.jail import VMM_GID, sweep_uid
from tests.conftest import Daemon, qemu_pids

pytestmark = pytest.mark.vm
FAKE_SECONDS = 15

NO_AUTH_CONFIG = """
config:
  host_groups:
  - name: sbx
    count: 0
    vcpu: 1
    ram_mb: 256
    storage_size: 1G
  api:
    bind_address: 127.0.0.1
    port: PORT
    allowed_hosts: [slicer.test]
    auth:
      enabled: false
"""


@pytest.fixture(scope="module")
def open_daemon(guest_image):
    d = Daemon(NO_AUTH_CONFIG).start()
    yield d
    d.cleanup()


def test_a_rebound_name_reaches_nothing(open_daemon):
    """A page on rebind.example, its name rebound to 127.0.0.1, sends its own Host and Origin:
    with auth off (allowed on loopback) it would drive the API. Refused, nothing made."""
    rebound = {"Host": f"rebind.example:{open_daemon.port}", "Origin": f"http://rebind.example:{open_daemon.port}"}
    with httpx.Client(base_url=open_daemon.url) as c:
        r = c.post("/secrets", json={"name": "planted", "data": "eA=="}, headers=rebound)
        assert r.status_code == 403 and r.json()["code"] == "host_not_allowed", r.text
        assert "allowed_hosts" in r.json()["error"]
        r = c.get("/nodes", headers={"Host": "rebind.example"})
        assert r.status_code == 403 and r.json()["code"] == "host_not_allowed"
        assert c.get("/hostgroup", headers={"Host": "localhost.rebind.example"}).status_code == 403
        # what the API's own names look like still works
        for host in (f"127.0.0.1:{open_daemon.port}", f"localhost:{open_daemon.port}", "slicer.test", "[::1]"):
            assert c.get("/nodes", headers={"Host": host}).status_code == 200, host
        assert all(s["name"] != "planted" for s in c.get("/secrets").json())
    assert not (open_daemon.data_dir / "secrets" / "planted").exists()
    upgrade = {"Host": "rebind.example", "Connection": "Upgrade", "Upgrade": "websocket",
               "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    with httpx.Client(base_url=open_daemon.url) as c:
        assert c.get("/vm/sbx-1/shell", headers=upgrade).status_code == 403
        upgrade["Host"] = "localhost"
        assert c.get("/vm/sbx-1/shell", headers=upgrade).status_code == 404  # it got through: no such VM


def test_a_token_file_for_curl(daemon):
    """The daemon writes the header curl reads with ``-H @file``: the token stays off argv."""
    header = daemon.data_dir / "auth" / "curl-header"
    assert header.stat().st_mode & 0o777 == 0o600
    assert header.read_text() == f"Authorization: Bearer {daemon.token}\n"


FAKE_AGENT = textwrap.dedent('''
    import http.server, json, os, socketserver, sys, threading, time, urllib.parse
    PATH = "/run/slicer/agent.sock"
    os.rename(PATH, PATH + ".real")
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            path = urllib.parse.unquote(self.path)
            status = int(path.rsplit("=", 1)[-1]) if "status=" in path else 200
            code = {401: "unauthorized", 403: "forbidden", 404: "not_found"}.get(status, "internal")
            body = json.dumps({"error": "pwned\\x1b[31m" + "A" * 5000, "code": code}).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a):
            pass
    class S(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
        daemon_threads = True
    srv = S(PATH, H)
    os.chmod(PATH, 0o600)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    print("ready", flush=True)
    time.sleep(float(sys.argv[1]))
    srv.shutdown()
    os.unlink(PATH)
    os.rename(PATH + ".real", PATH)
''')


def test_a_guest_cannot_choose_the_status(api):
    """Guest root replaces its agent with one answering 401, 403 and 500: the API answers 502
    ``agent_error`` with a bounded, printable message; a request error (404) passes through."""
    r = api.post("/hostgroup/sbx/nodes", json={}, params={"wait": "agent", "timeout": "4m"})
    assert r.status_code == 201, r.text
    vm = r.json()["hostname"]
    try:
        statuses = [401, 403, 500, 418, 404]
        up = api.post(f"/vm/{vm}/cp", params={"path": "/root/fake.py"}, content=FAKE_AGENT.encode(),
                      headers={"content-type": "application/octet-stream"})
        assert up.status_code == 200, up.text
        r = api.post(f"/vm/{vm}/exec", params={
            "cmd": "sh", "buffered": "true",
            "args": ["-c", f"setsid -f python3 /root/fake.py {FAKE_SECONDS} >/root/fake.log 2>&1; "
                           "for i in $(seq 100); do grep -q ready /root/fake.log && exit 0; sleep 0.1; done; exit 1"],
        })
        assert r.status_code == 200 and r.json()["exit_code"] == 0, r.text
        for status in statuses:
            r = api.get(f"/vm/{vm}/fs/stat", params={"path": f"/x?status={status}"})
            body = r.json()
            if status == 404:  # a request error the agent reports
                assert r.status_code == 404 and body["code"] == "not_found", r.text
            else:
                assert r.status_code == 502 and body["code"] == "agent_error", (status, r.text)
                assert f"answered {status}" in body["error"]
            assert "pwned" in body["error"] and "\x1b" not in body["error"] and len(body["error"]) < 1100
        # the real agent is back once the fake steps aside
        deadline = time.monotonic() + FAKE_SECONDS + 60
        while (health := api.get(f"/vm/{vm}/health")).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert health.status_code == 200, health.text
    finally:
        api.delete(f"/hostgroup/sbx/nodes/{vm}")


def _steal_fd(pid: int, target: str) -> int:
    """A copy of the descriptor process ``pid`` holds on ``target`` (pidfd_getfd, as root)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        if os.readlink(entry) == target:
            pidfd = os.pidfd_open(pid)
            try:
                fd = libc.syscall(438, pidfd, int(entry.name), 0)  # SYS_pidfd_getfd
                if fd < 0:
                    raise OSError(ctypes.get_errno(), "pidfd_getfd")
                return fd
            finally:
                os.close(pidfd)
    raise AssertionError(f"process {pid} holds no {target}")


AS_VMM = textwrap.dedent('''
    import fcntl, os, struct, sys
    TUNSETIFF, TUNSETPERSIST, TUNSETOWNER = 0x400454CA, 0x400454CB, 0x400454CC
    mode = sys.argv[1]
    if mode == "persist":  # what an escaped QEMU can do with the TAP it holds
        fd = int(sys.argv[2])
        fcntl.ioctl(fd, TUNSETOWNER, os.getuid())
        fcntl.ioctl(fd, TUNSETPERSIST, 1)
        print("persistent")
    else:  # attach to the TAP by name later, as that uid
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR)  # 0666 on most hosts
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", sys.argv[2].encode(), 0x0002 | 0x1000))
            print("attached")
        except OSError as e:
            print("refused", e.errno)
''')


def _as_uid(uid: int, gid: int, *args: str, pass_fds: tuple[int, ...] = ()) -> str:
    argv = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--inh-caps=-all",
            "--bounding-set=-all", "--", sys.executable, "-c", AS_VMM, *args]
    r = subprocess.run(argv, capture_output=True, text=True, pass_fds=pass_fds, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def _link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", "dev", name], capture_output=True).returncode == 0


def test_a_persistent_tap_does_not_outlive_its_vm(api, daemon):
    """An escaped QEMU (its uid, its TAP descriptor) gives the TAP its own uid as owner and makes
    it persistent: when the VM ends the daemon deletes it, and that uid cannot attach again."""
    r = api.post("/hostgroup/sbx/nodes", json={}, params={"wait": "agent", "timeout": "4m"})
    assert r.status_code == 201, r.text
    vm = r.json()["hostname"]
    try:
        (pid,) = qemu_pids(str(daemon.data_dir / "run" / vm))
        tap = held_tap(pid)
        assert tap is not None
        details = subprocess.run(["ip", "-d", "link", "show", "dev", tap], capture_output=True, text=True).stdout
        assert f"user {os.getuid()}" in details or "user root" in details, details  # owned by the daemon's uid
        uid = os.stat(f"/proc/{pid}").st_uid
        assert uid != 0
        fd = _steal_fd(pid, "/dev/net/tun")
        try:
            assert _as_uid(uid, VMM_GID, "persist", str(fd), pass_fds=(fd,)) == "persistent"
        finally:
            os.close(fd)
    finally:
        assert api.delete(f"/hostgroup/sbx/nodes/{vm}").status_code == 200
    assert not _link_exists(tap), f"{tap} outlived its VM"
    out = _as_uid(uid, VMM_GID, "attach", tap)
    assert out.startswith("refused"), out
    assert not _link_exists(tap)


def test_a_disk_header_does_not_steer_the_daemon(api, daemon, tmp_path):
    """With a persistent VM stopped, its overlay's header is rewritten to name a host file as its
    backing (what an escaped QEMU can do to the disk it holds open): relaunch refuses with a
    clear error, and the host file's owner and mode are untouched."""
    victim = tmp_path / "host-secret"
    victim.write_text("root only\n")
    victim.chmod(0o600)
    before = victim.stat()
    r = api.post("/hostgroup/sbx/nodes", json={"persistent": True}, params={"wait": "agent", "timeout": "4m"})
    assert r.status_code == 201, r.text
    vm = r.json()["hostname"]
    try:
        disk = api.get(f"/vm/{vm}").json()
        r = api.post(f"/vm/{vm}/shutdown", params={"action": "shutdown"})
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 120
        while api.get(f"/vm/{vm}").json()["status"] != "Stopped" and time.monotonic() < deadline:
            time.sleep(0.5)
        disk = next((daemon.data_dir / "disks").glob(f"{vm}.qcow2"))
        subprocess.run(["qemu-img", "rebase", "-u", "-b", str(victim), "-F", "raw", str(disk)], check=True)
        r = api.post(f"/vm/{vm}/relaunch", params={"wait": "agent", "timeout": "2m"})
        assert r.status_code == 409 and r.json()["code"] == "disk_tampered", r.text
        assert str(victim) in r.json()["error"] and "changed outside the daemon" in r.json()["error"]
        after = victim.stat()
        assert (after.st_uid, after.st_gid, after.st_mode) == (before.st_uid, before.st_gid, before.st_mode)
        assert api.get(f"/vm/{vm}").json()["status"] == "Stopped"
        # put back as the daemon made it, it boots again
        base = json.loads((disk.parent / (disk.name + ".backing")).read_text())
        subprocess.run(["qemu-img", "rebase", "-u", "-b", base["path"], "-F", base["format"], str(disk)], check=True)
        r = api.post(f"/vm/{vm}/relaunch", params={"wait": "agent", "timeout": "4m"})
        assert r.status_code == 200, r.text
        # an external data file (qemu-img would write to it as root in a rebase) and a disk turned
        # into a VMDK descriptor naming a host file (a probing qemu-img would open it): refused too
        assert api.post(f"/vm/{vm}/shutdown", params={"action": "shutdown"}).status_code == 200
        deadline = time.monotonic() + 120
        while api.get(f"/vm/{vm}").json()["status"] != "Stopped" and time.monotonic() < deadline:
            time.sleep(0.5)
        saved = disk.read_bytes()
        # the header the daemon made (its backing) plus a data file: made on a scratch file, renamed to the victim
        size = json.loads(subprocess.run(["qemu-img", "info", "-f", "qcow2", "-U", "--output=json", str(disk)],
                                         check=True, capture_output=True, text=True).stdout)["virtual-size"]
        disk.unlink()
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", base["path"], "-F", base["format"],
                        "-o", f"data_file={tmp_path / 'scratch.data'}", str(disk), str(size)], check=True)
        subprocess.run(["qemu-img", "amend", "-f", "qcow2", "-o", f"data_file={victim}", str(disk)], check=True)
        r = api.post(f"/vm/{vm}/relaunch")
        assert r.status_code == 409 and "external data file" in r.json()["error"], r.text
        disk.write_text(f'# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
                        f'createType="monolithicFlat"\nRW 2048 FLAT "{victim}" 0\n')
        r = api.post(f"/vm/{vm}/relaunch")
        assert r.status_code == 409 and "not a qcow2 image" in r.json()["error"], r.text
        assert victim.read_text() == "root only\n"
        after = victim.stat()
        assert (after.st_uid, after.st_gid, after.st_mode) == (before.st_uid, before.st_gid, before.st_mode)
        disk.write_bytes(saved)
    finally:
        api.delete(f"/hostgroup/sbx/nodes/{vm}")


STAND_IN = textwrap.dedent('''
    import json, os, socket, sys
    out = {"root": sorted(os.listdir("/")), "passwd": os.path.exists("/etc/passwd"),
           "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
           "ns": {n: os.readlink(f"/proc/self/ns/{n}") for n in ("mnt", "net", "ipc", "uts")}}
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=3).close()
        out["api"] = "reached"
    except OSError as e:
        out["api"] = e.strerror
    for left in ("/tmp/left", "/dev/shm/left"):  # a setuid copy of a shell, left for the uid's next VM
        with open(left, "wb") as f:
            f.write(open("/usr/bin/sh", "rb").read())
        os.chmod(left, 0o4755)
    for d in ("/var/tmp", "/run/lock", "/root", "/etc", "/usr/bin"):
        try:
            open(d + "/left", "w").close()
            out[d] = "written"
        except OSError as e:
            out[d] = e.errno
    print(json.dumps(out))
''')


def test_an_escaped_qemu_sees_nothing_of_the_host(api, daemon):
    """A stand-in for a QEMU that escaped TCG: a process with the VMM's uid in its namespaces and
    root. It reads no host file, reaches no host service, sees no other process, and what it
    leaves in /tmp and /dev/shm is gone with its VM; the uid is swept before it is given again."""
    r = api.post("/hostgroup/sbx/nodes", json={}, params={"wait": "agent", "timeout": "4m"})
    assert r.status_code == 201, r.text
    vm = r.json()["hostname"]
    try:
        (pid,) = qemu_pids(str(daemon.data_dir / "run" / vm))
        uid = os.stat(f"/proc/{pid}").st_uid
        r = subprocess.run(["nsenter", "-t", str(pid), "-m", "-n", "-i", "-u", "-r", "-w",
                            "setpriv", f"--reuid={uid}", f"--regid={VMM_GID}", "--clear-groups", "--inh-caps=-all",
                            "--bounding-set=-all", "--", "/usr/bin/python3", "-c", STAND_IN, str(daemon.port)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        seen = json.loads(r.stdout)
        assert set(seen["root"]) <= {"bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "proc", "tmp", "dev",
                                     "etc"}, seen["root"]
        assert not seen["passwd"]
        assert daemon.proc.pid not in seen["pids"] and os.getpid() not in seen["pids"] and pid in seen["pids"]
        assert seen["api"] != "reached"
        for name, link in seen["ns"].items():
            assert link != os.readlink(f"/proc/self/ns/{name}"), name
        assert all(seen[d] != "written" for d in ("/var/tmp", "/run/lock", "/root", "/etc", "/usr/bin")), seen
        assert describe_jail(api, vm) == ["mount", "network", "ipc", "uts"]
    finally:
        assert api.delete(f"/hostgroup/sbx/nodes/{vm}").status_code == 200
    for left in ("/tmp/left", "/dev/shm/left"):
        assert not os.path.exists(left), left
    # A uid that once wrote where every uid may (an older daemon's VMM, a host without a jail root)
    # has that swept before the uid is given out again.
    planted = Path("/tmp") / f"slt-left-by-{uid}"
    planted.write_bytes(b"#!/bin/sh\n")
    os.chown(planted, uid, VMM_GID)
    planted.chmod(0o4755)
    assert sweep_uid(uid) == [str(planted)] and not planted.exists()


def describe_jail(api: httpx.Client, vm: str) -> list[str]:
    return api.get("/info").json()["confinement"]["namespaces"]
