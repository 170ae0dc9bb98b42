"""The guest agent's HTTP app, built from the protocol's table and answered in-process.

Only handlers that read, or write under pytest's tmp_path, run here; exec, identity, secrets and a
real power action change the machine they run on and are tested on VMs (tests/test_*.py).
"""

from __future__ import annotations

import asyncio
import io
import os
import tarfile
import time
from collections.abc import Awaitable, Callable

import pytest

pytest.importorskip("aiohttp")

from aiohttp import web  # noqa: E402
from aiohttp.test_utils import TestClient, TestServer  # noqa: E402

from slicer.agent import http_provision, protocol, server  # noqa: E402
from slicer.agent.http_util import Context  # noqa: E402

Check = Callable[[TestClient], Awaitable[None]]


def answer(check: Check) -> None:
    """Run ``check`` against the app served in-process (a loopback TCP port of the test server)."""
    async def run() -> None:
        async with TestClient(TestServer(server.make_app(time.monotonic()))) as client:
            await check(client)
    asyncio.run(asyncio.wait_for(run(), 30))


async def expect_error(resp, status: int, code: str) -> None:
    assert resp.status == status, await resp.text()
    assert (await resp.json())["code"] == code


# --- wiring --------------------------------------------------------------------------------------

def test_every_endpoint_has_exactly_one_handler():
    handlers = server.collect(Context(time.monotonic()))
    assert set(handlers) == set(protocol.ENDPOINTS)
    assert all(callable(h) for h in handlers.values())


def test_an_endpoint_without_handler_stops_startup():
    areas = tuple(a for a in server.AREAS if a is not server.http_shell.handlers)
    with pytest.raises(server.ProtocolMismatch, match="without a handler: \\['shell'\\]"):
        server.make_app(time.monotonic(), areas)


def test_a_handler_without_endpoint_stops_startup():
    async def stray(request: web.Request) -> web.Response:
        return web.Response()
    areas = (*server.AREAS, lambda ctx: {"reboot_now": stray})
    with pytest.raises(server.ProtocolMismatch, match="reboot_now"):
        server.make_app(time.monotonic(), areas)


def test_two_handlers_for_one_endpoint_stop_startup():
    areas = (*server.AREAS, server.http_status.handlers)
    with pytest.raises(server.ProtocolMismatch, match="two handlers for the endpoint 'health'"):
        server.make_app(time.monotonic(), areas)


def test_the_app_routes_every_endpoint_and_nothing_else():
    app = server.make_app(time.monotonic())
    routed = {(r.method, r.resource.canonical) for r in app.router.routes() if r.method != "HEAD"}
    assert routed == {(e.method, e.path) for e in protocol.ENDPOINTS.values()}


# --- answers (read-only, or under tmp_path) ------------------------------------------------------

def test_health_answers_its_declared_shape():
    async def check(client: TestClient) -> None:
        resp = await client.get(protocol.ENDPOINTS["health"].path)
        assert resp.status == 200
        assert set(await resp.json()) == set(typing_keys(protocol.Health))
        assert (await client.head("/health")).status == 200
    answer(check)


def typing_keys(td) -> set[str]:
    return set(td.__annotations__)


def test_background_execs_start_empty_and_unknown_ids_are_not_found():
    async def check(client: TestClient) -> None:
        resp = await client.get(protocol.ENDPOINTS["list_execs"].path)
        assert resp.status == 200 and await resp.json() == []
        await expect_error(await client.get(protocol.ENDPOINTS["exec_status"].url(exec_id="ex_none")), 404,
                           "not_found")
        kill = protocol.ENDPOINTS["kill_exec"]
        await expect_error(await client.request(kill.method, kill.url(exec_id="ex_none"), json={}), 404, "not_found")
    answer(check)


def test_exec_without_cmd_is_an_invalid_request():
    async def check(client: TestClient) -> None:  # refused before anything is spawned
        await expect_error(await client.post("/exec", params={"args": "x"}), 400, "invalid_request")
        await expect_error(await client.post("/exec", params={"cmd": "true", "stdout": "maybe"}), 400,
                           "invalid_request")
    answer(check)


def test_power_refuses_an_unknown_action_as_invalid_request(monkeypatch):
    signalled = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: signalled.append((pid, sig)))  # never the host's init

    async def check(client: TestClient) -> None:
        await expect_error(await client.post("/power", params={"action": "explode"}), 400, "invalid_request")
        await asyncio.sleep(0.4)
    answer(check)
    assert signalled == []


def test_power_signals_pid_1_after_answering(monkeypatch):
    signalled = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: signalled.append((pid, sig)))
    monkeypatch.setattr(http_provision.runtime, "pid1_signal", lambda action: f"signal-for-{action}")

    async def check(client: TestClient) -> None:
        resp = await client.post("/power", params={"action": "reboot"})
        assert resp.status == 200 and await resp.json() == {"message": "reboot started"}
        await asyncio.sleep(0.5)
    answer(check)
    assert signalled == [(1, "signal-for-reboot")]


