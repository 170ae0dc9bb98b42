"""Platform features against real VMs: stats, Prometheus metrics (and, below, secrets,
userdata and SSH keys)."""

from __future__ import annotations

import os

import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.vm
SNAPSHOT_FIELDS = {
    "hostname", "arch", "timestamp", "uptime", "totalCpus", "totalMemory", "memoryUsed", "memoryAvailable",
    "memoryUsedPercent", "loadAvg1", "loadAvg5", "loadAvg15", "diskReadTotal", "diskWriteTotal",
    "networkReadTotal", "networkWriteTotal", "diskIOInflight", "openConnections", "openFiles", "entropy",
    "diskSpaceTotal", "diskSpaceUsed", "diskSpaceFree", "diskSpaceUsedPercent",
}


def test_node_stats_have_every_field_and_move_with_memory(api, vm):
    before = api.get(f"/node/{vm}/stats").json()
    assert {"hostname", "ip", "created_at", "snapshot"} <= set(before)
    snap = before["snapshot"]
    assert set(snap) >= SNAPSHOT_FIELDS and snap["hostname"] == vm
    assert snap["totalCpus"] == 2 and 400 << 20 < snap["totalMemory"] <= 512 << 20
    assert snap["diskSpaceTotal"] > snap["diskSpaceUsed"] > 0 and 0 < snap["memoryUsedPercent"] < 100
    # hold 96 MiB in the guest for a while and look again
    api.post(f"/vm/{vm}/exec", params={
        "cmd": "python3 -c 'import time; b = bytearray(96 << 20); b[::4096] = b\"x\" * len(b[::4096]); "
               "time.sleep(60)' >/dev/null 2>&1 &", "buffered": "true"})
    import time

    deadline = time.monotonic() + 45  # a loaded 2-core host under TCG can take a while to touch 96 MiB
    grew = 0
    while time.monotonic() < deadline and grew < 64 << 20:
        time.sleep(1)
        grew = api.get(f"/node/{vm}/stats").json()["snapshot"]["memoryUsed"] - snap["memoryUsed"]
    assert grew >= 64 << 20, f"memory used grew by only {grew >> 20} MiB"


def test_all_stats_lists_every_node_and_reports_a_dead_agent(api, daemon, vm):
    r = api.post("/hostgroup/sbx/nodes", json={})
    assert r.status_code == 201
    fresh = r.json()["hostname"]
    try:
        api.post(f"/vm/{fresh}/pause")
        rows = {row["hostname"]: row for row in api.get("/nodes/stats").json()}
        assert "snapshot" in rows[vm] and set(rows[vm]["snapshot"]) >= SNAPSHOT_FIELDS
        assert "error" in rows[fresh] and "snapshot" not in rows[fresh], "a paused VM shows an error, not a crash"
    finally:
        api.delete(f"/hostgroup/sbx/nodes/{fresh}")
    assert api.get("/node/ghost-1/stats").status_code == 404


def test_metrics_parse_and_move_when_vms_are_created(api, vm):
    def sample(text: str, name: str, **labels) -> float:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
        return 0.0

    before = api.get("/metrics")
    assert before.status_code == 200 and before.headers["content-type"].startswith("text/plain")
    started = sample(before.text, "slicer_vm_starts_total", hostgroup="sbx", kind="sandbox")
    launched = sample(before.text, "slicer_vm_launch_total", hostgroup="sbx")
    r = api.post("/hostgroup/sbx/nodes", json={}, params={"wait": "agent", "timeout": "4m"})
    assert r.status_code == 201
    try:
        after = api.get("/metrics").text
        assert sample(after, "slicer_vm_starts_total", hostgroup="sbx", kind="sandbox") == started + 1
        assert sample(after, "slicer_vms", hostgroup="sbx", status="Running") >= 1
        assert sample(after, "slicer_vm_boot_seconds_count", hostgroup="sbx") >= 1
        assert sample(after, "slicer_api_requests_total", method="POST", route="/hostgroup/{name}/nodes",
                      code="201") >= 1
        # Slicer's names: launches, running VMs, the host's own figures
        assert sample(after, "slicer_vm_launch_total", hostgroup="sbx") == launched + 1
        assert sample(after, "slicer_vm_running", hostgroup="sbx") >= 1
        assert sample(after, "slicer_system_cpus") == os.cpu_count()
        total, available = (sample(after, f"slicer_system_memory_{k}_bytes") for k in ("total", "available"))
        assert total > available > 0
        assert sample(after, "slicer_vm_memory_total_bytes", hostname=vm) > 0
    finally:
        api.delete(f"/hostgroup/sbx/nodes/{r.json()['hostname']}")


