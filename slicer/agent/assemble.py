"""A chunked copy's chunks as finalise reads them (slicer.agent.upload): checked against the
manifest, then the session's data file (slicer.agent.stripe) made the new file in place, or its
chunks copied out of it."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import stat
from collections.abc import Iterator

from slicer.agent import paths, stripe

FALLOC_FL_COLLAPSE_RANGE, FALLOC_FL_INSERT_RANGE = 0x08, 0x20  # linux/falloc.h
READ = 1 << 20


class UploadError(Exception):
    pass


class Part:
    """One chunk of a manifest: its entry, where it starts in the data file, and whether its
    recorded digest vouches for it (see slicer.agent.stripe)."""

    __slots__ = ("entry", "offset", "vouched")

    def __init__(self, entry: dict, offset: int, vouched: bool) -> None:
        self.entry, self.offset, self.vouched = entry, offset, vouched

    @property
    def size(self) -> int:
        return self.entry["size"]


_libc_fallocate = None  # looked up once per helper run: a copy in small chunks closes a gap per chunk


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    global _libc_fallocate
    import ctypes  # only to cut gaps out: Python has no fallocate with flags

    if _libc_fallocate is None:
        _libc_fallocate = ctypes.CDLL(None, use_errno=True).fallocate64  # 64-bit offsets on every glibc
        _libc_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if _libc_fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class Chunks:
    """A session's chunks as its manifest lists them, in the session's data file (held open)."""

    def __init__(self, session_fd: int, session_path: str, manifest: dict) -> None:
        self.path, self.parts, self.total = session_path, [], manifest["size"]
        self.fd = self.dir_fd = -1
        self.writable = False  # the data file is open for writing (it can become the new file)
        self.collapsed = 0  # gaps cut out by take (put back by give_back)
        if not manifest["chunks"]:
            return
        if len(manifest["chunks"]) > stripe.MAX_SLOTS:
            raise UploadError(f"a copy has at most {stripe.MAX_SLOTS} chunks")
        try:
            self.dir_fd = os.open("chunks", paths.DIR_FLAGS, dir_fd=session_fd)
        except OSError as e:
            raise UploadError(f"{session_path}: no chunks directory ({e.strerror})") from None
        try:
            self._open(manifest)
        except BaseException:
            self.close()
            raise

    def _open(self, manifest: dict) -> None:
        for flags in (os.O_RDWR, os.O_RDONLY):  # read-only: its owner took write away (then it is copied)
            try:
                self.fd = os.open(stripe.DATA, flags | stripe.OPEN, dir_fd=self.dir_fd)
                self.writable = flags == os.O_RDWR
                break
            except PermissionError:
                continue
            except FileNotFoundError:
                raise UploadError(f"{self.path}: no chunk has landed") from None
            except OSError as e:
                raise UploadError(f"{self.path}: chunks/{stripe.DATA}: {e.strerror}") from None
        if self.fd < 0 or not stat.S_ISREG(os.fstat(self.fd).st_mode):
            raise UploadError(f"{self.path}: chunks/{stripe.DATA} is not a readable file")
        fresh = stripe.read_json(stripe.STAMP, self.dir_fd) == stripe.stamp_of(os.fstat(self.fd))
        for chunk in manifest["chunks"]:
            i = chunk["index"]
            record = stripe.read_json(stripe.record_name(i), self.dir_fd)
            if record is None:
                raise UploadError(f"{self.path}: chunk {i} is missing")
            if record.get("size") != chunk["size"]:
                raise UploadError(f"chunk {i} has {record.get('size')} bytes, expected {chunk['size']}")
            self.parts.append(Part(chunk, i * stripe.SLOT, fresh and record.get("sha256") == chunk["sha256"]))

    def close(self) -> None:
        for fd in (self.fd, self.dir_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.dir_fd = -1

    def __enter__(self) -> Chunks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def blocks(self, part: Part, check: bool) -> Iterator[bytes]:
        """The part's bytes; with ``check``, its SHA-256 is checked as they are read (a mismatch
        raises UploadError after its last byte)."""
        digest, seen = _sha256() if check else None, 0
        while seen < part.size and (block := os.pread(self.fd, min(READ, part.size - seen), part.offset + seen)):
            seen += len(block)
            if digest is not None:
                digest.update(block)
            yield block
        if seen != part.size:
            raise UploadError(f"chunk {part.entry['index']} has {seen} bytes, expected {part.size}")
        if digest is not None and digest.hexdigest() != part.entry["sha256"]:
            raise UploadError(f"chunk {part.entry['index']} does not match its SHA-256")

    def check(self) -> None:
        """Every chunk no recorded digest vouches for, read and checked: before anything is written."""
        for part in self.parts:
            if not part.vouched:
                for _ in self.blocks(part, check=True):
                    pass

    def stream(self) -> Iterator[bytes]:
        for part in self.parts:
            yield from self.blocks(part, check=False)

    def _stride(self) -> int | None:
        """The chunks' common size if they lie as a file's would once the gaps between their
        slots are cut out (each but the last the same size, in whole filesystem blocks)."""
        size = self.parts[0].size
        if any(p.size != size for p in self.parts[:-1]) or self.parts[-1].size > size:
            return None
        if size != stripe.SLOT and (len(self.parts) > 1 and size % os.fstatvfs(self.fd).f_frsize):
            return None
        return size

    def take(self, dir_fd: int, tmp: str) -> int | None:
        """For :func:`files.atomic_file`: the data file becomes the new file itself (a hard link;
        the gaps between chunks then cut out in place); its descriptor, at its end. ``None`` where
        it cannot (linked elsewhere, read-only, another filesystem, chunks of odd sizes): then the
        chunks are copied into a new file.

        It is made 0600 before it is linked beside the destination, where others may look."""
        stride = self._stride()
        if stride is None or not self.writable or os.fstat(self.fd).st_nlink != 1:
            return None
        os.fchmod(self.fd, 0o600)  # atomic_file sets the mode asked for once the file is whole
        try:
            os.link(stripe.DATA, tmp, src_dir_fd=self.dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        except FileExistsError:
            raise  # the temp name is taken: atomic_file tries another
        except OSError:
            return None  # another filesystem (a destination that is a mount point): copied
        fd = os.dup(self.fd)
        try:
            st, linked = os.fstat(fd), os.stat(tmp, dir_fd=dir_fd, follow_symlinks=False)
            if (st.st_dev, st.st_ino) != (linked.st_dev, linked.st_ino):  # the name was changed under us
                raise UploadError("the session's data file changed while the file was assembled")
            if not self._close_gaps(stride):
                os.close(fd)
                os.unlink(tmp, dir_fd=dir_fd)
                return None
            os.ftruncate(fd, self.total)
            os.lseek(fd, self.total, os.SEEK_SET)
            return fd
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            with contextlib.suppress(UploadError):
                self.give_back()
            raise

    def _close_gaps(self, stride: int) -> bool:
        """The gaps between slots cut out, last first; False if this filesystem cannot (tmpfs)."""
        if stride == stripe.SLOT:
            return True
        try:
            for i in reversed(range(len(self.parts) - 1)):
                _fallocate(self.fd, FALLOC_FL_COLLAPSE_RANGE, i * stripe.SLOT + stride, stripe.SLOT - stride)
                self.collapsed += 1
        except OSError as e:
            if self.collapsed or e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS, errno.EPERM):
                raise UploadError(f"cutting the gaps between chunks failed: {e.strerror}") from None
            return False
        return True

    def give_back(self) -> None:
        """A finalise that failed after cutting gaps out puts them back (``FALLOC_FL_INSERT_RANGE``),
        so that the session can still be finalised (reading every chunk: its stamp moved) or aborted."""
        stride = self.parts[0].size if self.parts else 0
        try:
            for i in range(len(self.parts) - 1 - self.collapsed, len(self.parts) - 1):
                _fallocate(self.fd, FALLOC_FL_INSERT_RANGE, i * stripe.SLOT + stride, stripe.SLOT - stride)
                self.collapsed -= 1
        except OSError as e:
            raise UploadError(f"putting back the gaps between chunks failed ({e.strerror}): "
                              "abort the copy and send it again") from None

    def copy_to(self, dst: io.BufferedWriter) -> None:
        """Every chunk appended to ``dst`` inside the kernel (no copy through Python); through Python
        where the kernel cannot (another filesystem: the destination on the guest's tmpfs)."""
        dst.flush()
        for part in self.parts:
            left, pos = part.size, part.offset
            try:
                while left and (n := os.copy_file_range(self.fd, dst.fileno(), left, pos)):
                    left, pos = left - n, pos + n
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF):
                    raise
                while left and (block := os.pread(self.fd, min(READ, left), pos)):
                    dst.write(block)
                    left, pos = left - len(block), pos + len(block)
                dst.flush()
            if left:
                raise UploadError(f"chunk {part.entry['index']} is {left} bytes shorter than its {part.size}")


def _sha256():  # hashlib (OpenSSL) only for a chunk no record vouches for
    import hashlib

    return hashlib.sha256()


class StreamReader(io.RawIOBase):
    """A file over :meth:`Chunks.stream`, for ``tarfile``."""

    def __init__(self, blocks: Iterator[bytes]) -> None:
        self._blocks = blocks
        self._rest = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._rest:
            self._rest = next(self._blocks, b"")
            if not self._rest:
                return 0
        n = min(len(b), len(self._rest))
        b[:n], self._rest = self._rest[:n], self._rest[n:]
        return n
