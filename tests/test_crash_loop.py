"""The daemon killed (SIGKILL) at random points of create, delete, suspend, restore, template
build, live fork, shutdown, commit and relaunch, over and over: after each restart no QEMU runs
without a record, no record lacks what it needs, and nothing half-written is left in the data dir.

The seed is printed; ``SLICER_CRASH_SEED=N`` replays a run, ``SLICER_CRASH_ROUNDS`` sets its length.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from slicer.core.templates import BUILD_TIMEOUT
from tests.conftest import Daemon, qemu_pids, wait_agent

pytestmark = [pytest.mark.vm, pytest.mark.long]

CONFIG = """
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
RUNNING = {"Running", "Paused", "Starting"}


def qemu_hosts(data_dir: Path) -> dict[str, int]:
    """Hostname → pid of every QEMU of this data dir (its run dir names it)."""
    hosts = {}
    for pid in qemu_pids(str(data_dir)):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue  # ended meanwhile
        run_dir = next(e for e in env if e.startswith(b"SLICER_RUN_DIR=")).split(b"=", 1)[1].decode()
        hosts[Path(run_dir).name] = pid
    return hosts


def check_consistent(d: Daemon, api: httpx.Client) -> list[dict]:
    """Every invariant a restart must restore; returns the nodes."""
    nodes = api.get("/nodes").json()
    by_name = {n["hostname"]: n for n in nodes}
    deadline = time.monotonic() + 60
    while any(n["status"] == "Starting" for n in nodes) and time.monotonic() < deadline:
        time.sleep(0.5)  # a restored VM resumes, an adopted one reconnects
        nodes = api.get("/nodes").json()
        by_name = {n["hostname"]: n for n in nodes}
    qemus = qemu_hosts(d.data_dir)
    running = {h for h, n in by_name.items() if n["status"] in RUNNING}
    assert set(qemus) == running, f"QEMUs {sorted(qemus)} but running records {sorted(running)}"
    for h in running:
        wait_agent(api, h, timeout=90)
        assert api.get(f"/vm/{h}").json()["vmm"]["pid"] == qemus[h]
    data = d.data_dir
    # A deleted persistent VM's disk is kept (as Slicer does: "disk_removed": "false"), and
    # shown by /storage; every stopped persistent VM must have its disk.
    disks = {p.stem for p in (data / "disks").glob("*.qcow2")}  # beside each: its .backing record
    persistent = {h for h, n in by_name.items() if n["persistent"]}
    kept = {Path(k["disk"]).stem for k in api.get("/storage").json()["kept_disks"]}
    assert kept == disks - persistent, f"disks {disks}, persistent VMs {persistent}, kept {kept}"
    assert not any(p.name.endswith((".tmp", ".part")) for p in (data / "disks").iterdir())
    for h in persistent:
        assert h in disks or by_name[h]["status"] in RUNNING, f"{h}: a stopped persistent VM without its disk"
    states = {p.name for p in (data / "snapshots").iterdir()}
    suspended = {f"{h}.state" for h, n in by_name.items() if n["status"] == "Suspended"}
    assert states == suspended, f"saved states {states} for suspended VMs {suspended}"
    run_root = (data / "run").resolve()
    run_dirs = {p.name for p in run_root.iterdir() if p.is_dir()}
    assert run_dirs <= set(by_name), f"run dirs without a record: {run_dirs - set(by_name)}"
    for tpl in (data / "templates").iterdir():
        assert not tpl.name.startswith(".") and (tpl / "meta.json").exists(), f"unfinished template {tpl.name}"
    commits = {c["commit_id"] for c in api.get("/vm/commits").json()}
    dirs = {p.name for p in (data / "commits").iterdir()}
    assert dirs == commits, f"commit dirs {dirs} for commits {commits}"
    for c in commits:  # each is frozen: no VM writes to it any more
        frozen = data / "commits" / c / "disk.qcow2"
        assert not any((data / "disks" / f"{h}.qcow2").exists()
                       and (data / "disks" / f"{h}.qcow2").samefile(frozen) for h in by_name), c
    return nodes


