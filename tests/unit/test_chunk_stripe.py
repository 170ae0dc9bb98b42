"""The chunked copy's session as the agent lands it (slicer.agent.stripe: each chunk at its slot
of one sparse data file, with its record and the file's stamp) and finalise taking that file as
the destination without copying it (slicer.agent.assemble, .upload), or copying where it cannot."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
from pathlib import Path

import pytest

from slicer.agent import assemble, files, stripe, upload

SLOT = 64 << 10  # the tests' slot: stripe.SLOT (64 MiB) made small
LAYOUTS = {
    "slot": [SLOT, SLOT, 5],  # the SDKs' default: chunks of a whole slot, the file is the data file
    "blocks": [16384, 16384, 16384, 5],  # whole blocks: the gaps are cut out in place
    "odd": [30_000, 30_000, 7],  # not whole blocks: copied
}


def _collapses(where: Path) -> bool:
    """Whether ``where``'s filesystem cuts ranges out of files (ext4, xfs: yes; tmpfs: no)."""
    fd = os.open(where / ".probe", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, b"x" * 8192, 0)
        assemble._fallocate(fd, assemble.FALLOC_FL_COLLAPSE_RANGE, 0, 4096)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(where / ".probe")


class Body:
    """A request body as stripe.receive reads it; ``digest``: the host's, as the bulk port gives it."""

    def __init__(self, data: bytes, digest: bool = True, fail_after: int | None = None) -> None:
        self.data, self.fail_after = data, fail_after
        self.digest = hashlib.sha256(data).hexdigest() if digest else None

    async def iter_chunked(self, n: int):
        for i in range(0, len(self.data), 7000):
            if self.fail_after is not None and i >= self.fail_after:
                raise ConnectionResetError("the client went away")
            yield self.data[i:i + 7000]


def land(session: Path, index: int, data: bytes, digest: bool = True, fail_after: int | None = None,
         uid: int | None = None) -> int:
    """One chunk, as the agent's ``POST /cp`` lands it."""
    path = str(session / "chunks" / f"{index:06d}.chunk")
    assert stripe.index_of(path) == index
    with upload.upload_path(path, uid, uid) as (dir_fd, _):
        return asyncio.run(stripe.receive(dir_fd, index, Body(data, digest, fail_after), uid, uid))


def landed(tmp_path: Path, monkeypatch, parts: list[bytes], mode: str = "binary", digests: bool = True) -> str:
    """A root session beside its destination (its name), ``parts`` landed out of order as the SDKs
    send them (every other one without a digest unless ``digests``), then its manifest."""
    monkeypatch.setattr(stripe, "SLOT", SLOT)
    tmp_path.chmod(0o755)
    name = f".slicer-upload-{os.urandom(16).hex()}"
    for i in reversed(range(len(parts))):
        assert land(tmp_path / name, i, parts[i], digest=digests or i % 2 == 0) == len(parts[i])
    write_manifest(tmp_path, name, parts, mode)
    return name


@pytest.fixture(params=list(LAYOUTS))
def session(tmp_path, monkeypatch, request):
    parts = [os.urandom(n) for n in LAYOUTS[request.param]]
    return tmp_path, landed(tmp_path, monkeypatch, parts), parts, request.param


def write_manifest(tmp_path: Path, name: str, parts: list[bytes], mode: str = "binary") -> None:
    manifest = {"version": 1, "mode": mode, "destination": str(tmp_path / "out.bin"), "uid": 0, "gid": 0,
                "size": sum(map(len, parts)),
                "chunks": [{"index": i, "size": len(p), "sha256": hashlib.sha256(p).hexdigest()}
                           for i, p in enumerate(parts)]}
    (tmp_path / name / "manifest.json").write_text(json.dumps(manifest))


def _session(tmp_path: Path, name: str) -> upload.Session:
    return upload.Session(str(tmp_path / name / "manifest.json"), 0)


def _vouched(tmp_path: Path, name: str) -> list[bool]:
    s = _session(tmp_path, name)
    try:
        with assemble.Chunks(s.fd, s.path, upload.load_manifest(s)) as chunks:
            return [part.vouched for part in chunks.parts]
    finally:
        s.close()


def _finalise(tmp_path: Path, name: str) -> dict:
    s = _session(tmp_path, name)
    try:
        return upload.finalise(s, 0, 0)
    finally:
        s.close()


