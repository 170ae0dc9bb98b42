"""The daemon's API against real VMs booted under QEMU: lifecycle, logs, health, errors, auth."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import qemu_pids, wait_agent

pytestmark = pytest.mark.vm
JSON = {"content-type": "application/json"}
CREATE_KEYS = {"hostname", "hostgroup", "ip", "created_at", "arch"}


def create(api: httpx.Client, group: str = "sbx", body: dict | None = None, **params) -> httpx.Response:
    return api.post(f"/hostgroup/{group}/nodes", json=body if body is not None else {}, params=params)


def wait_until(predicate, timeout: float = 120, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def footprint(daemon) -> tuple:
    """What exists for the daemon: nodes, run directories, disks, QEMU processes."""
    run = daemon.data_dir / "run"
    disks = daemon.data_dir / "disks"
    return (
        sorted(n["hostname"] for n in daemon.client().get("/nodes").json()),
        sorted(p.name for p in run.iterdir()) if run.exists() else [],
        sorted(p.name for p in disks.iterdir()) if disks.exists() else [],
        len(qemu_pids(str(daemon.data_dir))),
    )


@pytest.fixture(scope="module")
def sandbox(api) -> str:
    r = create(api, body={"tags": ["team=a", "ci"]}, wait="agent", timeout="4m")
    assert r.status_code == 201, r.text
    hostname = r.json()["hostname"]
    yield hostname
    api.delete(f"/hostgroup/sbx/nodes/{hostname}")


def test_service_from_yaml_boots_with_its_address(api):
    health = wait_agent(api, "vm-1")
    assert health["hostname"] == "vm-1"
    # uptimes in nanoseconds, as the Go SDK's time.Duration reads them; whole seconds beside them
    assert health["system_uptime"] == health["system_uptime_seconds"] * 10**9 > 0
    assert health["agent_uptime"] == health["agent_uptime_seconds"] * 10**9
    assert health["ip"] == "192.168.137.2"
    assert health["agent_version"] and health["userdata_ran"] is False
    (node,) = api.get("/hostgroup/vm/nodes").json()
    assert node["hostname"] == "vm-1" and node["ip"] == "192.168.137.2" and node["status"] == "Running"
    assert node["cpus"] == 2 and node["ram_bytes"] == 512 << 20 and node["arch"] == "x86_64"


def test_the_agent_starts_from_the_images_compiled_code(api, vm):
    """The image ships the agent byte-compiled by the guest's own Python (the initramfs lays the
    code down afresh at every boot, so without it every start compiled every module): its
    modules load from those .pyc files, which name the guest's paths."""
    r = api.post(f"/vm/{vm}/exec", params=[
        ("cmd", "PYTHONPATH=/opt/slicer python3 -v -c 'import slicer.agent.server' 2>&1 "
                "| grep 'slicer/agent/.*server'"),
        ("buffered", "true")])
    out = r.json()["stdout"]
    pyc = "/opt/slicer/slicer/agent/__pycache__/server.cpython-3"
    assert f"# {pyc}" in out and "matches /opt/slicer/slicer/agent/server.py" in out, out
    assert f"code object from '{pyc}" in out and "wrote" not in out, out
    header = api.post(f"/vm/{vm}/exec", params=[
        ("cmd", "od -An -tu4 -N8 /opt/slicer/slicer/agent/__pycache__/demux.cpython-3*.pyc"),
        ("buffered", "true")]).json()["stdout"].split()
    assert header[1] == "3", f"a checked-hash .pyc (flags 3), as built; got {header}"


def test_info_and_host_groups(api):
    info = api.get("/info").json()
    assert info["version"] and info["git_commit"] and info["accelerator"] in ("tcg", "kvm")
    assert info["arch"] == "amd64" and info["platform"] == "linux"  # Go's names, as the official SDKs expect
    assert info["hypervisor"] == "qemu" and info["hypervisor_requested"] == "qemu"
    groups = {g["name"]: g for g in api.get("/hostgroup").json()}
    assert groups["vm"] == {"name": "vm", "count": 1, "ram_bytes": 512 << 20, "cpus": 2, "gpu_count": 0,
                            "arch": "x86_64"}
    assert groups["sbx"]["count"] == 0
    spec = api.get("/openapi.json").json()
    assert {"/vm/{hostname}/exec", "/hostgroup/{name}/nodes", "/secrets"} <= set(spec["paths"])
    assert "swagger" in api.get("/docs").text.lower()
    # the Go SDK's proxy calls: a client made, its token shown once, gone again
    made = api.post("/proxy/v1/clients", json={"name": "c-vms"})
    assert made.status_code == 201 and made.json()["token"].startswith("spt_")
    assert "token" not in api.get("/proxy/v1/clients").json()[0]
    assert api.delete("/proxy/v1/clients/c-vms").status_code == 204
    assert api.delete("/proxy/v1/clients/c-vms").json()["code"] == "proxy_client_not_found"


