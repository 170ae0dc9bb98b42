"""Templates, suspend/restore/relaunch and suspend-on-shutdown, against real VMs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from slicer.net.addressing import mac_for
from tests.conftest import IMAGE_DATA_DIR, Daemon, ticker, wait_agent

pytestmark = pytest.mark.vm

IDENTITY = (
    "hostname; cat /etc/machine-id; ip -4 -o addr show dev eth0 | awk '{print $4}'; "
    "cat /etc/ssh/ssh_host_ed25519_key.pub | cut -d' ' -f2; date +%s.%N; "
    "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo"
)


def run(api: httpx.Client, host: str, cmd: str) -> str:
    r = api.post(f"/vm/{host}/exec", params={"cmd": cmd, "buffered": "true"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["exit_code"] == 0, body
    return body["stdout"]


def create(api: httpx.Client, group: str = "sbx", **body) -> str:
    r = api.post(f"/hostgroup/{group}/nodes", params={"wait": "agent", "timeout": "4m"}, json=body)
    assert r.status_code == 201, r.text
    return r.json()["hostname"]


def test_clones_of_one_template_are_separate_machines(api):
    a, b = create(api), create(api)
    try:
        views = {h: api.get(f"/vm/{h}").json() for h in (a, b)}
        assert all(v["boot"] == "template" and v["status"] == "Running" for v in views.values()), views
        ids = {}
        for h in (a, b):
            before = time.time()
            name, machine_id, ip, host_key, clock, random = run(api, h, IDENTITY).split()
            ids[h] = (machine_id, ip, host_key, random)
            assert name == h
            assert ip == views[h]["ip"] + "/24"
            assert len(machine_id) == 32 and len(random) == 64
            assert before - 2 <= float(clock) <= time.time() + 1, "the clock was set from the host after restore"
        for i, what in enumerate(["machine-id", "IP", "SSH host key", "random stream"]):
            assert ids[a][i] != ids[b][i], f"{what} is shared by two clones"
        run(api, a, "echo only-in-a > /root/mine && sync")
        assert run(api, a, "cat /root/mine") == "only-in-a\n"
        r = api.post(f"/vm/{b}/exec", params={"cmd": "cat /root/mine", "buffered": "true"}).json()
        assert r["exit_code"] != 0, "a file written in one clone appeared in the other"
        assert "restored from template" in api.get(f"/vm/{a}/logs", params={"lines": 0}).json()["content"]
        storage = api.get("/storage").json()
        (tpl,) = [t for t in storage["templates"]
                  if t["hostgroup"] == "sbx" and t["ram_bytes"] == 384 << 20 and not t["retired"]]
        assert tpl["clones"] >= 2 and tpl["state_bytes"] > 0 and tpl["disk_bytes"] > 0
        assert {n["hostname"]: n["template"] for n in storage["nodes"]}[a] == tpl["name"]
    finally:
        for h in (a, b):
            api.delete(f"/hostgroup/sbx/nodes/{h}")


def test_a_smaller_size_gets_a_template_of_its_own(api):
    small = {"cpus": 1, "ram_bytes": 256 << 20}
    a, b = create(api, **small), create(api, **small)
    try:
        for h in (a, b):
            view = api.get(f"/vm/{h}").json()
            assert view["boot"] == "template" and view["ram_bytes"] == 256 << 20
            total_kib = int(run(api, h, "awk '/MemTotal/ {print $2}' /proc/meminfo"))
            assert total_kib < 256 << 10, "the clone has the smaller memory"
        sizes = {t["ram_bytes"] for t in api.get("/storage").json()["templates"]
                 if t["hostgroup"] == "sbx" and not t["retired"]}
        assert {256 << 20, 384 << 20} <= sizes
    finally:
        for h in (a, b):
            api.delete(f"/hostgroup/sbx/nodes/{h}")


def test_cold_boot_on_request(api):
    h = create(api, boot="cold")
    try:
        assert api.get(f"/vm/{h}").json()["boot"] == "boot"
        assert "Linux version" in api.get(f"/vm/{h}/logs", params={"lines": 0}).json()["content"]
        assert "restored from template" not in api.get(f"/vm/{h}/logs", params={"lines": 0}).json()["content"]
        # Its init set the network up from the kernel command line (one ip -batch): lo, the
        # VM's own address and MAC on eth0, the default route.
        ip = api.get(f"/vm/{h}").json()["ip"]
        assert "<LOOPBACK,UP" in run(api, h, "ip -o link show dev lo")
        eth0 = run(api, h, "ip -o link show dev eth0")
        assert mac_for(ip) in eth0, eth0  # QEMU's own would be 52:54:00:...
        assert f"inet {ip}/" in run(api, h, "ip -o -4 addr show dev eth0")
        assert run(api, h, "ip route show default").startswith("default via ")
    finally:
        api.delete(f"/hostgroup/sbx/nodes/{h}")
    r = api.post("/hostgroup/sbx/nodes", json={"boot": "warm"})
    assert r.status_code == 400 and r.json()["code"] == "invalid_request"
    assert api.post("/hostgroup/ghost/template").status_code == 404


COUNTER = ticker("/tmp/counter")  # a line a tick: count them


def test_suspend_and_restore_keep_a_running_process(api, daemon):
    h = create(api)
    try:
        r = api.post(f"/vm/{h}/exec", params={"cmd": COUNTER, "background": "true"})
        assert r.status_code == 201, r.text
        pid = r.json()["pid"]
        time.sleep(1.5)
        before = int(run(api, h, "wc -l < /tmp/counter"))
        assert before > 0
        r = api.post(f"/vm/{h}/suspend")
        assert r.status_code == 200, r.text
        assert api.get(f"/vm/{h}").json()["status"] == "Suspended"
        blocked = api.post(f"/vm/{h}/exec", params={"cmd": "true", "buffered": "true"})
        assert blocked.status_code == 409 and blocked.json()["code"] == "suspended"
        assert api.post(f"/vm/{h}/suspend").status_code == 409
        state = [n for n in api.get("/storage").json()["nodes"] if n["hostname"] == h]
        assert state and state[0]["state_bytes"] > 0, "the saved state is accounted for"
        for private in ("snapshots", "templates"):  # guest memory: root's eyes only
            assert (daemon.data_dir / private).stat().st_mode & 0o077 == 0
        time.sleep(2)
        r = api.post(f"/vm/{h}/restore", params={"wait": "agent"})
        assert r.status_code == 200, r.text
        assert api.get(f"/vm/{h}").json()["status"] == "Running"
        after = int(run(api, h, "wc -l < /tmp/counter"))
        assert before <= after < before + 60, (before, after)
        assert run(api, h, f"cat /proc/{pid}/comm").strip() == "bash", "the same process runs on"
        time.sleep(0.5)
        assert int(run(api, h, "wc -l < /tmp/counter")) > after, "and keeps counting"
        assert abs(float(run(api, h, "date +%s.%N")) - time.time()) < 30
        again = api.post(f"/vm/{h}/restore")
        assert again.status_code == 409 and again.json()["code"] == "not_suspended"
    finally:
        api.delete(f"/hostgroup/sbx/nodes/{h}")
    assert api.post("/vm/ghost-1/suspend").status_code == 404
    assert api.post("/vm/ghost-1/restore").status_code == 404


def test_a_vm_saved_while_rebooting_is_set_up_after_its_reboot(api):
    """Suspended a moment after a reboot began, the restored guest goes on rebooting: its agent
    goes away during the identity reset, and the restore waits for it (it was a 500). A service,
    as only a service reboots in place (a reboot ends any other VM, as in Slicer)."""
    h = "vm-1"
    wait_agent(api, h)
    try:
        for delay in (0.1, 0.2):
            assert api.post(f"/vm/{h}/shutdown", params={"action": "reboot"}).status_code == 200
            time.sleep(delay)
            r = api.post(f"/vm/{h}/suspend")
            assert r.status_code in (200, 409), r.text  # 409: the reset came first
            if r.status_code == 200:
                r = api.post(f"/vm/{h}/restore", params={"wait": "agent", "timeout": "4m"})
                assert r.status_code == 200, r.text
            wait_agent(api, h)
            assert run(api, h, "hostname") == f"{h}\n"
    finally:  # the other tests of this daemon share vm-1: it must not stay suspended
        if api.get(f"/vm/{h}").json().get("status") != "Running":
            api.post(f"/vm/{h}/relaunch", params={"wait": "agent", "timeout": "4m"})


def test_relaunch_boots_a_shut_down_persistent_vm_from_its_disk(daemon, api):
    h = create(api, persistent=True)
    try:
        # Restored from the group's template, but persistent VMs never share a template's disk:
        # its own starts as a copy of the template's, on the image alone.
        assert api.get(f"/vm/{h}").json()["boot"] == "template"
        disk = daemon.data_dir / "disks" / f"{h}.qcow2"
        below = json.loads(disk.with_name(disk.name + ".backing").read_text())["path"]
        assert Path(below).is_relative_to(IMAGE_DATA_DIR.resolve()), below
        info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(disk)],
                                         capture_output=True, check=True).stdout)
        assert Path(info["backing-filename"]).resolve() == Path(below), info
        run(api, h, "echo kept > /root/kept && sync")
        running = api.post(f"/vm/{h}/relaunch")
        assert running.status_code == 409 and running.json()["code"] == "running"
        assert api.post(f"/vm/{h}/shutdown", params={"action": "shutdown"}).status_code == 200
        # At once, as Slicer's clients do: the relaunch waits for the shutdown under way.
        r = api.post(f"/vm/{h}/relaunch", params={"wait": "agent", "timeout": "4m"})
        assert r.status_code == 200, r.text
        assert r.json()["hostname"] == h and set(r.json()) >= {"ip", "created_at", "arch", "hostgroup"}
        assert run(api, h, "cat /root/kept") == "kept\n"
        assert api.post(f"/vm/{h}/shutdown", params={"action": "shutdown"}).status_code == 200
        deadline = time.monotonic() + 60
        while api.get(f"/vm/{h}").json()["status"] != "Stopped" and time.monotonic() < deadline:
            time.sleep(0.3)
        assert api.get(f"/vm/{h}").json()["status"] == "Stopped"
        r = api.post(f"/vm/{h}/relaunch", params={"wait": "agent", "timeout": "4m"})
        assert r.status_code == 200, r.text
        assert run(api, h, "cat /root/kept") == "kept\n"
        assert api.get(f"/vm/{h}").json()["boot"] == "boot"
        nodes = {n["hostname"]: n for n in api.get("/storage").json()["nodes"]}
        assert nodes[h]["template"] is None, "booted from its own disk, it uses nothing of the template"
    finally:
        api.delete(f"/hostgroup/sbx/nodes/{h}")
    assert api.post("/vm/ghost-1/relaunch").status_code == 404


OWN_CONFIG = """
config:
  host_groups:
  - name: svc
    count: 1
    vcpu: 1
    ram_mb: 256
    storage_size: 2G
    persistent: false
  - name: box
    count: 0
    vcpu: 1
    ram_mb: 256
    storage_size: 2G
  api:
    bind_address: 127.0.0.1
    port: PORT
