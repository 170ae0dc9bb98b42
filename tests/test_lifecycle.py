"""The daemon's own lifecycle: stop, restart, persistent services, unix-socket API."""

from __future__ import annotations

import os
import shutil
import signal
import stat

import pytest

from tests.conftest import Daemon, qemu_pids, wait_agent

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


def test_stop_removes_sandboxes_and_restart_brings_the_service_back(guest_image):
    d = Daemon(PERSISTENT_CONFIG).start()
    try:
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
    finally:
        d.cleanup()


def test_sigint_stops_too_and_a_crash_leftover_is_reconciled(guest_image):
    d = Daemon(PERSISTENT_CONFIG.replace("count: 1", "count: 0")).start()
    try:
        api = d.client()
        r = api.post("/hostgroup/svc/nodes", json={})
        assert r.status_code == 201
        sandbox = r.json()["hostname"]
        # A daemon killed outright leaves its QEMU behind; the next start must clean it up.
        d.proc.kill()
        d.proc.wait()
        assert len(qemu_pids(str(d.data_dir))) == 1
        d.start()
        assert qemu_pids(str(d.data_dir)) == []
        assert d.client().get("/nodes").json() == []
        assert not (d.data_dir / "run" / sandbox).exists()
        assert d.stop(signal.SIGINT) == 0
    finally:
        d.cleanup()


def test_unix_socket_api_needs_no_token_and_is_private(guest_image):
    d = Daemon(
        """
config:
  host_groups:
  - name: vm
    count: 0
  api:
    bind_address: SOCKET
    auth:
      enabled: true
"""
    ).start()
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
