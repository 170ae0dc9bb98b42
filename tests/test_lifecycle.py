"""The daemon's own lifecycle: stop, restart, persistent services, unix-socket API."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import sqlite3
import stat
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import Daemon, qemu_pids, ticker, wait_agent

pytestmark = pytest.mark.vm

PERSISTENT_CONFIG = """
config:
  host_groups:
  - name: svc
    count: 1
    vcpu: 1
    ram_mb: 384
    storage_size: 2G
    persistent: true
  api:
    bind_address: 127.0.0.1
    port: PORT
"""


@pytest.fixture(scope="module")
def persistent_daemon(guest_image):
    """A daemon with the persistent service svc-1, shared by the tests that stop and restart it
    (each leaves it running with svc-1 alone, as it found it: one service boot, not one each)."""
    d = Daemon(PERSISTENT_CONFIG).start()
    yield d
    d.cleanup()


def test_stop_removes_sandboxes_and_restart_brings_the_service_back(persistent_daemon):
    d = persistent_daemon
    api = d.client()
    wait_agent(api, "svc-1")
    r = api.post("/hostgroup/svc/nodes", params={"wait": "agent", "timeout": "4m"}, json={})
    assert r.status_code == 201, r.text
    sandbox = r.json()["hostname"]
    sandbox_disk = d.data_dir / "run" / sandbox / "disk.qcow2"
    assert sandbox_disk.exists()
    marker = os.urandom(8).hex()
    r = api.post("/vm/svc-1/exec", params={"cmd": f"echo {marker} > /root/marker && sync", "buffered": "true"})
    assert r.status_code == 200 and r.json()["exit_code"] == 0, r.text
    first = api.get("/vm/svc-1").json()

    assert d.stop(signal.SIGTERM) == 0
    assert qemu_pids(str(d.data_dir)) == [], "no QEMU may outlive the daemon"
    assert not sandbox_disk.exists() and not (d.data_dir / "run" / sandbox).exists()
    service_disk = d.data_dir / "disks" / "svc-1.qcow2"
    assert service_disk.exists(), "a persistent service keeps its disk"
    assert "svc-1: guest did not power off" not in d.log(), "the service powered off gracefully"

    d.start()
    api = d.client()
    wait_agent(api, "svc-1")
    nodes = api.get("/nodes").json()
    assert [n["hostname"] for n in nodes] == ["svc-1"], "sandboxes do not come back"
    assert nodes[0]["ip"] == first["ip"] and nodes[0]["created_at"] == first["created_at"]
    r = api.post("/vm/svc-1/exec", params={"cmd": "cat /root/marker", "buffered": "true"})
    assert r.json()["stdout"].strip() == marker, "the file written before the restart is still there"


def sh(api, vm: str, command: str) -> str:
    r = api.post(f"/vm/{vm}/exec", params={"cmd": command, "buffered": "true"})
    assert r.status_code == 200 and r.json()["exit_code"] == 0, r.text
    return r.json()["stdout"]


def wait_http(url: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return httpx.get(url, timeout=3).text
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def qmp_stop(sock: Path) -> None:
    """Stop a QEMU's vCPUs over its QMP socket (free while no daemon holds it), as a daemon that
    died between restoring a VM and resuming it leaves them."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock))
        f = s.makefile("rwb")
        f.readline()  # greeting
        for command in ("qmp_capabilities", "stop"):
            f.write(json.dumps({"execute": command}).encode() + b"\n")
            f.flush()
            while b'"return"' not in (line := f.readline()):
                assert line and b'"error"' not in line, line