def test_create_waits_for_agent_and_returns_the_documented_shape(api, sandbox):
    node = api.get(f"/vm/{sandbox}").json()
    assert sandbox.startswith("sbx-") and node["status"] == "Running"
    assert node["hostgroup"] == "sbx" and node["cpus"] == 1 and node["ram_bytes"] == 384 << 20
    assert node["last_agent_call"].startswith("20"), "the Go SDK's ListVMs reads when the agent last answered"
    # what the Go SDK's DescribeVM reads
    assert node["storage"] == "image" and node["image"] == api.get("/info").json()["image"]
    assert node["network"]["mode"] in ("bridge", "isolated", "passt") and node["network"]["effective"] == {
        "allow": [], "drop": []}
    assert isinstance(node["open_agent_connections"], int) and node["open_agent_connections"] >= 0
    r = api.post(f"/vm/{sandbox}/exec", params={"cmd": "sleep 30", "background": "true"})
    assert r.status_code == 201, r.text
    execs = {e["exec_id"]: e for e in api.get(f"/vm/{sandbox}").json()["bg_execs"]}
    assert execs[r.json()["exec_id"]]["state"] == "running" and execs[r.json()["exec_id"]]["command"] == "sleep 30"
    api.post(f"/vm/{sandbox}/exec/{r.json()['exec_id']}/kill", json={"signal": "KILL"})
    # health answers at once: wait=agent returned only when the agent was up
    assert api.get(f"/vm/{sandbox}/health").status_code == 200


def test_create_response_keys_and_unique_addresses(api, daemon):
    r = create(api, body={"tags": ["shape"]})
    assert r.status_code == 201, r.text
    body = r.json()
    try:
        assert set(body) == CREATE_KEYS
        assert body["hostgroup"] == "sbx" and body["arch"] == "x86_64"
        ips = [n["ip"] for n in api.get("/nodes").json()]
        assert len(ips) == len(set(ips)), "every VM gets its own address"
    finally:
        assert api.delete(f"/hostgroup/sbx/nodes/{body['hostname']}").status_code == 200


def test_create_needs_a_json_content_type(api):
    # a form or text/plain body is what a web page can send anywhere without asking: refused
    for ctype in ("application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=x"):
        r = api.post("/hostgroup/sbx/nodes", content=b'{"tags": ["form"]}', headers={"content-type": ctype})
        assert r.status_code == 415 and r.json()["code"] == "unsupported_media_type", r.text
    r = api.post("/hostgroup/sbx/nodes", content=b'{"tags": ["form"]}',
                 headers={"content-type": "application/json; charset=utf-8"})  # what the Go SDK sends
    assert r.status_code == 201, r.text
    assert api.get(f"/vm/{r.json()['hostname']}").json()["tags"] == ["form"]
    assert api.delete(f"/hostgroup/sbx/nodes/{r.json()['hostname']}").status_code == 200
    empty = api.post("/hostgroup/sbx/nodes")  # no body at all means defaults
    assert empty.status_code == 201, empty.text
    assert api.delete(f"/hostgroup/sbx/nodes/{empty.json()['hostname']}").status_code == 200


def test_list_and_tag_filters(api, sandbox):
    all_nodes = {n["hostname"] for n in api.get("/nodes").json()}
    assert {"vm-1", sandbox} <= all_nodes
    assert [n["hostname"] for n in api.get("/nodes", params={"tag": "ci"}).json()] == [sandbox]
    assert [n["hostname"] for n in api.get("/nodes", params={"tag_prefix": "team="}).json()] == [sandbox]
    assert api.get("/nodes", params={"tag": "nope"}).json() == []
    assert [n["hostname"] for n in api.get("/hostgroup/sbx/nodes", params={"tag": "ci"}).json()] == [sandbox]
    r = api.get("/nodes", params={"tag": "a", "tag_prefix": "b"})
    assert r.status_code == 400 and r.json()["code"]