def _data(tmp_path: Path, name: str) -> Path:
    return tmp_path / name / "chunks" / stripe.DATA


def _taken(layout: str, where: Path) -> bool:
    return layout == "slot" or (layout == "blocks" and _collapses(where))


def test_chunks_land_at_their_slots_of_one_sparse_file(session):
    tmp_path, name, parts, _ = session
    data = _data(tmp_path, name)
    with open(data, "rb") as f:
        for i, part in enumerate(parts):
            f.seek(i * SLOT)
            assert f.read(len(part)) == part
    assert data.stat().st_size == (len(parts) - 1) * SLOT + len(parts[-1])
    assert oct(data.stat().st_mode & 0o777) == "0o600"
    assert json.loads((tmp_path / name / "chunks" / stripe.record_name(1)).read_text()) == \
        {"size": len(parts[1]), "sha256": hashlib.sha256(parts[1]).hexdigest()}


def test_recorded_digests_spare_reading_and_the_data_file_becomes_the_file(session, monkeypatch):
    """Nothing is read to be checked, and (but for chunks of odd sizes) the new file is the data
    file itself: a link, its gaps cut out, not a copy."""
    tmp_path, name, parts, layout = session
    assert _vouched(tmp_path, name) == [True] * len(parts)
    inode = _data(tmp_path, name).stat().st_ino
    read, real = [], assemble.Chunks.blocks
    monkeypatch.setattr(assemble.Chunks, "blocks", lambda self, p, check: read.append(p) or real(self, p, check))
    assert _finalise(tmp_path, name)["size"] == sum(map(len, parts))
    out = tmp_path / "out.bin"
    assert out.read_bytes() == b"".join(parts) and read == []
    assert (out.stat().st_ino == inode) == _taken(layout, tmp_path) and out.stat().st_nlink == 1
    assert not (tmp_path / name).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_chunks_without_digests_are_read_and_checked(session):
    """Chunks that came through the channel (no digest from the host) are hashed by finalise."""
    tmp_path, name, parts, _ = session
    land(tmp_path / name, 1, parts[1], digest=False)
    assert _vouched(tmp_path, name) == [True, False] + [True] * (len(parts) - 2)
    _finalise(tmp_path, name)
    assert (tmp_path / "out.bin").read_bytes() == b"".join(parts)


def test_the_taken_file_is_private_until_it_is_whole(session, monkeypatch):
    """Beside the destination (a directory others may read), the file being assembled is 0600
    until it is whole, whatever mode its data file had in the session."""
    tmp_path, name, parts, layout = session
    _data(tmp_path, name).chmod(0o644)
    seen, real = [], os.link

    def link(src, dst, *, src_dir_fd=None, dst_dir_fd=None, follow_symlinks=True):
        seen.append(oct(os.stat(src, dir_fd=src_dir_fd).st_mode & 0o777))
        return real(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd, follow_symlinks=follow_symlinks)

    monkeypatch.setattr(os, "link", link)
    _finalise(tmp_path, name)
    assert set(seen) == ({"0o600"} if _taken(layout, tmp_path) else set())
    assert (tmp_path / "out.bin").read_bytes() == b"".join(parts)


def test_a_failure_after_the_take_gives_the_session_back_as_it_was(session, monkeypatch):
    """An fsync that fails once the data file became the new file (its gaps cut out): no
    destination, no temp file, the gaps put back, and the same session then goes through."""
    tmp_path, name, parts, _ = session
    before = _data(tmp_path, name).read_bytes()
    real = os.fsync

    def broken(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError, match="Input/output"):
        _finalise(tmp_path, name)
    assert [p.name for p in tmp_path.iterdir()] == [name]
    assert _data(tmp_path, name).read_bytes() == before
    monkeypatch.setattr(os, "fsync", real)
    _finalise(tmp_path, name)
    assert (tmp_path / "out.bin").read_bytes() == b"".join(parts)


@pytest.mark.parametrize("bad", [0, "last"])
def test_a_damaged_chunk_is_found_before_anything_is_written(session, bad):
    tmp_path, name, parts, _ = session
    bad = len(parts) - 1 if bad == "last" else bad
    with open(_data(tmp_path, name), "r+b") as f:
        f.seek(bad * SLOT)
        f.write(bytes([parts[bad][0] ^ 1]))
    before = _data(tmp_path, name).read_bytes()
    with pytest.raises(upload.UploadError, match=f"chunk {bad} does not match its SHA-256"):
        _finalise(tmp_path, name)
    assert [p.name for p in tmp_path.iterdir()] == [name] and _data(tmp_path, name).read_bytes() == before
    land(tmp_path / name, bad, parts[bad])  # sent again: the same session goes through
    _finalise(tmp_path, name)
    assert (tmp_path / "out.bin").read_bytes() == b"".join(parts)