def test_metrics_need_the_token(daemon):
    with daemon.client(token=None) as anon:
        assert anon.get("/metrics").status_code == 401


# -- secrets ------------------------------------------------------------------------------------
def b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


def guest(api, vm: str, cmd: str) -> str:
    r = api.post(f"/vm/{vm}/exec", params={"cmd": cmd, "buffered": "true"})
    assert r.status_code == 200, r.text
    return r.json()["stdout"]


def eventually(fn, timeout: float = 20.0):
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            value = fn()
        except AssertionError:  # e.g. the agent is going down for a reboot: look again
            value = None
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.5)


def test_secret_crud_and_propagation(api, vm):
    r = api.post("/secrets", json={"name": "db-pass", "data": b64(b"hunter2"), "permissions": "0640",
                                   "uid": 1000, "gid": 1000})
    assert r.status_code == 201, r.text
    meta = r.json()
    assert meta["name"] == "db-pass" and meta["size"] == 7 and meta["permissions"] == "0640"
    assert "data" not in meta and meta["mod_time"] and meta["modified_at"] == meta["mod_time"]
    listed = {s["name"]: s for s in api.get("/secrets").json()}
    assert "data" not in listed["db-pass"] and listed["db-pass"]["uid"] == 1000
    path = "/run/slicer/secrets/db-pass"
    assert eventually(lambda: guest(api, vm, f"cat {path} 2>/dev/null") == "hunter2")
    assert guest(api, vm, f"stat -c '%a %u %g' {path}").split() == ["640", "1000", "1000"]
    assert "tmpfs" in guest(api, vm, "df --output=fstype /run/slicer/secrets | tail -1")
    assert guest(api, vm, f"su -s /bin/sh ubuntu -c 'cat {path}'") == "hunter2", "the owner can read it"
    r = api.patch("/secrets/db-pass", json={"data": b64(b"correct horse"), "permissions": "0600"})
    assert r.status_code == 200 and r.json()["size"] == 13
    assert eventually(lambda: guest(api, vm, f"cat {path}") == "correct horse")
    assert guest(api, vm, f"stat -c '%a' {path}").strip() == "600"
    assert api.post("/secrets", json={"name": "db-pass", "data": b64(b"x")}).status_code == 409
    assert api.delete("/secrets/db-pass").status_code == 200
    assert eventually(lambda: "gone" in guest(api, vm, f"test -e {path} || echo gone"))
    assert api.delete("/secrets/db-pass").status_code == 404
    assert api.patch("/secrets/nope", json={"data": b64(b"x")}).status_code == 404


@pytest.mark.parametrize(
    "body, code",
    [
        ({"name": "../etc", "data": "eA=="}, "invalid_name"),
        ({"name": "a/b", "data": "eA=="}, "invalid_name"),
        ({"name": "x" * 200, "data": "eA=="}, "invalid_name"),
        ({"name": "ok", "data": "not base64!"}, "invalid_base64"),
        ({"name": "ok", "data": b64(b"x" * ((1 << 20) + 1))}, "too_large"),
        ({"name": "ok", "data": "eA==", "permissions": "999"}, "invalid_permissions"),
        ({"name": "ok", "data": "eA==", "uid": -1}, "invalid_request"),
        ({"name": "ok"}, "invalid_request"),
        ({"name": "ok", "data": "eA==", "colour": 1}, "invalid_request"),
    ],
)
def test_bad_secrets_are_refused(api, body, code):
    r = api.post("/secrets", json=body)
    assert r.status_code == 400 and r.json()["code"] == code, r.text
    assert all(s["name"] != "ok" for s in api.get("/secrets").json())


