"""Where a chunked copy's chunks land: one sparse file per session, chunk i at i × 64 MiB.

The SDKs send a file as numbered chunks of one size (64 MiB by default, the last one shorter) and
only say that size in the manifest, after the chunks. Each chunk is written at its slot in
``chunks/data`` (a sparse file: the gaps cost nothing) with a record beside it
(``NNNNNN.chunk.slot``: its size and, when it came on the bulk port, the SHA-256 the host hashed
as it sent it). So finalise need not copy anything: with 64 MiB chunks the data file already is
the destination's content, and with smaller ones (whole filesystem blocks) the gaps are cut out
in place (``FALLOC_FL_COLLAPSE_RANGE``; slicer.agent.upload).

A recorded digest is believed only while ``data.stamp`` still describes the data file (inode,
size, mtime, ctime: rewritten after every chunk that lands; a later write, even a half-done one,
moves the ctime, which nobody can set back); else finalise reads and hashes every chunk. Only the
session's owner (or root) can write there, and the owner could write the destination anyway.

The data file is sparse: chunks smaller than 64 MiB leave holes between them, so a filesystem
without sparse files or with small files (vfat) needs the SDKs' default 64 MiB chunks. A copy has
at most MAX_SLOTS chunks (1 TiB in 64 MiB chunks).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat

from slicer.agent import files
from slicer.agent.sessions import HEX_DIGITS

SLOT = 64 << 20  # the SDKs' largest (and default) chunk: chunk i's bytes start at i × SLOT
MAX_SLOTS = 1 << 14  # 1 TiB of offsets; a manifest with more chunks is refused
DATA = "data"
STAMP = "data.stamp"
RECORD_SUFFIX = ".slot"  # beside the chunk's name: NNNNNN.chunk.slot
MAX_RECORD = 4096
OPEN = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC  # a FIFO, tty or symlink planted there: no effect


def index_of(path: str) -> int | None:
    """The index of the chunk ``path`` names (``<session>/chunks/NNNNNN.chunk``, or the older
    SDKs' ``NNNNNN-<sha256>.chunk``), if it is one."""
    parent, _, name = path.rpartition("/")
    if not parent.endswith("/chunks") or not name.endswith(".chunk"):
        return None
    digits, rest = name[:6], name[6:-6]
    if not digits.isdigit() or not digits.isascii() or (rest and not (rest[0] == "-" and len(rest) == 65
                                                                      and HEX_DIGITS.issuperset(rest[1:]))):
        return None
    return int(digits) if int(digits) < MAX_SLOTS else None


def record_name(index: int) -> str:
    return f"{index:06d}.chunk{RECORD_SUFFIX}"


def stamp_of(st: os.stat_result) -> dict:
    return {"ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


def read_json(name: str, dir_fd: int) -> dict | None:
    """A small JSON object the session holds (a regular file), or None."""
    try:
        fd = os.open(name, os.O_RDONLY | OPEN, dir_fd=dir_fd)
    except OSError:
        return None
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        try:
            value = json.loads(f.read(MAX_RECORD + 1))
        except (ValueError, RecursionError):
            return None
    return value if isinstance(value, dict) else None


def _write_json(name: str, dir_fd: int, value: dict, owner: int, group: int) -> None:
    with files.atomic_file(name, 0o600, owner, group, dir_fd=dir_fd) as f:
        f.write(json.dumps(value).encode())


def _open_data(dir_fd: int, owner: int, group: int) -> int:
    """The session's data file, made for its owner if missing. One the owner put there must be
    their own regular file (not another user's, linked in for root to write into)."""
    try:
        fd = os.open(DATA, os.O_RDWR | os.O_CREAT | os.O_EXCL | OPEN, 0o600, dir_fd=dir_fd)
        os.fchown(fd, owner, group)
        return fd
    except FileExistsError:
        pass
    try:
        fd = os.open(DATA, os.O_RDWR | OPEN, dir_fd=dir_fd)
    except OSError as e:
        raise files.FileError(f"chunks/{DATA}: {e.strerror}", "unsafe_session", 409) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != owner or st.st_nlink != 1 or st.st_mode & 0o7000:
        os.close(fd)  # root's writes would keep set-id bits; a link elsewhere would see every chunk
        raise files.FileError(f"chunks/{DATA} is not a file of this upload's (uid {owner}, one link, no set-id bits)",
                              "unsafe_session", 409)
    return fd


_writing: set[tuple[int, int, int]] = set()  # (device, inode of a data file, index) being written


async def receive(dir_fd: int, index: int, body, uid: int | None, gid: int | None) -> int:
    """Write a chunk's bytes (the request's body, or a bulk transfer's) into its slot of the
    session's data file in ``dir_fd`` (its ``chunks`` directory); its size. Its record goes first
    and comes back only once it is whole. One chunk is written by one request at a time (two
    interleaved would leave bytes of both under the record of one): a second meanwhile is 409
    ``conflict``, to be sent again."""
    owner = uid or 0
    group = gid if gid is not None else owner
    fd = _open_data(dir_fd, owner, group)
    try:
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino, index)
        if key in _writing:
            raise files.FileError(f"chunk {index} of this upload is being written already: send it again once "
                                  "that request has ended", "conflict", 409)
        _writing.add(key)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(record_name(index), dir_fd=dir_fd)
            size = await _write(fd, index, body)
            digest = getattr(body, "digest", None)  # the host's, for a chunk on the bulk port
            _write_json(record_name(index), dir_fd, {"size": size, **({"sha256": digest} if digest else {})},
                        owner, group)
            _write_json(STAMP, dir_fd, stamp_of(os.fstat(fd)), owner, group)  # no await since the last write
            return size
        finally:
            _writing.discard(key)
    finally:
        os.close(fd)


async def _write(fd: int, index: int, body) -> int:
    base, size = index * SLOT, 0
    async for block in body.iter_chunked(files.CHUNK):
        if size + len(block) > SLOT:
            raise files.FileError(f"a chunk holds at most {SLOT >> 20} MiB", "too_large", 413)
        view = memoryview(block)
        while view:
            view = view[os.pwrite(fd, view, base + size + len(block) - len(view)):]
        size += len(block)
    return size