def test_a_data_file_with_another_name_is_copied_not_taken(session):
    """A data file linked elsewhere (its owner may have) would show that name the new file: copied."""
    tmp_path, name, parts, _ = session
    os.link(_data(tmp_path, name), tmp_path / "elsewhere")
    before = (tmp_path / "elsewhere").read_bytes()
    _finalise(tmp_path, name)
    assert (tmp_path / "out.bin").read_bytes() == b"".join(parts)
    assert (tmp_path / "out.bin").stat().st_ino != (tmp_path / "elsewhere").stat().st_ino
    assert (tmp_path / "elsewhere").read_bytes() == before


@pytest.mark.parametrize("change", ["rewrite", "same-mtime", "record", "stamp", "half-sent"])
def test_a_data_file_changed_after_the_last_chunk_landed_is_read_and_checked_again(session, change):
    tmp_path, name, parts, _ = session
    data = _data(tmp_path, name)
    record = tmp_path / name / "chunks" / stripe.record_name(1)
    st = data.stat()
    if change == "half-sent":  # a chunk's second sending broke off: its bytes half rewritten, its record gone
        with pytest.raises(ConnectionResetError):
            land(tmp_path / name, 1, bytes(len(parts[1])), fail_after=7000)
        assert not record.exists()
        with pytest.raises(upload.UploadError, match="chunk 1 is missing"):
            _finalise(tmp_path, name)
        return
    if change in ("rewrite", "same-mtime", "record"):
        with open(data, "r+b") as f:
            f.seek(SLOT)
            f.write(bytes([parts[1][0] ^ 0xFF]))  # same size, another byte (a fixed one matched 1 time in 256)
        if change == "same-mtime":
            os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime set back: the ctime still moved
        if change == "record":  # a record naming the new bytes' digest, the old stamp kept
            with open(data, "rb") as f:
                f.seek(SLOT)
                new = f.read(len(parts[1]))
            record.write_text(json.dumps({"size": len(parts[1]), "sha256": hashlib.sha256(new).hexdigest()}))
    else:
        (tmp_path / name / "chunks" / stripe.STAMP).unlink()
    assert _vouched(tmp_path, name) == [False] * len(parts)
    if change == "stamp":  # the bytes are right: read, checked and taken
        _finalise(tmp_path, name)
        assert (tmp_path / "out.bin").read_bytes() == b"".join(parts)
    else:
        with pytest.raises(upload.UploadError, match="chunk 1 does not match its SHA-256"):
            _finalise(tmp_path, name)
        assert not (tmp_path / "out.bin").exists()


def test_a_tar_is_extracted_from_the_data_file(tmp_path, monkeypatch):
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        body = os.urandom(100_000)
        info = tarfile.TarInfo("dir/file.bin")
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
    whole = buf.getvalue()
    name = landed(tmp_path, monkeypatch, [whole[i:i + 16384] for i in range(0, len(whole), 16384)], "tar", False)
    (tmp_path / "out.bin").mkdir()
    assert _finalise(tmp_path, name)["entries"] == 1
    assert (tmp_path / "out.bin" / "dir" / "file.bin").read_bytes() == body


@pytest.mark.parametrize("after", [0, 1000])
def test_a_destination_on_another_filesystem_is_written_through_python(tmp_path, monkeypatch, after):
    """copy_file_range says EXDEV across filesystems (the guest's /tmp is a tmpfs): the copy goes
    on from where the kernel stopped, and the file is whole."""
    parts = [os.urandom(n) for n in LAYOUTS["odd"]]
    name = landed(tmp_path, monkeypatch, parts)
    real, calls = os.copy_file_range, []

    def cross_device(src: int, dst: int, count: int, offset_src=None, offset_dst=None) -> int:
        calls.append(count)
        if len(calls) == 1 and after:
            return real(src, dst, after, offset_src)
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", cross_device)
    _finalise(tmp_path, name)
    assert (tmp_path / "out.bin").read_bytes() == b"".join(parts) and calls


