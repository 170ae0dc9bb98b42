"""Tags, commits, cold forks of commits and live forks of running VMs, against real VMs."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from slicer.client import SlicerClient
from tests.conftest import Daemon, qemu_pids, ticker
from tests.test_snapshots import IDENTITY, create, run

pytestmark = pytest.mark.vm

CONFIG = """
config:
  host_groups:
  - name: sbx
    count: 0
    vcpu: 1
    ram_mb: 256
    storage_size: 1G
  - name: tiny
    count: 0
    vcpu: 1
    ram_mb: 256
    storage_size: 1G
    network: {gateway: 192.168.141.1/24, range: 192.168.141.10-192.168.141.12}
  api:
    bind_address: 127.0.0.1
    port: PORT
"""
COUNTER = ticker("/tmp/counter")  # a line a tick: count them


@pytest.fixture(scope="module")
def fork_daemon(guest_image):
    d = Daemon(CONFIG).start()
    yield d
    d.cleanup()


def identity(api, h: str) -> list[str]:
    return run(api, h, IDENTITY).split("\n")[:4]  # hostname, machine-id, address, SSH host key


def test_tags_change_at_once_and_filter_lists(fork_daemon):
    api = fork_daemon.client()
    h = create(api, tags=["a", "b"])
    try:
        assert api.get(f"/vm/{h}/tags").json() == {"hostname": h, "tags": ["a", "b"]}
        r = api.patch(f"/vm/{h}/tags", json={"add": ["c", "a"], "remove": ["b"]})
        assert r.status_code == 200 and r.json()["tags"] == ["a", "c"], r.text
        assert [n["hostname"] for n in api.get("/nodes", params={"tag": "c"}).json()] == [h]
        assert api.get("/nodes", params={"tag": "b"}).json() == []
        assert api.patch(f"/vm/{h}/tags", json={"replace": ["z"]}).json()["tags"] == ["z"]
        assert api.get(f"/vm/{h}").json()["tags"] == ["z"]
        for bad in ({"replace": ["x"], "add": ["y"]}, {"add": [""]}, {"add": ["a\nb"]}, {"add": "a"},
                    {"name": "friendly"}, {"extra": 1}):
            r = api.patch(f"/vm/{h}/tags", json=bad)
            assert r.status_code == 400 and set(r.json()) == {"error", "code"}, (bad, r.text)
        assert api.get(f"/vm/{h}/tags").json()["tags"] == ["z"], "a refused change changes nothing"
        assert api.get("/vm/ghost-9/tags").status_code == 404
    finally:
        api.delete(f"/hostgroup/sbx/nodes/{h}")


def test_commit_then_cold_fork_and_the_delete_rules(fork_daemon):
    api = fork_daemon.client()
    src = create(api, persistent=True, tags=["src"])
    child = None
    try:
        run(api, src, "echo committed > /root/state && sync")
        src_identity = identity(api, src)
        r = api.post(f"/vm/{src}/commit")
        assert r.status_code == 409 and r.json()["code"] == "running", r.text
        sandbox = create(api)
        try:
            api.post(f"/vm/{sandbox}/shutdown", params={"action": "shutdown"})
            r = api.post(f"/vm/{sandbox}/commit")
            assert r.status_code in (404, 409), r.text  # not persistent (or already gone with its shutdown)
        finally:
            api.delete(f"/hostgroup/sbx/nodes/{sandbox}")
        assert api.post(f"/vm/{src}/shutdown", params={"action": "shutdown"}).status_code == 200
        deadline = time.monotonic() + 60
        while api.get(f"/vm/{src}").json()["status"] != "Stopped" and time.monotonic() < deadline:
            time.sleep(0.3)

        r = api.post(f"/vm/{src}/commit", json={"tags": ["base"], "labels": {"k": "v"}, "cache_key": "deps-1"})
        assert r.status_code == 200, r.text
        commit = r.json()
        cid = commit["commit_id"]
        assert commit == {"hostname": src, "commit_id": cid, "status": "committed", "parent_status": "stopped",
                          "mode": "disk", "tags": ["base"], "labels": {"k": "v"}, "cache_key": "deps-1"}
        accounted = api.get("/storage").json()["commits"]
        assert [c["commit_id"] for c in accounted] == [cid] and accounted[0]["disk_bytes"] > 0
        listed = api.get("/vm/commits", params={"cache_key": "deps-1"}).json()
        assert [c["commit_id"] for c in listed] == [cid] and listed[0]["source_hostname"] == src
        assert api.get("/vm/commits", params={"tag": "nope"}).json() == []
        assert api.get("/vm/commits", params={"source": src}).json()[0]["source_host_group"] == "sbx"

        r = api.post(f"/vm/commits/{cid}/fork", params={"wait": "agent", "timeout": "4m"},
                     json={"tags": ["job=1"], "persistent": False})
        assert r.status_code == 200, r.text
        fork = r.json()
        child = fork["hostname"]
        assert fork["source_hostname"] == src and fork["commit_id"] == cid and fork["status"] == "forked"
        assert fork["child_status"] == "running" and fork["mode"] == "disk" and fork["persistent"] is False
        assert run(api, child, "cat /root/state") == "committed\n", "the child has the committed files"
        mine = identity(api, child)
        assert all(a != b for a, b in zip(mine, src_identity, strict=True)), (mine, src_identity)
        described = api.get(f"/vm/{child}").json()
        assert described["parent_commit_id"] == cid and set(described["tags"]) == {"base", "job=1"}

        r = api.delete(f"/vm/commits/{cid}")
        assert r.status_code == 409 and r.json()["code"] == "commit_in_use" and child in r.json()["error"]
        # A crash keeps the commit and the child (running on).
        fork_daemon.stop(signal.SIGKILL)
        fork_daemon.start()
        api = fork_daemon.client()
        assert [c["commit_id"] for c in api.get("/vm/commits").json()] == [cid]
        assert run(api, child, "cat /root/state") == "committed\n"
        # The source goes on on top of its commit.
        r = api.post(f"/vm/{src}/relaunch", params={"wait": "agent", "timeout": "4m"})
        assert r.status_code == 200, r.text
        assert run(api, src, "cat /root/state") == "committed\n"
        assert api.get(f"/vm/{src}").json()["parent_commit_id"] == cid

        for bad in ("..", "a..b", "x%00y", "%2e%2e"):
            r = api.delete(f"/vm/commits/{bad}")
            assert r.status_code in (400, 404), (bad, r.text)
            assert set(r.json()) == {"error", "code"}
        assert api.delete("/vm/commits/cmt-0000000000000000").status_code == 404
        assert api.post("/vm/commits/cmt-0000000000000000/fork").status_code == 404
        r = api.post(f"/vm/commits/{cid}/fork", json={"vcpu": 0})
        assert r.status_code == 400

        assert api.delete(f"/hostgroup/sbx/nodes/{child}").status_code == 200
        child = None
        assert api.delete(f"/vm/commits/{cid}").status_code == 409, "the source still reads through it"
        assert api.delete(f"/hostgroup/sbx/nodes/{src}").status_code == 200  # its disk is kept
        r = api.delete(f"/vm/commits/{cid}")
        assert r.status_code == 200 and r.json() == {"commit_id": cid, "status": "deleted"}, r.text
        assert not (fork_daemon.data_dir / "commits" / cid).exists()
        kept = [k["disk"] for k in api.get("/storage").json()["kept_disks"] if k["disk"].endswith(f"{src}.qcow2")]
        assert kept, "the source's disk is kept"
        chain = subprocess.run(["qemu-img", "info", "--backing-chain", "-U", kept[0]], capture_output=True,
                               text=True, check=True).stdout
        assert cid not in chain, "rebased off the deleted commit: it reads through what is left"
    finally:
        for h in (child, src):
            if h:
                api.delete(f"/hostgroup/sbx/nodes/{h}")


def test_live_fork_copies_processes_memory_and_files(fork_daemon):
    api = fork_daemon.client()
    src = create(api, tags=["src"])
    copies: list[str] = []
    try:
        assert api.post(f"/vm/{src}/exec", params={"cmd": COUNTER, "background": "true"}).status_code == 201
        run(api, src, "echo in-memory > /dev/shm/marker && echo on-disk > /root/marker && sync")
        time.sleep(1)
        r = api.post(f"/vm/{src}/fork", params={"wait": "agent"}, json={"count": 3, "tags": ["try"]})
        assert r.status_code == 201, r.text
        copies = [c["hostname"] for c in r.json()]
        assert len(set(copies)) == 3 and src not in copies
        assert all(c["source_hostname"] == src and c["child_status"] == "running" for c in r.json())
        identities = [identity(api, h) for h in [src, *copies]]
        for i, field in enumerate(("hostname", "machine-id", "address", "SSH host key")):
            assert len({ident[i] for ident in identities}) == 4, (field, identities)
        for h in [src, *copies]:
            assert run(api, h, "cat /dev/shm/marker /root/marker") == "in-memory\non-disk\n", h
            first = int(run(api, h, "wc -l < /tmp/counter"))
            time.sleep(0.6)
            assert int(run(api, h, "wc -l < /tmp/counter")) > first, f"{h}: the counting process runs on"
            assert abs(float(run(api, h, "date +%s.%N")) - time.time()) < 30, f"{h}: its clock is right"
        # Each is its own machine from here on.
        run(api, copies[0], "echo only-here > /root/mine && sync")
        assert run(api, copies[1], "cat /root/mine 2>/dev/null || echo absent") == "absent\n"
        assert run(api, src, "cat /root/mine 2>/dev/null || echo absent") == "absent\n"
        assert set(api.get(f"/vm/{copies[0]}").json()["tags"]) == {"src", "try"}

        for body, code in (({"count": 0}, 400), ({"count": 33}, 400), ({"count": 1, "persistent": True}, 400),
                           ({"count": "2"}, 400)):
            r = api.post(f"/vm/{src}/fork", json=body)
            assert r.status_code == code and set(r.json()) == {"error", "code"}, (body, r.text)
        assert api.post("/vm/ghost-9/fork", json={}).status_code == 404
        api.post(f"/vm/{src}/pause")
        api.post(f"/vm/{src}/suspend")
        r = api.post(f"/vm/{src}/fork", json={"count": 1})
        assert r.status_code == 409 and r.json()["code"] == "suspended", r.text
        assert api.post(f"/vm/{src}/restore", params={"wait": "agent"}).status_code == 200

        # A restart keeps the copies (same QEMUs) and they still work.
        pids = set(qemu_pids(str(fork_daemon.data_dir)))
        fork_daemon.stop(signal.SIGKILL)
        fork_daemon.start()
        api = fork_daemon.client()
        assert set(qemu_pids(str(fork_daemon.data_dir))) == pids
        for h in copies:
            assert run(api, h, "cat /dev/shm/marker") == "in-memory\n"
    finally:
        for h in [*copies, src]:
            api.delete(f"/hostgroup/sbx/nodes/{h}")
    templates = api.get("/storage").json()["templates"]
    assert not any("-fork-" in t["name"] for t in templates), "the snapshot goes with its last copy"


def test_a_fork_that_fails_part_way_leaves_nothing_and_the_source_running(fork_daemon):
    """Group "tiny" has three addresses: the source takes one, so the third of three copies
    finds none. The two made go again; the source runs on; the snapshot goes."""
    api = fork_daemon.client()
    src = create(api, group="tiny")
    try:
        before = {n["hostname"] for n in api.get("/nodes").json()}
        r = api.post(f"/vm/{src}/fork", params={"wait": "agent"}, json={"count": 3})
        assert r.status_code == 409 and r.json()["code"] == "no_free_address", r.text
        assert {n["hostname"] for n in api.get("/nodes").json()} == before
        assert set(qemu_pids(str(fork_daemon.data_dir))) == {api.get(f"/vm/{src}").json()["vmm"]["pid"]}
        assert run(api, src, "echo alive") == "alive\n"
        assert not any("-fork-" in t["name"] for t in api.get("/storage").json()["templates"])
        assert not list((fork_daemon.data_dir / "templates").glob(".building-*"))
        # Two copies fit, through the SDK and the CLI.
        with SlicerClient(fork_daemon.url, token=fork_daemon.token) as c:
            copies = c.fork(src, count=1, tags=["sdk"])
            assert c.tags(copies[0].hostname).tags == ["sdk"]
            assert c.tags(copies[0].hostname, add=["more"]).tags == ["sdk", "more"]
        cli = [sys.executable, "-m", "slicer", "vm", "fork", src, "--count", "1", "--json",
               "--url", fork_daemon.url, "--token", fork_daemon.token or ""]
        done = subprocess.run(cli, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert "hostname" in done.stdout
        for n in api.get("/nodes").json():
            if n["hostgroup"] == "tiny" and n["hostname"] != src:
                assert run(api, n["hostname"], "echo copy") == "copy\n"
                api.delete(f"/hostgroup/tiny/nodes/{n['hostname']}")
    finally:
        api.delete(f"/hostgroup/tiny/nodes/{src}")
