"""The SDKs' chunked copy with digests from the host: the bulk port's digest frame, end to end
between the host's sender and the guest's reader, and finalise believing a chunk's recorded
digest only while the chunk is untouched (slicer.agent.upload)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import pytest

from slicer.agent import bulk as guest_bulk
from slicer.agent import sessions, upload
from slicer.channel.bulk import BulkLink, new_token


async def _sent(payload: list[bytes], digest: bool) -> tuple[bytes, bytes]:
    """(token, every byte a BulkLink wrote for one transfer of ``payload``)."""
    got = bytearray()
    done = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1 << 16):
            got.extend(data)
        done.set()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bulk.sock"
        server = await asyncio.start_unix_server(serve, str(path))
        link = BulkLink([path])
        token = new_token()

        async def chunks():
            for p in payload:
                yield p

        assert await link.send(token, chunks(), digest=digest) == sum(map(len, payload))
        link.close()
        await asyncio.wait_for(done.wait(), 5)
        server.close()
    return token, bytes(got)


def _received(token: bytes, wire: bytes) -> tuple[bytes, guest_bulk._Reader]:
    """What the guest's reader makes of ``wire`` (fed through a pipe, as the port would)."""
    r, w = os.pipe()
    feeder = threading.Thread(target=_write_all, args=(w, wire))
    feeder.start()
    reader = guest_bulk._Reader([guest_bulk._Port(r, threading.Event(), threading.Lock())], token)
    out, buf = bytearray(), memoryview(bytearray(1 << 20))
    while n := reader.readinto(buf):
        out += buf[:n]
    feeder.join()
    os.close(r)
    return bytes(out), reader


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.close(fd)


async def test_an_upload_asked_for_its_digest_carries_it_and_the_payload_is_unchanged():
    payload = [os.urandom(n) for n in (1, 70_000, 1 << 20, 3 << 19)]
    whole = b"".join(payload)
    token, wire = await _sent(payload, digest=True)
    got, reader = await asyncio.to_thread(_received, token, wire)
    assert got == whole and reader.digest == hashlib.sha256(whole).hexdigest()
    token, wire = await _sent(payload, digest=False)  # not asked: none sent, the same payload
    got, reader = await asyncio.to_thread(_received, token, wire)
    assert got == whole and reader.digest is None


# -- finalise -----------------------------------------------------------------------------------
@pytest.fixture
def session(tmp_path):
    """A root session beside its destination, its chunks landed as the agent lands them."""
    tmp_path.chmod(0o755)
    name = f".slicer-upload-{os.urandom(16).hex()}"
    parts = [os.urandom(300_000), os.urandom(200_000), os.urandom(5)]
    for i, part in enumerate(parts):
        with upload.upload_path(str(tmp_path / name / "chunks" / f"{i:06d}.chunk"), None, None) as (dir_fd, target):
            fd = os.open(target, os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=dir_fd)
            os.write(fd, part)
            os.close(fd)
            upload.record_digest(dir_fd, target, hashlib.sha256(part).hexdigest(), len(part), None, None)
    manifest = {"version": 1, "mode": "binary", "destination": str(tmp_path / "out.bin"), "uid": 0, "gid": 0,
                "size": sum(map(len, parts)),
                "chunks": [{"index": i, "size": len(p), "sha256": hashlib.sha256(p).hexdigest()}
                           for i, p in enumerate(parts)]}
    (tmp_path / name / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path, name, parts


def _vouched(tmp_path: Path, name: str) -> list[bool]:
    s = upload.Session(str(tmp_path / name / "manifest.json"), 0)
    try:
        return [part.vouched for part in upload.chunks(s, upload.load_manifest(s))]
    finally:
        s.close()


def _finalise(tmp_path: Path, name: str) -> dict:
    s = upload.Session(str(tmp_path / name / "manifest.json"), 0)
    try:
        return upload.finalise(s, 0, 0)
    finally:
        s.close()


def test_recorded_digests_spare_reading_and_the_file_is_whole(session, monkeypatch):
    tmp_path, name, parts = session
    assert _vouched(tmp_path, name) == [True, True, True]
    read = []
    real = upload._blocks
    monkeypatch.setattr(upload, "_blocks", lambda chunk, f, check: read.append(chunk["index"]) or real(chunk, f, check))
    assert _finalise(tmp_path, name)["size"] == sum(map(len, parts))
    assert (tmp_path / "out.bin").read_bytes() == b"".join(parts) and read == []
    assert not (tmp_path / name).exists()


def _inode(path: Path) -> int:
    return path.stat().st_ino


@pytest.mark.parametrize("vouched", [True, False])
def test_the_first_chunk_becomes_the_file_and_is_not_copied(session, vouched):
    """Finalise takes the first chunk as the new file (a link, not a copy) and appends the rest
    (read and checked first when no record vouches for it)."""
    tmp_path, name, parts = session
    first = tmp_path / name / "chunks" / "000000.chunk"
    if not vouched:
        Path(str(first) + upload.DIGEST_SUFFIX).unlink()
    inode = _inode(first)
    _finalise(tmp_path, name)
    assert (tmp_path / "out.bin").read_bytes() == b"".join(parts)
    assert _inode(tmp_path / "out.bin") == inode and (tmp_path / "out.bin").stat().st_nlink == 1
    assert not (tmp_path / name).exists()


@pytest.mark.parametrize("bad", [0, 2])
def test_a_failed_finalise_gives_the_first_chunk_back_whole(session, bad):
    """A damaged chunk after the first is found once the first has become the new file: the
    destination is not made, no temp file is left beside it, and the session is as it came, the
    first chunk cut back to its own bytes (to be finalised again or aborted)."""
    tmp_path, name, parts = session
    chunk = tmp_path / name / "chunks" / f"{bad:06d}.chunk"
    first = tmp_path / name / "chunks" / "000000.chunk"
    inode = _inode(first)
    with open(chunk, "r+b") as f:
        f.write(bytes([parts[bad][0] ^ 1]))
    held = first.read_bytes()  # what the session holds as its first chunk (the damaged one, or whole)
    with pytest.raises(upload.UploadError, match=f"chunk {bad} does not match its SHA-256"):
        _finalise(tmp_path, name)
    assert not (tmp_path / "out.bin").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".slicer-cp-")] == []
    assert _inode(first) == inode and first.stat().st_nlink == 1
    assert first.read_bytes() == held and (bad == 0 or held == parts[0])
    chunk.write_bytes(parts[bad])  # mended: the same session goes through
    _finalise(tmp_path, name)
    assert (tmp_path / "out.bin").read_bytes() == b"".join(parts)