def test_what_lands_in_a_slot_is_bounded_and_only_in_the_owners_own_file(tmp_path, monkeypatch):
    monkeypatch.setattr(stripe, "SLOT", SLOT)
    tmp_path.chmod(0o755)
    session = tmp_path / f".slicer-upload-{os.urandom(16).hex()}"
    with pytest.raises(files.FileError, match="at most") as e:
        land(session, 0, os.urandom(SLOT + 1))
    assert e.value.status == 413
    assert not (session / "chunks" / stripe.record_name(0)).exists()
    data = session / "chunks" / stripe.DATA
    data.unlink()
    data.symlink_to("/etc/passwd")  # planted by the owner: never followed
    with pytest.raises(files.FileError) as e:
        land(session, 0, b"x")
    assert e.value.code == "unsafe_session"
    data.unlink()
    data.write_bytes(b"")
    os.chown(data, 4242, 4242)  # another user's file linked in: root never writes into it for this owner
    with pytest.raises(files.FileError, match="not a file of this upload"):
        land(session, 0, b"x")
    os.chown(data, 0, 0)
    data.chmod(0o4600)  # set-id bits root's writes would keep
    with pytest.raises(files.FileError, match="not a file of this upload"):
        land(session, 0, b"x")
    data.chmod(0o600)
    os.link(data, tmp_path / "elsewhere")  # a name outside the session would see every chunk
    with pytest.raises(files.FileError, match="not a file of this upload"):
        land(session, 0, b"x")
    (tmp_path / "elsewhere").unlink()
    assert land(session, 0, b"x") == 1 and (tmp_path / "elsewhere").exists() is False


def test_chunk_names():
    s = f"/root/.slicer-upload-{'a' * 32}"
    assert stripe.index_of(f"{s}/chunks/000012.chunk") == 12
    assert stripe.index_of(f"{s}/chunks/000003-{'b' * 64}.chunk") == 3  # the older SDKs' names
    for bad in (f"{s}/manifest.json", f"{s}/chunks/00001.chunk", f"{s}/chunks/000001-xyz.chunk",
                f"{s}/000001.chunk", f"{s}/chunks/{stripe.MAX_SLOTS:06d}.chunk", f"{s}/chunks/٠٠٠٠٠١.chunk"):
        assert stripe.index_of(bad) is None, bad


def test_where_gaps_cannot_be_cut_the_chunks_are_copied(tmp_path, monkeypatch):
    """A filesystem without FALLOC_FL_COLLAPSE_RANGE (the guest's /tmp is a tmpfs): the data file
    is left as it was and the chunks are copied."""
    parts = [os.urandom(n) for n in LAYOUTS["blocks"]]
    name = landed(tmp_path, monkeypatch, parts)
    inode = _data(tmp_path, name).stat().st_ino

    def unsupported(*_):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(assemble, "_fallocate", unsupported)
    _finalise(tmp_path, name)
    assert (tmp_path / "out.bin").read_bytes() == b"".join(parts)
    assert (tmp_path / "out.bin").stat().st_ino != inode
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_one_chunk_is_written_by_one_request_at_a_time(tmp_path, monkeypatch):
    """A second sending of a chunk while the first is still being written is refused (409): both
    at once would leave bytes of each under the record of one."""
    monkeypatch.setattr(stripe, "SLOT", SLOT)
    tmp_path.chmod(0o755)
    session = tmp_path / f".slicer-upload-{os.urandom(16).hex()}"
    path = str(session / "chunks" / "000000.chunk")

    class Held(Body):
        async def iter_chunked(self, n: int):
            yield self.data[:100]
            await release.wait()
            yield self.data[100:]

    async def both() -> list:
        with upload.upload_path(path, None, None) as (dir_fd, _):
            first = asyncio.create_task(stripe.receive(dir_fd, 0, Held(b"a" * 1000), None, None))
            await asyncio.sleep(0.05)
            with pytest.raises(files.FileError, match="being written already") as e:
                await stripe.receive(dir_fd, 0, Body(b"b" * 1000), None, None)
            release.set()
            return [e.value.status, await first, await stripe.receive(dir_fd, 0, Body(b"c" * 10), None, None)]

    release = asyncio.Event()
    assert asyncio.run(both()) == [409, 1000, 10]  # once the first is done, the chunk may come again
