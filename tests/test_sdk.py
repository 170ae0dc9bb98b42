"""The Python SDK end to end, sync and async, against the real daemon and VMs."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest

from slicer.client import (
    AsyncSlicerClient,
    AuthenticationError,
    ConflictError,
    ForbiddenError,
    GoneError,
    NotFoundError,
    SlicerClient,
)
from tests.conftest import wait_agent

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def client(daemon, api):
    wait_agent(api, "vm-1")
    with SlicerClient(daemon.url, token=daemon.token) as c:
        yield c


def test_sync_client_covers_the_daily_routes(client, tmp_path):
    assert client.info().version
    assert {g.name for g in client.host_groups()} >= {"vm", "sbx"}
    created = client.create_node("sbx", wait="agent", timeout="4m", tags=["sdk"])
    h = created.hostname
    try:
        assert [n.hostname for n in client.nodes(tag="sdk")] == [h]
        assert client.get_node(h).status == "Running"
        assert client.health(h).hostname == h
        assert "Linux version" in client.logs(h, lines=0)
        result = client.exec(h, "echo $GREETING; exit 4", env={"GREETING": "hi"})
        assert (result.stdout, result.exit_code) == ("hi\n", 4)
        frames = list(client.exec_stream(h, "cat", stdin=b"piped\n"))
        assert frames[0].type == "started" and frames[-1].type == "exit"
        assert "".join(f.stdout for f in frames) == "piped\n"

        data = os.urandom(2 * 1024 * 1024 + 3)
        src = tmp_path / "up.bin"
        src.write_bytes(data)
        seen: list[int] = []
        assert client.upload(h, src, "/tmp/up.bin", permissions="0600", progress=seen.append)["size"] == len(data)
        assert seen and seen[-1] == len(data)
        client.download(h, "/tmp/up.bin", tmp_path / "down.bin")
        assert hashlib.sha256((tmp_path / "down.bin").read_bytes()).digest() == hashlib.sha256(data).digest()
        assert client.stat(h, "/tmp/up.bin")["mode"] == "0600"
        client.mkdir(h, "/tmp/sdk/dir", recursive=True)
        assert [e["name"] for e in client.readdir(h, "/tmp/sdk")] == ["dir"]
        client.remove(h, "/tmp/sdk", recursive=True)
        tree = tmp_path / "tree"
        (tree / "d").mkdir(parents=True)
        (tree / "d" / "x.txt").write_text("x-content")
        client.upload(h, tree, "/tmp/sdktree")
        client.download(h, "/tmp/sdktree", tmp_path / "got", tar=True)
        assert (tmp_path / "got" / "sdktree" / "d" / "x.txt").read_text() == "x-content"
        assert client.wait_ready(h, timeout=30).hostname == h

        bg = client.exec_background(h, "echo bg-out; exit 2")
        assert client.background_wait(h, bg.exec_id, timeout=30)["exit_code"] == 2
        assert any(f.stdout == "bg-out\n" for f in client.background_logs(h, bg.exec_id))
        client.background_delete(h, bg.exec_id)
        with pytest.raises(GoneError):
            client.background_info(h, bg.exec_id)

        stats = client.stats(h)
        assert stats.snapshot and stats.snapshot["totalMemory"] > 0
        client.pause(h)
        with pytest.raises(ConflictError) as e:
            client.exec(h, "true")
        assert e.value.status == 409 and e.value.code == "paused"
        client.resume(h)
    finally:
        client.delete_node("sbx", h)
    with pytest.raises(NotFoundError):
        client.get_node(h)
    with pytest.raises(ForbiddenError):
        client.delete_node("vm", "vm-1")


def test_sdk_errors_and_secrets(daemon, client):
    with SlicerClient(daemon.url, token="wrong") as bad, pytest.raises(AuthenticationError) as e:
        bad.nodes()
    assert e.value.status == 401 and e.value.error
    secret = client.create_secret("sdk-secret", b"value", permissions="0640")
    assert secret.size == 5 and secret.permissions == "0640"
    assert client.update_secret("sdk-secret", data=b"longer value").size == 12
    assert "sdk-secret" in [s.name for s in client.secrets()]
    client.delete_secret("sdk-secret")
    with pytest.raises(NotFoundError):
        client.delete_secret("sdk-secret")


def test_token_and_url_from_the_environment(daemon, monkeypatch, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(daemon.token + "\n")
    monkeypatch.setenv("SLICER_URL", daemon.url)
    monkeypatch.setenv("SLICER_TOKEN_FILE", str(token_file))
    monkeypatch.delenv("SLICER_TOKEN", raising=False)
    with SlicerClient() as c:
        assert c.info().version


def test_shell_and_forward_helpers(client):
    import struct

    with client.shell("vm-1") as ws:
        ws.send(struct.pack(">BI", 1, 12) + b"echo HELLO\n\n")
        out = b""
        while b"HELLO\r\n" not in out:
            msg = ws.recv(timeout=30)
            if msg[0] == 1:
                out += msg[5:]
        ws.send(struct.pack(">BI", 1, 5) + b"exit\n")
    with pytest.raises(Exception) as e:
        client.forward("vm-1", "127.0.0.1:9")
    assert "502" in str(e.value)


def test_async_client(daemon, api):
    async def main() -> None:
        async with AsyncSlicerClient(daemon.url, token=daemon.token) as c:
            assert (await c.info()).version
            result = await c.exec("vm-1", "printf async")
            assert result.stdout == "async"
            frames = [f async for f in c.exec_stream("vm-1", "echo one; echo two >&2")]
            assert "".join(f.stdout for f in frames) == "one\n" and "".join(f.stderr for f in frames) == "two\n"
            payload = os.urandom(300_000)
            await c.upload("vm-1", payload, "/tmp/async.bin")
            assert await c.download("vm-1", "/tmp/async.bin") == payload
            nodes = await c.nodes()
            assert "vm-1" in [n.hostname for n in nodes]
            with pytest.raises(NotFoundError):
                await c.health("ghost-1")

    asyncio.run(main())


def test_suspend_restore_relaunch_and_storage(client):
    vm = client.create_node("sbx", wait="agent")
    try:
        assert client.get_node(vm.hostname).boot == "template"
        client.exec(vm.hostname, "echo 42 > /dev/shm/kept")  # tmpfs: only memory keeps it
        assert "suspended" in client.suspend(vm.hostname)
        assert client.get_node(vm.hostname).status == "Suspended"
        with pytest.raises(ConflictError):
            client.exec(vm.hostname, "true")
        usage = client.storage()
        assert any(n.hostname == vm.hostname and n.state_bytes > 0 for n in usage.nodes)
        assert usage.templates and usage.total_bytes > 0
        client.restore(vm.hostname)
        assert client.exec(vm.hostname, "cat /dev/shm/kept").stdout == "42\n"
        with pytest.raises(ConflictError):
            client.relaunch(vm.hostname)
    finally:
        client.delete_node("sbx", vm.hostname)
