"""The client's streamed calls (exec, logs, cp both ways, polling) against a mock daemon."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import httpx
import pytest

from slicer.client import ExecFrame, ExecResult, Health, UnsafeArchive, WaitTimeoutError
from tests.unit.client_harness import answering, run

FLAVOURS = ["sync", "async"]
FRAMES = [{"type": "started", "pid": 7}, {"type": "stdout", "data": "hi\n", "stdout": "hi\n"},
          {"type": "exit", "exit_code": 3}]


def ndjson(request: httpx.Request) -> httpx.Response:
    request.read()
    return httpx.Response(200, content=b"".join(json.dumps(f).encode() + b"\n" for f in FRAMES),
                          headers={"content-type": "application/x-ndjson"})


def tar_of(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_exec_is_buffered_and_sends_stdin(flavour: str) -> None:
    answer = {"stdout": "hi\n", "stderr": "", "exit_code": 4}
    result, seen = run(flavour, "exec", "vm-1", "cat", stdin=b"in", env={"A": "1"}, handler=answering(payload=answer))
    assert isinstance(result, ExecResult) and (result.stdout, result.exit_code) == ("hi\n", 4)
    assert seen.last.url.path == "/vm/vm-1/exec" and seen.last.content == b"in"
    assert list(seen.last.url.params.multi_items()) == [("cmd", "cat"), ("env", "A=1"), ("buffered", "true"),
                                                        ("stdin", "true")]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_exec_stream_yields_typed_frames(flavour: str) -> None:
    frames, seen = run(flavour, "exec_stream", "vm-1", "uname", args=["-a"], handler=ndjson)
    assert [type(f) for f in frames] == [ExecFrame] * 3
    assert [f.type for f in frames] == ["started", "stdout", "exit"] and frames[-1].exit_code == 3
    assert ("buffered", "true") not in seen.last.url.params.multi_items()


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_background_logs_follow(flavour: str) -> None:
    frames, seen = run(flavour, "background_logs", "vm-1", "e1", follow=True, from_id=3, handler=ndjson)
    assert len(frames) == 3 and frames[1].stdout == "hi\n"
    assert seen.last.url.path == "/vm/vm-1/exec/e1/logs"
    assert dict(seen.last.url.params) == {"follow": "true", "from_id": "3"}


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_upload_streams_a_file_with_progress(flavour: str, tmp_path: Path) -> None:
    src = tmp_path / "f.bin"
    src.write_bytes(b"x" * 300_000)
    seen_progress: list[int] = []
    result, seen = run(flavour, "upload", "vm-1", src, "/tmp/f.bin", permissions="0600",
                       progress=seen_progress.append, handler=answering(payload={"size": 300_000}))
    assert result == {"size": 300_000}
    assert seen.last.content == src.read_bytes()
    assert seen.last.headers["content-type"] == "application/octet-stream"
    assert dict(seen.last.url.params) == {"path": "/tmp/f.bin", "permissions": "0600", "mode": "binary"}
    assert seen_progress[-1] == 300_000


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_upload_of_a_directory_sends_a_tar(flavour: str, tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.txt").write_text("x")
    _, seen = run(flavour, "upload", "vm-1", tmp_path, "/tmp/t", handler=answering(payload={}))
    assert seen.last.headers["content-type"] == "application/x-tar"
    assert seen.last.url.params["mode"] == "tar"
    names = tarfile.open(fileobj=io.BytesIO(seen.last.content)).getnames()
    assert "./d/x.txt" in names


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_download_returns_bytes_or_writes_a_file(flavour: str, tmp_path: Path) -> None:
    blob = bytes(range(256)) * 2000

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=httpx.ByteStream(blob))

    data, _ = run(flavour, "download", "vm-1", "/etc/blob", handler=handler)
    assert data == blob
    out = tmp_path / "blob"
    assert run(flavour, "download", "vm-1", "/etc/blob", out, handler=handler)[0] is None
    assert out.read_bytes() == blob


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_download_of_a_tar_extracts_it_safely(flavour: str, tmp_path: Path) -> None:
    good = tar_of({"tree/a.txt": b"A"})
    _, seen = run(flavour, "download", "vm-1", "/tree", tmp_path / "got", tar=True,
                  handler=lambda r: httpx.Response(200, stream=httpx.ByteStream(good)))
    assert (tmp_path / "got" / "tree" / "a.txt").read_bytes() == b"A"
    assert seen.last.url.params["mode"] == "tar"
    evil = tar_of({"../escape.txt": b"E"})
    with pytest.raises(UnsafeArchive):
        run(flavour, "download", "vm-1", "/tree", tmp_path / "evil", tar=True,
            handler=lambda r: httpx.Response(200, stream=httpx.ByteStream(evil)))
    assert not (tmp_path / "escape.txt").exists()


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_wait_ready_polls_until_userdata_ran(flavour: str) -> None:
    answers = iter([{"hostname": "vm-1", "agent_uptime": 1, "agent_version": "v", "system_uptime": 1},
                    {"hostname": "vm-1", "agent_uptime": 2, "agent_version": "v", "system_uptime": 2,
                     "userdata_ran": True}])
    health, seen = run(flavour, "wait_ready", "vm-1", userdata=True, timeout=5,
                       handler=lambda r: httpx.Response(200, json=next(answers)))
    assert isinstance(health, Health) and health.userdata_ran and len(seen.requests) == 2


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_wait_ready_gives_up_after_its_timeout(flavour: str) -> None:
    unready = {"error": "agent not ready", "code": "agent_unreachable"}
    with pytest.raises(WaitTimeoutError) as e:
        run(flavour, "wait_ready", "vm-1", timeout=0.1, handler=answering(503, unready))
    assert e.value.status == 408 and e.value.code == "timeout"