def test_logs_hold_the_kernel_banner(api, sandbox):
    everything = api.get(f"/vm/{sandbox}/logs", params={"lines": 0}).json()
    assert everything["hostname"] == sandbox and everything["lines"] == 0
    assert "Linux version" in everything["content"]
    assert "slicer-init: agent started" in everything["content"]
    default = api.get(f"/vm/{sandbox}/logs").json()
    assert default["lines"] == 20 and 0 < default["content"].count("\n") <= 20
    three = api.get(f"/vm/{sandbox}/logs", params={"lines": 3}).json()["content"]
    assert three.count("\n") <= 3 and everything["content"].endswith(three)
    bad = api.get(f"/vm/{sandbox}/logs", params={"lines": -1})
    assert bad.status_code == 400 and "error" in bad.json()


def test_health_head_and_get(api, sandbox):
    head = api.head(f"/vm/{sandbox}/health")
    assert head.status_code == 200 and head.content == b""
    get = api.get(f"/vm/{sandbox}/health").json()
    assert get["hostname"] == sandbox
    assert set(get) >= {"hostname", "agent_uptime", "agent_version", "system_uptime", "userdata_ran"}


def test_pause_and_resume(api, sandbox):
    r = api.post(f"/vm/{sandbox}/pause")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert api.get(f"/vm/{sandbox}").json()["status"] == "Paused"
    paused = api.get(f"/vm/{sandbox}/health")
    assert paused.status_code == 409 and paused.json()["code"] == "paused"
    again = api.post(f"/vm/{sandbox}/pause")
    assert again.status_code == 409 and again.json()["code"] == "invalid_state"
    assert api.post(f"/vm/{sandbox}/resume").status_code == 200
    assert api.get(f"/vm/{sandbox}").json()["status"] == "Running"
    assert api.get(f"/vm/{sandbox}/health").status_code == 200


REBOOT_NOW = "sync; python3 -c 'import ctypes; ctypes.CDLL(None).reboot(0x1234567)'"  # reboot(2): RESTART


def test_a_reboot_ends_the_vm_as_in_slicer(api):
    """Slicer on Linux runs Firecracker, which has no reboot: shutdown's default action (an empty
    JSON body, as the TypeScript SDK sends it) reboots the guest, and that ends the VM. A sandbox
    is reaped; a persistent VM stops with its disk and comes back with relaunch."""
    r = create(api, wait="agent", timeout="4m")
    assert r.status_code == 201, r.text
    sbx = r.json()["hostname"]
    r = api.post(f"/vm/{sbx}/shutdown", json={})
    assert r.status_code == 200 and r.text == f"Reboot of {sbx} started\n", r.text
    wait_until(lambda: api.get(f"/vm/{sbx}").status_code == 404, 90, "the rebooted sandbox to be reaped")

    r = create(api, body={"persistent": True}, wait="agent", timeout="4m")
    assert r.status_code == 201, r.text
    pst = r.json()["hostname"]
    try:
        # the guest's own reboot (reboot(2), as `reboot` or a panic ends in): stopped, disk kept
        with contextlib.suppress(httpx.HTTPError):  # the channel goes with the VM: whatever answer
            api.post(f"/vm/{pst}/exec", params={"cmd": "echo kept > /root/kept && " + REBOOT_NOW,
                                                "buffered": "true"}, timeout=20)
        wait_until(lambda: api.get(f"/vm/{pst}").json()["status"] == "Stopped", 90, "the VM to stop")
        logs = api.get(f"/vm/{pst}/logs", params={"lines": 0}).json()["content"]
        assert logs.count("Linux version") == 1, "it did not boot again"
        # the TypeScript SDK's "shutdown → relaunch roundtrip", with the default action
        for _ in range(2):
            r = api.post(f"/vm/{pst}/relaunch", params={"wait": "agent", "timeout": "4m"})
            assert r.status_code == 200, r.text
            assert api.post(f"/vm/{pst}/exec", params={"cmd": "cat /root/kept", "buffered": "true"}
                            ).json()["stdout"] == "kept\n"
            assert api.post(f"/vm/{pst}/shutdown", json={}).status_code == 200
            time.sleep(2)
        wait_until(lambda: api.get(f"/vm/{pst}").json()["status"] == "Stopped", 90, "the VM to stop")
    finally:
        api.delete(f"/hostgroup/sbx/nodes/{pst}")