"""


def _own_image(data_dir, name: str) -> None:
    """The shared image under a new name, its initramfs a copy (1.4 MB; the rest linked): to the
    daemon, a new image (a template's key names the real files its state depends on)."""
    images = data_dir / "images"
    images.mkdir(exist_ok=True)
    shutil.copy(IMAGE_DATA_DIR / "images" / "accel.json", images / "accel.json")
    shared = (IMAGE_DATA_DIR / "images" / "current").resolve()
    (images / name).mkdir()
    for f in ("vmlinuz", "rootfs.ext4", "manifest.json"):
        (images / name / f).symlink_to(shared / f)
    shutil.copy(shared / "initrd.img", images / name / "initrd.img")
    current = images / "current"
    current.unlink(missing_ok=True)
    current.symlink_to(name)


def _templates(api: httpx.Client) -> list[dict]:
    return [t for t in api.get("/storage").json()["templates"] if t["hostgroup"] == "box"]


def test_templates_follow_the_image_and_a_failed_restore_boots_cold(guest_image):
    data = Path(tempfile.mkdtemp(prefix="slt-", dir="/tmp"))  # short: socket paths have a limit
    _own_image(data, "image-a")
    d = Daemon(OWN_CONFIG.replace("count: 1", "count: 0"), data_dir=data).start()  # no service: box alone
    try:
        api = d.client()
        r = api.post("/hostgroup/box/template")
        assert r.status_code == 200, r.text
        first = r.json()
        assert first["hostgroup"] == "box" and first["state_bytes"] > 0
        h = create(api, "box")
        assert api.get(f"/vm/{h}").json()["boot"] == "template"
        api.delete(f"/hostgroup/box/nodes/{h}")

        # A broken state file: the restore fails, the sandbox boots cold, the template is retired.
        tpl_dir = data / "templates" / first["name"]
        (tpl_dir / "state").write_bytes(b"not a saved state")
        h = create(api, "box")
        assert api.get(f"/vm/{h}").json()["boot"] == "boot"
        assert run(api, h, "hostname").strip() == h
        assert "booting cold" in d.log()
        assert _templates(api) == [], "the retired template, used by nothing, is removed"
        api.delete(f"/hostgroup/box/nodes/{h}")
        second = api.post("/hostgroup/box/template").json()
        assert second["name"] != first["name"], "a new template replaces it"
        assert d.stop() == 0

        _own_image(data, "image-b")  # a new image: the template must be rebuilt
        d.start()
        api = d.client()
        assert _templates(api) == [], "the template of the old image is removed at start"
        h = create(api, "box")
        assert api.get(f"/vm/{h}").json()["boot"] == "template"
        (third,) = _templates(api)
        assert third["name"] != second["name"]
        assert third["name"].split("-")[1] != second["name"].split("-")[1], "a new key for a new image"
    finally:
        d.cleanup()


def test_suspend_on_shutdown_brings_services_back_where_they_were(guest_image):
    d = Daemon(OWN_CONFIG.replace("api:", "suspend_on_shutdown: true\n  api:")).start()
    data = d.data_dir
    try:
        api = d.client()
        wait_agent(api, "svc-1")
        sandbox = create(api, "box")
        api.post(f"/vm/{sandbox}/suspend").raise_for_status()
        api.post("/vm/svc-1/exec", params={"cmd": COUNTER, "background": "true"}).raise_for_status()
        time.sleep(1.5)
        before = int(run(api, "svc-1", "wc -l < /tmp/counter"))

        assert d.stop(signal.SIGTERM) == 0
        assert (data / "snapshots" / "svc-1.state").exists(), "the service was suspended"
        assert not (data / "snapshots" / f"{sandbox}.state").exists(), "a suspended sandbox goes with the daemon"
        assert sorted(os.listdir(data / "snapshots")) == ["svc-1.state"]

        d.start()
        api = d.client()
        wait_agent(api, "svc-1")
        nodes = api.get("/nodes").json()
        assert [n["hostname"] for n in nodes] == ["svc-1"] and nodes[0]["boot"] == "suspend"
        after = int(run(api, "svc-1", "wc -l < /tmp/counter"))
        assert before <= after < before + 100, "the counter went on from where it was"
        assert not (data / "snapshots" / "svc-1.state").exists(), "a restored state is removed"
    finally:
        d.cleanup()