def test_provisioning_bodies_are_checked_before_anything_is_done():
    async def check(client: TestClient) -> None:
        await expect_error(await client.post("/userdata", json={"not": "a script"}), 400, "invalid_request")
        await expect_error(await client.post("/userdata", data=b"{not json"), 400, "invalid_request")
        await expect_error(await client.post("/identity", data=b"\xff"), 400, "invalid_request")
        await expect_error(await client.put("/ssh-keys", json=["a list, not an object"]), 400, "invalid_request")
        await expect_error(await client.put("/ca", data=b"not a certificate"), 400, "invalid_request")
        key = b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
        await expect_error(await client.put("/ca", data=key), 400, "invalid_request")
        resp = await client.put("/ca", data=b"x" * ((1 << 20) + 1))
        assert resp.status == 413
    answer(check)


def test_fs_stat_readdir_and_missing_paths(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"hello")
    (tmp_path / "sub").mkdir()

    async def check(client: TestClient) -> None:
        resp = await client.get("/fs/stat", params={"path": str(tmp_path / "a.txt")})
        entry = await resp.json()
        assert entry["name"] == "a.txt" and entry["size"] == 5 and entry["type"] == "file"
        assert set(entry) == typing_keys(protocol.DirEntry)
        listing = await (await client.get("/fs/readdir", params={"path": str(tmp_path)})).json()
        assert [e["name"] for e in listing] == ["a.txt", "sub"]
        await expect_error(await client.get("/fs/stat", params={"path": str(tmp_path / "gone")}), 404, "not_found")
        await expect_error(await client.get("/fs/stat", params={"path": "relative"}), 400, "invalid_request")
    answer(check)


def test_fs_mkdir_and_remove_under_tmp(tmp_path):
    target = tmp_path / "x" / "y"

    async def check(client: TestClient) -> None:
        resp = await client.post("/fs/mkdir", json={"path": str(target), "recursive": True})
        assert await resp.json() == {"path": str(target), "created": True}
        await expect_error(await client.post("/fs/mkdir", json=[str(target)]), 400, "invalid_request")
        resp = await client.delete("/fs/remove", params={"path": str(tmp_path / "x"), "recursive": "true"})
        assert await resp.json() == {"path": str(tmp_path / "x"), "removed": True}
    answer(check)
    assert not (tmp_path / "x").exists()


def test_cp_out_sends_a_file_once_with_its_mode(tmp_path):
    f = tmp_path / "f.bin"
    f.write_bytes(b"0123456789" * 1000)
    f.chmod(0o640)

    async def check(client: TestClient) -> None:
        resp = await client.get("/cp", params={"path": str(f)})
        assert resp.status == 200 and await resp.read() == f.read_bytes()
        assert resp.headers["X-Slicer-File-Mode"] == "0640" and resp.headers["Content-Length"] == "10000"
    answer(check)


def test_cp_out_sends_one_tar_of_a_directory(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "one").write_text("1")
    (tmp_path / "d" / "skip.log").write_text("2")

    async def check(client: TestClient) -> None:
        resp = await client.get("/cp", params={"path": str(tmp_path / "d"), "mode": "tar"})
        body = await resp.read()
        names = tarfile.open(fileobj=io.BytesIO(body)).getnames()
        assert sorted(names) == ["d", "d/one", "d/skip.log"]
        resp = await client.get("/cp", params=[("path", str(tmp_path / "d")), ("mode", "cp-v1-tar"),
                                               ("exclude", "*.log")])
        assert resp.headers["X-Slicer-Source-Type"] == "directory"
        assert tarfile.open(fileobj=io.BytesIO(await resp.read())).getnames() == ["one"]
    answer(check)


def test_cp_refuses_unknown_modes_and_directories_as_files(tmp_path):
    async def check(client: TestClient) -> None:
        await expect_error(await client.get("/cp", params={"path": str(tmp_path), "mode": "zip"}), 400,
                           "invalid_request")
        await expect_error(await client.get("/cp", params={"path": str(tmp_path)}), 400, "is_directory")
        await expect_error(await client.post("/cp", params={"path": str(tmp_path / "f"), "mode": "zip"}, data=b""),
                           400, "invalid_request")
    answer(check)


def test_cp_in_writes_a_file_under_tmp(tmp_path):
    async def check(client: TestClient) -> None:
        resp = await client.post("/cp", params={"path": str(tmp_path / "new"), "permissions": "0600"},
                                 data=b"payload")
        assert await resp.json() == {"path": str(tmp_path / "new"), "mode": "binary", "size": 7}
    answer(check)
    assert (tmp_path / "new").read_bytes() == b"payload"
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o600


def test_background_output_is_cut_where_utf8_characters_end():
    from slicer.agent.background import _Utf8Cut

    cut = _Utf8Cut()
    text = "añ€😀".encode()
    pieces = [cut(text[i:i + 1]) for i in range(len(text))] + [cut(b"", final=True)]
    assert b"".join(pieces) == text
    assert all(p.decode() for p in pieces if p)  # every piece decodes alone
    assert cut(b"\xff\xfe") == b"\xff\xfe" and cut(b"ok\xe2\x82") == b"ok" and cut(b"", final=True) == b"\xe2\x82"