def test_shutdown_of_a_sandbox_removes_it(api, daemon):
    r = create(api, wait="agent", timeout="4m")
    assert r.status_code == 201, r.text
    hostname = r.json()["hostname"]
    run_dir = daemon.data_dir / "run" / hostname
    pid = int((run_dir / "qemu.pid").read_text())
    r = api.post(f"/vm/{hostname}/shutdown", params={"action": "shutdown"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    wait_until(lambda: api.get(f"/vm/{hostname}").status_code == 404, 90, "the sandbox to go away")
    assert not Path(f"/proc/{pid}").exists()
    assert not run_dir.exists()


def test_delete_removes_process_and_overlay(api, daemon):
    r = create(api)
    assert r.status_code == 201, r.text
    hostname = r.json()["hostname"]
    run_dir = daemon.data_dir / "run" / hostname
    pid = int((run_dir / "qemu.pid").read_text())
    assert (run_dir / "disk.qcow2").exists()
    r = api.delete(f"/hostgroup/sbx/nodes/{hostname}")
    assert r.status_code == 200
    assert r.json() == {"message": "Node deleted", "disk_removed": "true"}
    assert not Path(f"/proc/{pid}").exists()
    assert not run_dir.exists()
    assert api.get(f"/vm/{hostname}").status_code == 404
    again = api.delete(f"/hostgroup/sbx/nodes/{hostname}")
    assert again.status_code == 404 and again.json()["code"] == "vm_not_found"


def test_a_dead_qemu_shows_as_crashed(api, daemon):
    r = create(api)
    assert r.status_code == 201, r.text
    hostname = r.json()["hostname"]
    pid = int((daemon.data_dir / "run" / hostname / "qemu.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: api.get(f"/vm/{hostname}").json()["status"] == "Crashed", 30, "status Crashed")
    h = api.get(f"/vm/{hostname}/health")
    assert h.status_code == 409 and h.json()["code"] == "not_running"
    assert api.delete(f"/hostgroup/sbx/nodes/{hostname}").status_code == 200


def test_deleting_a_service_is_refused(api):
    r = api.delete("/hostgroup/vm/nodes/vm-1")
    assert r.status_code == 403 and r.json()["code"] == "protected" and "error" in r.json()
    assert api.get("/vm/vm-1").json()["status"] == "Running"


def test_wait_timeout_is_408_and_cleans_up(api, daemon):
    before = footprint(daemon)
    r = create(api, body={"boot": "cold"}, wait="agent", timeout="1s")  # a restore may make it in 1s
    assert r.status_code == 408 and r.json()["code"] == "timeout"
    assert footprint(daemon) == before


def test_auth_matrix(daemon):
    with daemon.client(token=None) as anon:
        r = anon.get("/nodes")
        assert r.status_code == 401 and r.json()["code"] == "unauthorized"
        assert anon.get("/healthz").json() == {"status": "ok"}
        assert anon.head("/healthz").status_code == 200
        assert anon.post("/hostgroup/sbx/nodes", json={}).status_code == 401
        assert anon.get("/vm/vm-1/logs").status_code == 401
        assert anon.get("/proxy/v1/clients").status_code == 401
    with daemon.client(token="wrong-token") as wrong:
        assert wrong.get("/info").status_code == 401
        assert wrong.delete("/hostgroup/sbx/nodes/sbx-1").status_code == 401
    with httpx.Client(base_url=daemon.url, headers={"Authorization": daemon.token}) as no_scheme:
        assert no_scheme.get("/info").status_code == 401
    with daemon.client() as right:
        assert right.get("/info").status_code == 200
    token_file = daemon.data_dir / "auth" / "token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert daemon.data_dir.stat().st_mode & 0o777 == 0o700  # guest disks, memory, secrets below
    assert (daemon.data_dir / "state.db").stat().st_mode & 0o777 == 0o600  # userdata and keys


def test_browsers_cannot_drive_the_api(daemon, api):
    """A web page can POST text/plain or open a WebSocket anywhere without asking: both refused."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    evil = {"Origin": "http://evil.example"}
    r = api.post("/hostgroup/sbx/nodes", json={}, headers=evil)
    assert r.status_code == 403 and r.json()["code"] == "cross_origin"
    assert api.delete("/secrets/anything", headers=evil).status_code == 403
    assert api.get("/nodes", headers=evil).status_code == 200  # reading is not changing
    own = {"Origin": daemon.url}
    assert api.post("/secrets", json={"name": "x", "data": "!"}, headers=own).json()["code"] == "invalid_base64"
    r = api.post("/secrets", content=b'{"name": "plain", "data": "eA=="}', headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and r.json()["code"] == "unsupported_media_type"
    assert all(s["name"] != "plain" for s in api.get("/secrets").json())
    ws = daemon.url.replace("http", "ws") + "/vm/vm-1/shell"
    with pytest.raises(InvalidStatus) as e:
        connect(ws, additional_headers={"Authorization": f"Bearer {daemon.token}"}, origin="http://evil.example")
    assert e.value.response.status_code == 403


@pytest.mark.parametrize(
    "method, path, kwargs, status",
    [
        ("post", "/hostgroup/sbx/nodes", {"content": b"{not json", "headers": JSON}, 400),
        ("post", "/hostgroup/sbx/nodes", {"json": [1, 2]}, 400),
        ("post", "/hostgroup/sbx/nodes", {"json": {"cpus": "two"}}, 400),
        ("post", "/hostgroup/sbx/nodes", {"json": {"cpus": 64}}, 400),
        ("post", "/hostgroup/sbx/nodes", {"json": {"ram_bytes": 1 << 50}}, 400),
        ("post", "/hostgroup/sbx/nodes", {"json": {"ram_bytes": 1024}}, 400),
        ("post", "/hostgroup/sbx/nodes", {"json": {"hostname": "../etc"}}, 400),
        ("post", "/hostgroup/sbx/nodes", {"json": {"hostname": "vm-1"}}, 409),
        ("post", "/hostgroup/sbx/nodes", {"json": {"ip": "10.9.9.9"}}, 400),
        ("post", "/hostgroup/sbx/nodes", {"json": {"ip": "192.168.137.2"}}, 400),  # vm's subnet, not sbx's
        ("post", "/hostgroup/sbx/nodes", {"json": {"surprise": True}}, 400),
        ("post", "/hostgroup/sbx/nodes", {"json": {"tags": [""]}}, 400),
        ("post", "/hostgroup/sbx/nodes", {"json": {"userdata": "x" * (5 << 20)}}, 400),
        ("post", "/hostgroup/sbx/nodes", {"json": {}, "params": {"wait": "forever"}}, 400),
        ("post", "/hostgroup/sbx/nodes", {"json": {}, "params": {"wait": "agent", "timeout": "soon"}}, 400),
        ("post", "/hostgroup/nope/nodes", {"json": {}}, 404),
        ("get", "/hostgroup/nope/nodes", {}, 404),
        ("get", "/vm/NOT_A_HOST", {}, 400),
        ("get", "/vm/ghost-9/logs", {}, 404),
        ("post", "/vm/ghost-9/pause", {}, 404),
        ("post", "/vm/vm-1/shutdown", {"params": {"action": "explode"}}, 400),
        ("delete", "/hostgroup/nope/nodes/vm-1", {}, 404),
        ("delete", "/hostgroup/sbx/nodes/vm-1", {}, 404),
        ("get", "/no/such/route", {}, 404),
        ("put", "/nodes", {}, 405),
        ("delete", "/info", {}, 405),
    ],
)
def test_bad_input_gets_json_error_and_creates_nothing(api, daemon, method, path, kwargs, status):
    before = footprint(daemon)
    r = api.request(method.upper(), path, **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "code"} and body["error"] and body["code"]
    assert footprint(daemon) == before


def test_delete_during_create_leaves_nothing_running(daemon, api):
    """A DELETE that lands while the VM is still being created removes what the create started."""
    import concurrent.futures

    before = footprint(daemon)
    with concurrent.futures.ThreadPoolExecutor(1) as pool, daemon.client() as creator:
        creating = pool.submit(creator.post, "/hostgroup/sbx/nodes", params={"wait": "agent", "timeout": "4m"},
                               json={"hostname": "race-1"})
        deadline = time.monotonic() + 60
        while "race-1" not in {n["hostname"] for n in api.get("/nodes").json()} and time.monotonic() < deadline:
            time.sleep(0.02)
        deleted = api.delete("/hostgroup/sbx/nodes/race-1")
        created = creating.result(timeout=300)
    assert deleted.status_code == 200, deleted.text
    assert created.status_code in (201, 409, 503, 500) and created.json().get("code") != "internal_error", created.text
    assert footprint(daemon) == before
