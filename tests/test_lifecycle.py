"""The daemon's own lifecycle: stop, restart, persistent services, unix-socket API."""

from __future__ import annotations

import os
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