def test_a_crashed_daemon_leaves_guests_running_and_the_next_one_adopts_them(persistent_daemon):
    d = persistent_daemon
    api = d.client()
    wait_agent(api, "svc-1")
    made = [api.post("/hostgroup/svc/nodes", params={"wait": "agent", "timeout": "4m"}, json={})
            for _ in range(3)]
    assert all(r.status_code == 201 for r in made), [r.text for r in made]
    sandbox, dies, orphan = (r.json()["hostname"] for r in made)
    marker = os.urandom(8).hex()
    sh(api, sandbox, f"echo {marker} > /dev/shm/marker")  # memory only: survives only in the same guest
    bg = api.post(f"/vm/{sandbox}/exec", params={
        "cmd": ticker("/dev/shm/ticks", 0.2), "background": "true"})
    assert bg.status_code == 201, bg.text
    exec_id = bg.json()["exec_id"]
    web = api.post(f"/vm/{sandbox}/exec", params={
        "cmd": "cd /dev/shm && exec python3 -m http.server 8000", "background": "true"})
    assert web.status_code == 201, web.text
    guest_url = f"http://{api.get(f'/vm/{sandbox}').json()['ip']}:8000/marker"
    assert wait_http(guest_url).strip() == marker, "the host reaches the guest over its network"
    pids = {h: api.get(f"/vm/{h}").json()["vmm"]["pid"] for h in ("svc-1", sandbox, dies, orphan)}
    assert api.post("/vm/svc-1/pause").status_code == 200  # a pause someone asked for survives

    d.proc.kill()  # a crash: no graceful stop
    d.proc.wait()
    qmp_stop((d.data_dir / "run").resolve() / sandbox / "qmp.sock")  # a pause nobody asked for does not
    os.kill(pids[dies], signal.SIGKILL)  # a QEMU that ends while no daemon watches
    with sqlite3.connect(d.data_dir / "state.db") as db:  # a QEMU no record names
        db.execute("DELETE FROM nodes WHERE hostname = ?", (orphan,))
    deadline = time.monotonic() + 30  # SIGKILL is delivered, not awaited: the process may still be exiting
    while pids[dies] in qemu_pids(str(d.data_dir)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert set(qemu_pids(str(d.data_dir))) == {pids["svc-1"], pids[sandbox], pids[orphan]}
    fifo = d.data_dir / "run" / sandbox / "qemu.log.pipe"  # QEMU's stderr (slicer.vmm.stderr_log)
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        raise AssertionError("someone still reads QEMU's output with no daemon running")
    except OSError as e:
        assert e.errno == errno.ENXIO  # no reader: QEMU's writes fail (EPIPE, ignored) and it runs on

    d.start()
    api = d.client()
    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # the new daemon reads it again
    os.write(fd, f"after adoption {marker}\n".encode())
    os.close(fd)
    deadline = time.monotonic() + 30
    while marker not in (d.data_dir / "run" / sandbox / "qemu.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marker in (d.data_dir / "run" / sandbox / "qemu.log").read_text()
    nodes = {n["hostname"]: n for n in api.get("/nodes").json()}
    assert set(nodes) == {"svc-1", sandbox}, "the sandbox whose QEMU died is removed, the orphan not adopted"
    assert set(qemu_pids(str(d.data_dir))) == {pids["svc-1"], pids[sandbox]}, "the orphan QEMU is stopped"
    assert nodes["svc-1"]["status"] == "Paused" and nodes[sandbox]["status"] == "Running", nodes
    assert api.post("/vm/svc-1/resume").status_code == 200
    for hostname in ("svc-1", sandbox):
        view = api.get(f"/vm/{hostname}").json()
        assert view["status"] == "Running" and view["boot"] == "adopted", view
        assert view["vmm"]["pid"] == pids[hostname], "the same QEMU goes on"
        wait_agent(api, hostname)
    assert sh(api, sandbox, "cat /dev/shm/marker").strip() == marker, "the same guest goes on"
    assert wait_http(guest_url).strip() == marker, "its network link (and its firewall entries) came back"
    info = api.get(f"/vm/{sandbox}/exec/{exec_id}").json()
    assert info["running"] is True, info
    ticks = int(sh(api, sandbox, "wc -l < /dev/shm/ticks"))
    time.sleep(1)
    assert int(sh(api, sandbox, "wc -l < /dev/shm/ticks")) > ticks, "its background command still runs"
    assert not (d.data_dir / "run" / dies).exists() and not (d.data_dir / "run" / orphan).exists()

    # An upgrade: SIGQUIT ends the daemon and nothing else; the next one adopts every VM again.
    assert d.stop(signal.SIGQUIT) == 0
    assert set(qemu_pids(str(d.data_dir))) == {pids["svc-1"], pids[sandbox]}
    d.start()
    api = d.client()
    assert {n["hostname"]: n["boot"] for n in api.get("/nodes").json()} == {"svc-1": "adopted", sandbox: "adopted"}
    assert sh(api, sandbox, "cat /dev/shm/marker").strip() == marker
    sh(api, "svc-1", "echo kept > /root/kept && sync")

    # The config's count goes down across an upgrade: the service retires, the sandbox runs on.
    assert d.stop(signal.SIGQUIT) == 0
    d.config_path.write_text(d.config_text.replace("count: 1", "count: 0"))
    d.start()
    api = d.client()
    assert [n["hostname"] for n in api.get("/nodes").json()] == [sandbox]
    deadline = time.monotonic() + 90
    while pids["svc-1"] in qemu_pids(str(d.data_dir)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert qemu_pids(str(d.data_dir)) == [pids[sandbox]], "the retired service was shut down"
    assert (d.data_dir / "disks" / "svc-1.qcow2").exists(), "its disk is kept"

    assert d.stop(signal.SIGINT) == 0  # a graceful stop: the adopted sandbox goes
    assert qemu_pids(str(d.data_dir)) == []
    d.config_path.write_text(d.config_text)  # the count comes back: the service boots on its disk
    d.start()
    api = d.client()
    assert [n["hostname"] for n in api.get("/nodes").json()] == ["svc-1"]
    wait_agent(api, "svc-1")
    assert sh(api, "svc-1", "cat /root/kept").strip() == "kept"


@pytest.mark.parametrize("address", ["SOCKET", "./api.sock"])  # absolute; relative to the config (Slicer's docs)
def test_unix_socket_api_needs_no_token_and_is_private(guest_image, address):
    d = Daemon(
        f"""
config:
  host_groups:
  - name: vm
    count: 0
  api:
    bind_address: {address}
    auth:
      enabled: true
"""
    )
    d.socket = d.data_dir / "api.sock"  # the config file is in the data dir
    d.start()
    try:
        assert stat.S_IMODE(d.socket.stat().st_mode) == 0o600
        with d.client(token=None) as c:
            assert c.get("/hostgroup").json()[0]["name"] == "vm"
            assert c.get("/info").status_code == 200
        assert d.token is None, "no token is made for a unix-socket API"
        assert d.stop() == 0
    finally:
        d.cleanup()


SANDBOX_ONLY = """
config:
  host_groups:
  - name: box
    count: 0
    vcpu: 1
    ram_mb: 384
    storage_size: 2G
    boot: cold
  api:
    bind_address: 127.0.0.1
    port: PORT
"""


def test_one_daemon_per_data_dir_and_long_data_dir_paths(guest_image, tmp_path):
    """A data dir far longer than unix sockets allow works; a second daemon on it harms nothing."""
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    long_dir = Path(tempfile.mkdtemp(prefix="slt-", dir="/tmp")) / ("a-rather-long-data-directory-" * 3)
    long_dir.mkdir()
    d = Daemon(SANDBOX_ONLY, data_dir=long_dir).start()
    try:
        api = d.client()
        r = api.post("/hostgroup/box/nodes", params={"wait": "agent", "timeout": "4m"}, json={})
        assert r.status_code == 201, r.text
        h = r.json()["hostname"]
        assert (long_dir / "run" / h / "console.log").exists()  # the files stay in the data dir
        second = subprocess.run([sys.executable, "-m", "slicer", "up", str(d.config_path), "--data-dir", str(long_dir),
                                 "--no-build"], capture_output=True, text=True, timeout=60)
        assert second.returncode != 0 and f"pid {d.proc.pid}" in second.stderr, second.stderr
        assert api.get(f"/vm/{h}/health").status_code == 200  # the first daemon and its VM go on
        assert (long_dir / "daemon.lock").read_text().strip() == str(d.proc.pid)
    finally:
        d.cleanup()
        shutil.rmtree(long_dir.parent, ignore_errors=True)


def test_bad_input_is_a_clear_400_never_a_500(daemon, api):
    deep = b"[" * 100_000 + b"]" * 100_000
    cases = [
        api.post("/secrets", json={"name": "perm", "data": "eA==", "permissions": 600}),
        api.post("/hostgroup/sbx/nodes", content=deep, headers={"Content-Type": "application/json"}),
        api.post("/hostgroup/sbx/nodes", json={"hostname": "vm-9\n"}),
        api.post("/secrets", json={"name": "name\n", "data": "eA=="}),
        api.get("/vm/vm-1/cp", params={"path": "/etc/host\0name"}),
        api.post("/vm/vm-1/exec", params={"cmd": "echo", "args": "a\0b"}),
        api.get("/vm/vm-9%0a/health"),
    ]
    for r in cases:
        assert r.status_code == 400 and r.json()["code"], (r.request.url, r.text)
    assert all(s["name"] not in ("perm", "name\n") for s in api.get("/secrets").json())
    assert "vm-9\n" not in {n["hostname"] for n in api.get("/nodes").json()}


def test_shutdown_through_the_api_stops_the_daemon_gracefully(guest_image):
    """The Go SDK's ShutdownDaemon: 202 at once, then the stop SIGTERM gives."""
    d = Daemon("""
config:
  host_groups:
  - name: sbx
    count: 0
    vcpu: 1
    ram_mb: 256
  api:
    bind_address: 127.0.0.1
    port: PORT
""").start()
    try:
        with d.client(token="wrong") as bad:
            assert bad.post("/daemon/shutdown").status_code == 401
        r = d.client().post("/daemon/shutdown")
        assert r.status_code == 202 and r.json() == {"status": "shutting down"}
        assert d.proc is not None and d.proc.wait(60) == 0
        assert "daemon stopped" in d.log()
    finally:
        d.cleanup()


EMPTY_CONFIG = """
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
"""


def test_a_vmm_being_started_when_its_daemon_died_is_stopped(guest_image):
    """A daemon killed while it starts a confined QEMU leaves a process that is not QEMU yet
    (``unshare``, the jail's shell, ``setpriv``) or has no pidfile yet. The next daemon stops it
    instead of leaving a QEMU no record names."""
    import subprocess

    d = Daemon(EMPTY_CONFIG)
    try:
        d.start()
        run_dir = str((d.data_dir / "run").resolve())  # short enough to need no link (slicer.core.rundir)
        d.stop(signal.SIGKILL)
        # a stand-in for the jail's helpers: the environment a VMM is started with, no pidfile
        helper = subprocess.Popen(["sleep", "600"], env={"PATH": os.defpath, "SLICER_RUN_DIR": f"{run_dir}/sbx-9"})
        unrelated = subprocess.Popen(["sleep", "600"], env={"PATH": os.defpath, "SLICER_RUN_DIR": "/elsewhere/x"})
        try:
            d.start()
            assert helper.wait(30) == -signal.SIGKILL
            assert unrelated.poll() is None  # another data directory's: not ours to stop
            assert "a VMM an earlier daemon was starting when it died" in d.log()
        finally:
            for p in (helper, unrelated):
                if p.poll() is None:
                    p.kill()
                p.wait()
    finally:
        d.cleanup()
