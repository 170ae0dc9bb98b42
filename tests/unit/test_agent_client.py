"""The host's AgentClient (slicer.core.agent): one method per endpoint, each sending the table's
method and path; the agent's errors mapped as before. No channel: httpx's MockTransport answers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest

from slicer.agent.protocol import ENDPOINTS
from slicer.core.agent import AgentClient
from slicer.core.errors import AgentUnreachable, SlicerError

# The client's method for each endpoint whose name is not itself a method name.
METHOD_OF = {"exec": "open_exec"}


class FakeChannel:
    def disconnect(self) -> None:
        pass


def client_answering(answer: Callable[[httpx.Request], httpx.Response], seen: list[httpx.Request]) -> AgentClient:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answer(request)

    client = AgentClient(FakeChannel())  # type: ignore[arg-type]
    client.http = httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://agent")
    return client


def answer_json(status: int, value: object) -> httpx.Response:
    """A response streamed like the channel's (a Response made with ``json=`` counts as read already)."""
    return httpx.Response(status, headers={"content-type": "application/json"},
                          stream=httpx.ByteStream(json.dumps(value).encode()))


def ok(request: httpx.Request) -> httpx.Response:
    return answer_json(200, [] if request.method == "GET" and request.url.path in ("/exec", "/fs/readdir")
                       else {"ok": True})


async def chunks():
    yield b"data"


# name of the endpoint, the call, and what the request must carry besides its method and path
CASES: list[tuple[str, Callable[[AgentClient], Any], dict | list, dict | None]] = [
    ("health", lambda c: c.health(), {}, None),
    ("stats", lambda c: c.stats(), {}, None),
    ("power", lambda c: c.power("reboot"), {"action": "reboot"}, None),
    ("exec", lambda c: c.open_exec([("cmd", "ls"), ("args", "-l")]), {"cmd": "ls", "args": "-l"}, None),
    ("list_execs", lambda c: c.list_execs(), {}, None),
    ("exec_status", lambda c: c.exec_status("ex_1"), {}, None),
    ("reap_exec", lambda c: c.reap_exec("ex_1"), {}, None),
    ("exec_logs", lambda c: c.exec_logs("ex_1", [("follow", "true")]), {"follow": "true"}, None),
    ("kill_exec", lambda c: c.kill_exec("ex_1", "KILL", 10), {}, {"signal": "KILL", "grace_ms": 10}),
    ("wait_exit", lambda c: c.wait_exit("ex_1", 5), {"timeout": "5"}, None),
    ("cp_in", lambda c: c.cp_in([("path", "/f"), ("mode", "binary")], chunks()), {"path": "/f", "mode": "binary"},
     None),
    ("cp_out", lambda c: c.cp_out({"path": "/f", "mode": "tar"}), {"path": "/f", "mode": "tar"}, None),
    ("readdir", lambda c: c.readdir("/etc", 1000), {"path": "/etc", "uid": "1000"}, None),
    ("stat", lambda c: c.stat("/etc/hosts"), {"path": "/etc/hosts"}, None),
    ("mkdir", lambda c: c.mkdir("/d", True, "0700"), {}, {"path": "/d", "recursive": True, "mode": "0700"}),
    ("remove", lambda c: c.remove("/d", True, 0), {"path": "/d", "recursive": "true", "uid": "0"}, None),
    ("watch", lambda c: c.watch([("paths", "/tmp"), ("paths", "/srv")]), [("paths", "/tmp"), ("paths", "/srv")],
     None),
    ("identity", lambda c: c.identity({"seed": "AA==", "hostname": "vm-2"}), {}, {"seed": "AA==", "hostname": "vm-2"}),
    ("settle", lambda c: c.settle(60), {}, None),
    ("put_secrets", lambda c: c.put_secrets({"k": {"data": "", "permissions": "0600", "uid": 0, "gid": 0}}), {},
     {"k": {"data": "", "permissions": "0600", "uid": 0, "gid": 0}}),
    ("put_ssh_keys", lambda c: c.put_ssh_keys(["ssh-ed25519 AAAA"]), {}, {"keys": ["ssh-ed25519 AAAA"]}),
    ("userdata", lambda c: c.userdata("#!/bin/sh\ntrue\n"), {}, {"script": "#!/bin/sh\ntrue\n"}),
    ("put_ca", lambda c: c.put_ca("-----BEGIN CERTIFICATE-----\n"), {}, None),  # a PEM body, not JSON
]


def test_every_endpoint_has_a_method_and_a_case():
    for name in ENDPOINTS:
        assert callable(getattr(AgentClient, METHOD_OF.get(name, name), None)), name
    assert {case[0] for case in CASES} | {"shell"} == set(ENDPOINTS)


@pytest.mark.parametrize(("name", "call", "query", "body"), CASES, ids=[case[0] for case in CASES])
def test_method_sends_the_tables_method_and_path(name, call, query, body):
    seen: list[httpx.Request] = []

    async def run() -> None:
        client = client_answering(ok, seen)
        result = await call(client)
        if isinstance(result, httpx.Response):
            await result.aclose()

    asyncio.run(run())
    endpoint = ENDPOINTS[name]
    (request,) = seen
    expected_path = endpoint.url(**{p: "ex_1" for p in endpoint.params})
    assert (request.method, request.url.path) == (endpoint.method, expected_path)
    sent = parse_qsl(request.url.query.decode())
    assert sent == (list(query.items()) if isinstance(query, dict) else query)
    if body is not None:
        assert json.loads(request.content) == body


def test_shell_opens_a_websocket_on_the_shell_path():
    targets: list[str] = []
    client = AgentClient(FakeChannel())  # type: ignore[arg-type]

    async def websocket(target: str) -> str:
        targets.append(target)
        return "ws"

    client.websocket = websocket  # type: ignore[method-assign]
    assert asyncio.run(client.shell([("uid", "1000"), ("shell", "/bin/sh")])) == "ws"
    assert targets == [ENDPOINTS["shell"].path + "?uid=1000&shell=%2Fbin%2Fsh"]


def error_of(status: int, body: dict) -> SlicerError:
    async def run() -> None:
        client = client_answering(lambda r: answer_json(status, body), [])
        await client.exec_status("ex_1")

    with pytest.raises(SlicerError) as e:
        asyncio.run(run())
    return e.value


@pytest.mark.parametrize(("status", "code", "seen_status", "seen_code"), [
    (400, "invalid_request", 400, "invalid_request"),
    (404, "not_found", 404, "not_found"),
    (410, "gone", 410, "gone"),
    (403, "permission_denied", 409, "permission_denied"),
    (503, "budget_exhausted", 503, "budget_exhausted"),
    (400, "bad_request", 502, "agent_error"),  # not a code the agent uses (any more)
    (404, "vm_not_found", 502, "agent_error"),  # the guest may not pose as the daemon
    (500, "invalid_request", 502, "agent_error"),
])
def test_agent_errors_pass_through_only_as_the_protocol_allows(status, code, seen_status, seen_code):
    err = error_of(status, {"error": "nope", "code": code})
    assert (err.status, err.code) == (seen_status, seen_code)


def test_health_that_is_not_ok_means_unreachable():
    async def run() -> None:
        client = client_answering(lambda r: answer_json(503, {}), [])
        await client.health()

    with pytest.raises(AgentUnreachable):
        asyncio.run(run())
