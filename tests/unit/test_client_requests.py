"""Each client method sends the request the API expects and reads the answer into its type,
the sync and the async client alike (httpx.MockTransport: no daemon)."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

import pytest

from slicer.client import _models as m
from tests.unit.client_harness import TOKEN, answering, run

FLAVOURS = ["sync", "async"]
NODE = {"hostname": "vm-1", "hostgroup": "vm", "ip": "192.168.137.2", "ram_bytes": 1 << 30, "cpus": 1,
        "created_at": "2025-01-01T00:00:00Z", "tags": ["a"], "arch": "x86_64", "status": "Running",
        "persistent": False, "kind": "service"}
CREATED = {"hostname": "sbx-1", "hostgroup": "sbx", "ip": "10.0.0.2", "created_at": "now", "arch": "x86_64"}
SECRET = {"name": "tok", "size": 6, "permissions": "0600", "uid": 0, "gid": 0, "mod_time": "t", "modified_at": "t"}
COMMIT = {"commit_id": "cmt-0123456789abcdef", "source_hostname": "vm-1", "source_host_group": "vm",
          "created_at": "t", "mode": "disk", "tags": [], "labels": {}, "cache_key": ""}
FORK = {"hostname": "vm-2", "source_hostname": "vm-1", "status": "forked", "mode": "memory", "persistent": False}
TEMPLATE = {"name": "vm-abc-1", "hostgroup": "vm", "cpus": 1, "ram_bytes": 1, "created_at": "t", "retired": False,
            "clones": 0, "state_bytes": 1, "disk_bytes": 2}


@dataclass
class Case:
    """``method(*args, **kwargs)`` must send ``verb path`` with ``query`` (and ``body``), and read
    ``answer`` into ``parsed`` (a type, or a list of it)."""

    method: str
    args: tuple
    verb: str
    path: str
    query: list[tuple[str, str]] = field(default_factory=list)
    body: Any = None
    answer: Any = None
    parsed: Any = None
    kwargs: dict = field(default_factory=dict)
    text: str | None = None

    def __str__(self) -> str:
        return self.method


CASES = [
    Case("info", (), "GET", "/info", answer={"version": "1", "hypervisor": "qemu"}, parsed=m.Info),
    Case("host_groups", (), "GET", "/hostgroup",
         answer=[{"name": "vm", "count": 1, "ram_bytes": 1, "cpus": 1, "gpu_count": 0, "arch": "x86_64"}],
         parsed=[m.HostGroup]),
    Case("nodes", (), "GET", "/nodes", kwargs={"tag": "ci"}, query=[("tag", "ci")], answer=[NODE], parsed=[m.Node]),
    Case("nodes", ("vm",), "GET", "/hostgroup/vm/nodes", kwargs={"tag_prefix": "c"}, query=[("tag_prefix", "c")],
         answer=[NODE], parsed=[m.Node]),
    Case("get_node", ("vm-1",), "GET", "/vm/vm-1", answer={**NODE, "network": {"mode": "bridge"}}, parsed=m.Node),
    Case("create_node", ("sbx",), "POST", "/hostgroup/sbx/nodes", kwargs={"wait": "agent", "tags": ["x"], "cpus": None},
         query=[("wait", "agent")], body={"tags": ["x"]}, answer=CREATED, parsed=m.CreatedNode),
    Case("delete_node", ("sbx", "sbx-1"), "DELETE", "/hostgroup/sbx/nodes/sbx-1",
         answer={"message": "Node deleted", "disk_removed": "false"}, parsed=dict),
    Case("logs", ("vm-1",), "GET", "/vm/vm-1/logs", kwargs={"lines": 5}, query=[("lines", "5")],
         answer={"hostname": "vm-1", "lines": 5, "content": "boot"}, parsed=str),
    Case("health", ("vm-1",), "GET", "/vm/vm-1/health",
         answer={"hostname": "vm-1", "agent_uptime": 1, "agent_version": "v", "system_uptime": 2}, parsed=m.Health),
    Case("pause", ("vm-1",), "POST", "/vm/vm-1/pause", text="vm-1 paused\n", parsed=str),
    Case("resume", ("vm-1",), "POST", "/vm/vm-1/resume", text="vm-1 resumed\n", parsed=str),
    Case("shutdown", ("vm-1",), "POST", "/vm/vm-1/shutdown", query=[("action", "shutdown")], text="ok\n", parsed=str),
    Case("suspend", ("vm-1",), "POST", "/vm/vm-1/suspend", text="vm-1 suspended\n", parsed=str),
    Case("restore", ("vm-1",), "POST", "/vm/vm-1/restore", query=[("wait", "agent")], text="restored\n", parsed=str),
    Case("relaunch", ("vm-1",), "POST", "/vm/vm-1/relaunch", kwargs={"timeout": "2m"},
         query=[("wait", "agent"), ("timeout", "2m")], answer=CREATED, parsed=m.CreatedNode),
    Case("tags", ("vm-1",), "GET", "/vm/vm-1/tags", answer={"hostname": "vm-1", "tags": ["a"]}, parsed=m.Tags),
    Case("tags", ("vm-1",), "PATCH", "/vm/vm-1/tags", kwargs={"add": ["b"], "remove": ["a"]},
         body={"add": ["b"], "remove": ["a"]}, answer={"hostname": "vm-1", "tags": ["b"]}, parsed=m.Tags),
    Case("commit", ("vm-1",), "POST", "/vm/vm-1/commit", kwargs={"cache_key": "k"}, body={"cache_key": "k"},
         answer={"hostname": "vm-1", "commit_id": COMMIT["commit_id"], "status": "committed"}, parsed=m.Commit),
    Case("commits", (), "GET", "/vm/commits", kwargs={"tags": ["a", "b"], "source": "vm-1"},
         query=[("tag", "a"), ("tag", "b"), ("source", "vm-1")], answer=[COMMIT], parsed=[m.Commit]),
    Case("delete_commit", (COMMIT["commit_id"],), "DELETE", f"/vm/commits/{COMMIT['commit_id']}",
         answer={"commit_id": COMMIT["commit_id"], "status": "deleted"}, parsed=type(None)),
    Case("fork_commit", (COMMIT["commit_id"],), "POST", f"/vm/commits/{COMMIT['commit_id']}/fork",
         kwargs={"tags": ["t"]}, query=[("wait", "agent")], body={"tags": ["t"]}, answer=FORK, parsed=m.Fork),
    Case("fork", ("vm-1",), "POST", "/vm/vm-1/fork", kwargs={"count": 2}, query=[("wait", "agent")],
         body={"count": 2}, answer=[FORK, FORK], parsed=[m.Fork]),
    Case("storage", (), "GET", "/storage", answer={"templates": [TEMPLATE], "nodes": [], "commits": [],
                                                    "kept_disks": [], "total_bytes": 3}, parsed=m.Storage),
    Case("build_template", ("vm",), "POST", "/hostgroup/vm/template", answer=TEMPLATE, parsed=m.TemplateUsage),
    Case("stats", ("vm-1",), "GET", "/node/vm-1/stats", answer={**NODE, "snapshot": {"x": 1}}, parsed=m.NodeStats),
    Case("stats", (), "GET", "/nodes/stats", answer=[{**NODE, "error": "no"}], parsed=[m.NodeStats]),
    Case("exec_background", ("vm-1", "make"), "POST", "/vm/vm-1/exec", kwargs={"args": ["-j2"], "uid": 1000},
         query=[("cmd", "make"), ("args", "-j2"), ("uid", "1000"), ("background", "true")],
         answer={"exec_id": "e1", "pid": 9}, parsed=m.BackgroundExec),
    Case("background_execs", ("vm-1",), "GET", "/vm/vm-1/exec", answer=[{"exec_id": "e1"}],
         parsed=[m.BackgroundExec]),
    Case("background_info", ("vm-1", "e1"), "GET", "/vm/vm-1/exec/e1", answer={"exec_id": "e1", "running": True},
         parsed=m.BackgroundExec),
    Case("background_kill", ("vm-1", "e1"), "POST", "/vm/vm-1/exec/e1/kill", kwargs={"signal": "KILL"},
         body={"signal": "KILL", "grace_ms": 5000}, answer={"killed": True}, parsed=dict),
    Case("background_wait", ("vm-1", "e1"), "GET", "/vm/vm-1/exec/e1/wait-exit", kwargs={"timeout": 5},
         query=[("timeout", "5")], answer={"exit_code": 2}, parsed=dict),
    Case("background_delete", ("vm-1", "e1"), "DELETE", "/vm/vm-1/exec/e1", answer={}, parsed=dict),
    Case("readdir", ("vm-1", "/root"), "GET", "/vm/vm-1/fs/readdir", query=[("path", "/root")],
         answer=[{"name": "x"}], parsed=[dict]),
    Case("stat", ("vm-1", "/root"), "GET", "/vm/vm-1/fs/stat", query=[("path", "/root")], answer={"mode": "0700"},
         parsed=dict),
    Case("mkdir", ("vm-1", "/a/b"), "POST", "/vm/vm-1/fs/mkdir", kwargs={"recursive": True, "mode": "0755"},
         body={"path": "/a/b", "recursive": True, "mode": "0755"}, answer={"path": "/a/b"}, parsed=dict),
    Case("remove", ("vm-1", "/a"), "DELETE", "/vm/vm-1/fs/remove", kwargs={"recursive": True},
         query=[("path", "/a"), ("recursive", "true")], answer={}, parsed=dict),
    Case("secrets", (), "GET", "/secrets", answer=[SECRET], parsed=[m.Secret]),
    Case("create_secret", ("tok", b"hunter"), "POST", "/secrets",
         body={"name": "tok", "data": base64.b64encode(b"hunter").decode(), "permissions": "0600", "uid": 0,
               "gid": 0}, answer=SECRET, parsed=m.Secret),
    Case("update_secret", ("tok",), "PATCH", "/secrets/tok", kwargs={"data": b"x", "uid": 5},
         body={"uid": 5, "data": "eA=="}, answer=SECRET, parsed=m.Secret),
    Case("delete_secret", ("tok",), "DELETE", "/secrets/tok", text="", parsed=type(None)),
]


def check_parsed(result: Any, parsed: Any) -> None:
    if isinstance(parsed, list):
        assert isinstance(result, list) and result, result
        assert all(type(x) is parsed[0] for x in result), result
    else:
        assert type(result) is parsed, result


@pytest.mark.parametrize("case", CASES, ids=[f"{c.method}-{i}" for i, c in enumerate(CASES)])
def test_request_and_answer(case: Case) -> None:
    handler = answering(text=case.text) if case.text is not None else answering(payload=case.answer)
    for flavour in FLAVOURS:
        result, seen = run(flavour, case.method, *case.args, handler=handler, **case.kwargs)
        request = seen.last
        assert (flavour, request.method, request.url.path) == (flavour, case.verb, case.path)
        assert list(request.url.params.multi_items()) == case.query
        assert seen.body() == case.body
        assert request.headers["authorization"] == f"Bearer {TOKEN}"
        check_parsed(result, case.parsed)