def test_the_taken_chunk_is_private_while_the_file_is_assembled(session, monkeypatch):
    """Beside the destination (a directory others may read), the file being assembled is 0600
    until it is whole, whatever mode its chunk had in the session."""
    tmp_path, name, parts = session
    (tmp_path / name / "chunks" / "000000.chunk").chmod(0o644)
    seen = []
    real = upload._append

    def append(part, dst, checked=False):
        seen.append(oct(os.fstat(dst.fileno()).st_mode & 0o777))
        return real(part, dst, checked)

    monkeypatch.setattr(upload, "_append", append)
    _finalise(tmp_path, name)
    assert seen and set(seen) == {"0o600"}
    assert (tmp_path / "out.bin").read_bytes() == b"".join(parts)


@pytest.mark.parametrize("stray", [True, False])
def test_a_session_left_by_a_killed_finalise_still_goes_through(session, stray):
    """A finalise killed while appending leaves the first chunk longer than its size (and, with
    ``stray``, still linked beside the destination): the next reads it up to its size."""
    tmp_path, name, parts = session
    first = tmp_path / name / "chunks" / "000000.chunk"
    with open(first, "ab") as f:
        f.write(parts[1][:1000])
    if stray:
        os.link(first, tmp_path / ".slicer-cp-000000000000")
    _finalise(tmp_path, name)
    assert (tmp_path / "out.bin").read_bytes() == b"".join(parts)


def test_a_first_chunk_with_another_name_is_copied_not_taken(session):
    """A chunk linked elsewhere (its owner may have) would show that name what is appended: it is copied."""
    tmp_path, name, parts = session
    first = tmp_path / name / "chunks" / "000000.chunk"
    os.link(first, tmp_path / "elsewhere")
    _finalise(tmp_path, name)
    assert (tmp_path / "out.bin").read_bytes() == b"".join(parts)
    assert _inode(tmp_path / "out.bin") != _inode(tmp_path / "elsewhere")
    assert (tmp_path / "elsewhere").read_bytes() == parts[0]