def test_killed_at_random_points_leaves_nothing_inconsistent(guest_image):
    seed = int(os.environ.get("SLICER_CRASH_SEED") or time.time_ns() % 1_000_000)
    rounds = int(os.environ.get("SLICER_CRASH_ROUNDS", "12"))
    print(f"crash loop seed {seed}, {rounds} rounds")
    rng = random.Random(seed)
    d = Daemon(CONFIG, template_cache=False).start()  # it kills template builds too
    done: list[str] = []
    try:
        api = d.client()
        for i in range(rounds):
            nodes = {n["hostname"]: n for n in api.get("/nodes").json()}
            running = [h for h, n in nodes.items() if n["status"] == "Running"]
            suspended = [h for h, n in nodes.items() if n["status"] == "Suspended"]
            stopped = [h for h, n in nodes.items() if n["status"] == "Stopped" and n["persistent"]]
            templates = api.get("/storage").json()["templates"]
            choices: list[tuple[str, str, str, dict, float]] = [
                ("create", "POST", "/hostgroup/sbx/nodes", {"json": {}}, 3.0),
                ("create persistent", "POST", "/hostgroup/sbx/nodes", {"json": {"persistent": True}}, 8.0),
            ]
            if i < 2:
                choices = [("template build", "POST", "/hostgroup/sbx/template", {}, 12.0)]
            elif not templates:  # the builds were cut short: one that finishes, for the clones
                r = api.post("/hostgroup/sbx/template", timeout=BUILD_TIMEOUT + 60)  # the daemon's own error first
                assert r.status_code == 200, r.text
            for h in running:
                choices.append(("delete", "DELETE", f"/hostgroup/sbx/nodes/{h}", {}, 1.5))
                choices.append(("suspend", "POST", f"/vm/{h}/suspend", {}, 2.5))
                choices.append(("fork", "POST", f"/vm/{h}/fork", {"json": {"count": 2}}, 5.0))
                if nodes[h]["persistent"]:
                    choices.append(("shutdown", "POST", f"/vm/{h}/shutdown", {"params": {"action": "shutdown"}}, 3.0))
            for h in stopped:
                choices.append(("commit", "POST", f"/vm/{h}/commit", {"json": {}}, 0.5))
                choices.append(("relaunch", "POST", f"/vm/{h}/relaunch", {}, 6.0))
            for h in suspended:
                choices.append(("restore", "POST", f"/vm/{h}/restore", {}, 2.0))
            if len(running) + len(suspended) >= 4:  # keep the machine's load bounded
                choices = [c for c in choices if not c[0].startswith(("create", "fork"))]
            what, method, path, kwargs, span = rng.choice(choices)
            delay = rng.uniform(0, span)
            done.append(f"{what} {path} killed after {delay:.2f}s")

            def request(method=method, path=path, kwargs=kwargs) -> None:
                try:
                    with d.client() as c:
                        c.request(method, path, timeout=120, **kwargs)
                except httpx.HTTPError:
                    pass  # the daemon was killed under it

            worker = threading.Thread(target=request)
            worker.start()
            time.sleep(delay)
            d.stop(signal.SIGKILL)
            worker.join()
            d.start()
            api = d.client()
            check_consistent(d, api)
        # Everything that survived still works and goes away cleanly.
        for n in check_consistent(d, api):
            h = n["hostname"]
            if n["status"] == "Suspended":
                assert api.post(f"/vm/{h}/restore", params={"wait": "agent"}).status_code == 200
            elif n["status"] not in RUNNING:
                assert api.post(f"/vm/{h}/relaunch", params={"wait": "agent"}).status_code == 200
            r = api.post(f"/vm/{h}/exec", params={"cmd": "echo ok", "buffered": "true"})
            assert r.status_code == 200 and r.json()["stdout"] == "ok\n", r.text
            assert api.delete(f"/hostgroup/sbx/nodes/{h}").status_code == 200
        for c in reversed(api.get("/vm/commits").json()):  # a later commit sits on an earlier one
            r = api.delete(f"/vm/commits/{c['commit_id']}")
            assert r.status_code == 200, r.text
        assert qemu_hosts(d.data_dir) == {}
        assert not any((d.data_dir / "commits").iterdir())
        assert not any("-fork-" in t["name"] for t in api.get("/storage").json()["templates"])
        assert not any((d.data_dir / "snapshots").iterdir())
        assert not any(p.is_dir() for p in (d.data_dir / "run").resolve().iterdir())
    except BaseException:
        print(d.log())
        d.keep_logs()  # its VMs' console logs too (the failure is counted only after this test ends)
        raise
    finally:
        print("\n".join(done))
        d.cleanup()