def test_scoped_secrets_userdata_and_keys_on_a_sandbox(api, daemon, key_server):
    import subprocess
    import sys
    from pathlib import Path

    for name in ("shared-a", "shared-b"):
        assert api.post("/secrets", json={"name": name, "data": b64(name.encode())}).status_code == 201
    extra_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx extra@test"
    userdata = "echo userdata-ran-$(hostname) > /root/ud.txt\necho run >> /root/ud-count\nls /run/slicer/secrets\n"
    r = api.post("/hostgroup/sbx/nodes", params={"wait": "userdata", "timeout": "5m"}, json={
        "secrets": ["shared-a"], "userdata": userdata, "import_user": "alice", "ssh_keys": [extra_key],
        "persistent": True})  # to come back after its reboot (which ends a VM, as in Slicer)
    assert r.status_code == 201, r.text
    h = r.json()["hostname"]
    try:
        health = api.get(f"/vm/{h}/health").json()
        assert health["userdata_ran"] is True and health["userdata_exit_code"] == 0
        assert guest(api, h, "cat /root/ud.txt") == f"userdata-ran-{h}\n"
        assert guest(api, h, "ls /run/slicer/secrets").split() == ["shared-a"], "only the listed secret"
        assert "slicer-userdata: shared-a" in api.get(f"/vm/{h}/logs", params={"lines": 0}).json()["content"]
        keys = guest(api, h, "cat /home/ubuntu/.ssh/authorized_keys")
        assert key_server.public_key in keys and extra_key in keys

        # an SSH login through the forward endpoint, with the key served as alice's GitHub keys
        proxy = (f"{sys.executable} {Path(__file__).parent / 'ws_stdio.py'} "
                 f"{daemon.url.replace('http', 'ws')}/vm/{h}/forward {daemon.token} 127.0.0.1:22")

        def login() -> str:
            out = subprocess.run(
                ["ssh", "-i", str(key_server.private_key), "-o", f"ProxyCommand={proxy}",
                 "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
                 "-o", "ConnectTimeout=30", f"ubuntu@{h}", "echo logged-in-as-$(whoami)"],
                capture_output=True, text=True, timeout=90)
            return out.stdout

        assert "logged-in-as-ubuntu" in eventually(login, 60)

        # userdata runs once: not again after a reboot and relaunch; secrets are back on the fresh tmpfs
        boot_id = guest(api, h, "cat /proc/sys/kernel/random/boot_id")
        assert api.post(f"/vm/{h}/shutdown", params={"action": "reboot"}).status_code == 200
        r = api.post(f"/vm/{h}/relaunch", params={"wait": "userdata", "timeout": "4m"})  # waits for the end
        assert r.status_code == 200, r.text
        assert guest(api, h, "cat /proc/sys/kernel/random/boot_id") != boot_id
        assert eventually(lambda: "shared-a" in guest(api, h, "ls /run/slicer/secrets 2>/dev/null"), 60)
        assert guest(api, h, "cat /root/ud-count") == "run\n"
    finally:
        api.delete(f"/hostgroup/sbx/nodes/{h}")
        for name in ("shared-a", "shared-b"):
            api.delete(f"/secrets/{name}")


def test_a_failed_key_fetch_is_visible_not_fatal(api):
    r = api.post("/hostgroup/sbx/nodes", params={"wait": "agent", "timeout": "4m"},
                 json={"import_user": "nobody-here"})
    assert r.status_code == 201, r.text
    h = r.json()["hostname"]
    try:
        warnings = eventually(lambda: api.get(f"/vm/{h}").json().get("warnings"), 30)
        assert warnings and "nobody-here" in warnings[0]
    finally:
        api.delete(f"/hostgroup/sbx/nodes/{h}")


def test_empty_secrets_list_means_none(api):
    """Omitted: every secret (Slicer's default); []: none at all."""
    assert api.post("/secrets", json={"name": "for-all", "data": b64(b"x")}).status_code == 201
    made = []
    try:
        for body in ({"secrets": []}, {}):
            r = api.post("/hostgroup/sbx/nodes", params={"wait": "agent"}, json=body)
            assert r.status_code == 201, r.text
            made.append(r.json()["hostname"])
        none, every = (guest(api, h, "ls -A /run/slicer/secrets 2>/dev/null; true").split() for h in made)
        assert none == [] and "for-all" in every
    finally:
        for h in made:
            api.delete(f"/hostgroup/sbx/nodes/{h}")
        api.delete("/secrets/for-all")