@pytest.mark.parametrize("change", ["rewrite", "same-mtime", "record", "no-record", "replace"])
def test_a_chunk_changed_after_it_landed_is_read_and_checked_again(session, change):
    tmp_path, name, parts = session
    chunk = tmp_path / name / "chunks" / "000001.chunk"
    record = Path(str(chunk) + upload.DIGEST_SUFFIX)
    st = chunk.stat()
    if change in ("rewrite", "same-mtime"):
        time.sleep(0.01)
        with open(chunk, "r+b") as f:
            f.write(b"X")  # same size, other bytes
        if change == "same-mtime":
            os.utime(chunk, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime set back: the ctime still moved
    elif change == "record":  # a record naming the new bytes' digest but the old file's stat
        with open(chunk, "r+b") as f:
            f.write(b"X")
        data = json.loads(record.read_text())
        data["sha256"] = hashlib.sha256(chunk.read_bytes()).hexdigest()
        record.write_text(json.dumps(data))
    elif change == "no-record":
        record.unlink()
    else:  # another file under the chunk's name, with the old record beside it
        chunk.unlink()
        chunk.write_bytes(parts[1])
    assert _vouched(tmp_path, name)[1] is False
    if change in ("no-record", "replace"):  # the bytes are right: read, checked and taken
        _finalise(tmp_path, name)
        assert (tmp_path / "out.bin").read_bytes() == b"".join(parts)
    else:
        with pytest.raises(upload.UploadError, match="does not match its SHA-256"):
            _finalise(tmp_path, name)
        assert not (tmp_path / "out.bin").exists()


def test_only_a_sessions_chunks_ask_for_a_digest():
    s = f"/root/.slicer-upload-{'a' * 32}"
    assert sessions.is_chunk(f"{s}/chunks/000000.chunk")
    assert not sessions.is_chunk(f"{s}/manifest.json") and not sessions.is_chunk("/root/file.chunk")


def test_the_guest_helper_imports_no_asyncio():
    """``slicer-agent upload`` runs once per chunked copy: under TCG asyncio alone took a second
    of its start (the helper took 2.4 s; finalise of 64 MiB, 3.5 s)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    code = (f"import sys; sys.path.insert(0, {str(root)!r}); import slicer.agent.upload; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('asyncio', 'concurrent', 'aiohttp')))")
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("after", [0, 1000])
def test_a_destination_on_another_filesystem_is_written_through_python(session, monkeypatch, after):
    """copy_file_range says EXDEV across filesystems (the guest's /tmp is a tmpfs): the copy goes
    on from where the kernel stopped, and the file is whole."""
    import errno
    tmp_path, name, parts = session
    real, calls = os.copy_file_range, []

    def cross_device(src: int, dst: int, count: int, *a) -> int:
        calls.append(count)
        if len(calls) == 1 and after:
            return real(src, dst, after)
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", cross_device)
    _finalise(tmp_path, name)
    assert (tmp_path / "out.bin").read_bytes() == b"".join(parts) and calls


def test_a_record_is_dropped_when_its_chunk_comes_again_and_never_fails_a_chunk(tmp_path):
    tmp_path.chmod(0o755)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        (tmp_path / "000000.chunk").write_bytes(b"abc")
        upload.record_digest(fd, "000000.chunk", hashlib.sha256(b"abc").hexdigest(), 3, None, None)
        assert (tmp_path / "000000.chunk.sha256").exists()
        upload.forget_digest(fd, "000000.chunk")
        assert not (tmp_path / "000000.chunk.sha256").exists()
        upload.forget_digest(fd, "000000.chunk")  # none: nothing to do
        (tmp_path / "000000.chunk.sha256").mkdir()  # in its place, a directory: no record, no error
        upload.record_digest(fd, "000000.chunk", hashlib.sha256(b"abc").hexdigest(), 3, None, None)
        upload.record_digest(fd, "missing.chunk", "0" * 64, 3, None, None)
    finally:
        os.close(fd)


def test_the_helper_starts_on_what_a_file_needs():
    """The guest starts the helper once or twice per chunked copy, under TCG, where each import
    is felt: ``check`` needs nothing of the upload's, and a file's finalise neither argparse's help,
    tarfile, shutil, secrets nor OpenSSL's hashlib (a tar or an unvouched chunk imports them)."""
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parents[2])
    heavy = ["hashlib", "shutil", "tarfile", "secrets"]
    probe = (f"import sys; sys.path.insert(0, {root!r}); from slicer.agent import helper; "
             "helper.main(['upload', 'check']); print('slicer.agent.upload' in sys.modules); "
             "from slicer.agent import upload; "
             f"print([m for m in {heavy!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["chunked-copy-v1 chunked-copy-v2", "False", "[]"]
