"""Copy files in and out of the guest (streamed, written atomically) and the ``fs/*`` operations.

Tars are :mod:`slicer.agent.tars`'. The chunked copy's helper imports this module at each start,
under TCG: what only some calls need (``shutil``) is imported in them.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import pwd
import stat
import time
from collections.abc import Callable, Iterator

from slicer.agent.paths import FileError, locate, lstat, make_dirs, not_found, open_at, open_dir

CHUNK = 65536


def parse_permissions(value: str | None) -> int | None:
    if not value:
        return None
    try:
        mode = int(value, 8)
    except ValueError:
        raise FileError(f"permissions must be octal like 0644, not {value!r}", "invalid_request") from None
    if not 0 <= mode <= 0o7777:
        raise FileError("permissions out of range", "invalid_request")
    return mode


def parse_id(value: str | None, name: str) -> int | None:
    if value is None or value == "":
        return None
    if not value.isdigit() or int(value) >= 2**32:
        raise FileError(f"{name} must be a number", "invalid_request")
    return int(value)


def home_of(uid: int) -> str | None:
    """The home directory of ``uid`` in the guest's own user database (None if it has none)."""
    try:
        return pwd.getpwuid(uid).pw_dir or None
    except KeyError:
        return None


def require_path(value: str | None, uid: int | None = None) -> str:
    """An absolute, normalised guest path; ``~`` and ``~/…`` are the home of ``uid`` (root's
    when no uid is given), as the SDKs' ``vm:~/file`` forms expect."""
    if not value:
        raise FileError("path is required", "invalid_request")
    if value == "~" or value.startswith("~/"):
        home = home_of(uid or 0)
        if home is None:
            raise FileError(f"{value}: uid {uid or 0} has no home directory in the guest", "invalid_request")
        value = home.rstrip("/") + "/" + value[2:]
    if not value.startswith("/"):
        raise FileError(f"path must be absolute or start with ~/, not {value!r}", "invalid_request")
    return os.path.normpath(value)


# -- binary -------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_file(path: str, permissions: int | None, uid: int | None, gid: int | None,
                fsync: bool = False, dir_fd: int | None = None,
                adopt: Callable[[int, str], int | None] | None = None) -> Iterator[io.BufferedWriter]:
    """A file to write ``path``'s new content into: a temp file beside it, renamed into place
    when the block ends (removed if it fails). Its directory is reached under the rule of
    :mod:`slicer.agent.paths` (or is ``dir_fd``, ``path`` then a name in it) and everything after
    goes through that descriptor; mode and owner are set on the file's own. Without
    ``permissions`` it keeps those of the file it replaces (:func:`kept_mode`).

    ``adopt(dir_fd, temp_name)`` may put an existing file at the temp name instead (a hard link: the
    content is not copied) and return its descriptor, open for writing where the new content
    goes on; ``None`` when it cannot, and an empty file is made as usual."""
    if dir_fd is None:
        pfd, name = locate(path, follow=False)
    else:
        pfd, name = os.dup(dir_fd), path
    try:
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        except NotADirectoryError:
            raise not_found(os.path.dirname(path)) from None
        if name == "." or (st is not None and stat.S_ISDIR(st.st_mode)):
            raise FileError(f"{path} is a directory; send a tar (mode=tar) or name the file", "is_directory")
        mode = permissions if permissions is not None else kept_mode(st)
        tmp, fd = _temp_file(pfd, path, adopt)
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                os.fchmod(f.fileno(), mode)
                if uid is not None or gid is not None:
                    os.fchown(f.fileno(), uid if uid is not None else -1, gid if gid is not None else -1)
                if fsync:
                    os.fsync(f.fileno())
            os.replace(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=pfd)
            raise
    finally:
        os.close(pfd)


def _temp_file(pfd: int, path: str, adopt: Callable[[int, str], int | None] | None) -> tuple[str, int]:
    """A free temp name in ``pfd`` and the new file's descriptor (adopted, or made empty). An
    adopter must not replace what it finds at the name (a link fails with EEXIST: a new name is tried)."""
    for _ in range(100):
        tmp = f".slicer-cp-{os.urandom(6).hex()}"
        try:
            if adopt is not None and (fd := adopt(pfd, tmp)) is not None:
                return tmp, fd
            adopt = None  # it could not: the content is written afresh
            return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                                dir_fd=pfd)
        except FileExistsError:
            continue
    raise FileError(f"no temporary name free beside {path}", "copy_failed")


async def receive_file(path: str, chunks, permissions: int | None, uid: int | None, gid: int | None,
                       dir_fd: int | None = None) -> int:
    """Write the body to ``path`` (atomically: a temp file renamed into place)."""
    size = 0
    with atomic_file(path, permissions, uid, gid, dir_fd=dir_fd) as f:
        async for chunk in chunks:
            f.write(chunk)
            size += len(chunk)
    return size


def kept_mode(st: os.stat_result | None) -> int:
    """The permission bits a file replacing one with ``st`` (its lstat) keeps: those of a regular
    file (never set-id bits, never through a symlink: a guest user may have planted either), else 0644."""
    return stat.S_IMODE(st.st_mode) & 0o777 if st is not None and stat.S_ISREG(st.st_mode) else 0o644


def open_for_sending(path: str) -> tuple[io.BufferedReader, int, int]:
    """A file to send, opened under the rule of :mod:`slicer.agent.paths` (a FIFO does not block)."""
    fd = open_at(path, os.O_RDONLY | os.O_NONBLOCK)
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        os.close(fd)
        raise FileError(f"{path} is a directory; ask for a tar (mode=tar)", "is_directory")
    os.set_blocking(fd, True)
    return open(fd, "rb"), st.st_size, stat.S_IMODE(st.st_mode)


class Entry:
    """One thing to put in a tar, held open: ``fd`` for a directory or regular file (-1 else),
    its status, and a symlink's target."""

    __slots__ = ("st", "fd", "link")

    def __init__(self, st: os.stat_result, fd: int = -1, link: str = "") -> None:
        self.st, self.fd, self.link = st, fd, link

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st.st_mode)

    @classmethod
    def at(cls, name: str, dir_fd: int) -> Entry:
        """What ``name`` in ``dir_fd`` is, opened without following it (a symlink is read, not entered)."""
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            return cls(st, link=os.readlink(name, dir_fd=dir_fd))
        if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
            return cls(st)
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        st = os.fstat(fd)  # what was opened (it may have been swapped since the stat)
        if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
            os.close(fd)
            return cls(st)
        os.set_blocking(fd, True)
        return cls(st, fd)

    @classmethod
    def of(cls, path: str, follow: bool) -> Entry:
        """``path`` reached under the rule of :mod:`slicer.agent.paths` (its last link followed
        when ``follow``), opened before any answer is sent."""
        pfd, name = locate(path, follow)
        try:
            return cls.at(name, pfd)
        except FileNotFoundError:
            raise not_found(path) from None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise FileError(f"{path} became a symlink: not followed", "unsafe_path", 409) from None
            raise
        finally:
            os.close(pfd)


# -- fs -----------------------------------------------------------------------------------------
def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "file"


def describe(st: os.stat_result, name: str) -> dict:
    return {
        "name": name,
        "type": _kind(st.st_mode),
        "size": st.st_size,
        # RFC 3339 (UTC, whole seconds): what both official SDKs read (Go: time.Time; TS: a string)
        "mtime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(st.st_mtime)),
        "mode": f"{stat.S_IMODE(st.st_mode):04o}",
    }


def fs_stat(path: str) -> dict:
    """The entry at ``path`` itself (a symlink is described, not followed)."""
    st = lstat(path, follow=False)
    if st is None:
        raise not_found(path)
    return describe(st, os.path.basename(path) or "/")


def fs_readdir(path: str) -> list[dict]:
    dfd = open_dir(path)
    try:
        out = []
        for name in sorted(os.listdir(dfd)):
            try:
                out.append(describe(os.stat(name, dir_fd=dfd, follow_symlinks=False), name))
            except FileNotFoundError:
                continue  # removed while we listed
        return out
    finally:
        os.close(dfd)


def fs_mkdir(path: str, recursive: bool, mode: int | None) -> None:
    if recursive:
        fd = make_dirs(path, mode or 0o755)
    else:
        pfd, name = locate(path, follow=False)
        try:
            os.mkdir(name, mode or 0o755, dir_fd=pfd)
        except FileExistsError:
            raise FileError(f"{path} already exists", "exists", 409) from None
        finally:
            os.close(pfd)
        fd = open_dir(path)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
    finally:
        os.close(fd)


def fs_remove(path: str, recursive: bool) -> None:
    """Remove the entry at ``path`` itself (a symlink, not what it points to); a directory's tree
    by descriptor (``shutil.rmtree`` with ``dir_fd``: it never follows a link, even one swapped in
    midway)."""
    pfd, name = locate(path, follow=False)
    try:
        if name in (".", ".."):  # "/", however it was spelled
            raise FileError(f"refusing to remove / ({path!r})", "invalid_request")
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            if recursive:
                import shutil

                shutil.rmtree(name, dir_fd=pfd)
            else:
                os.rmdir(name, dir_fd=pfd)
        else:
            os.unlink(name, dir_fd=pfd)
    except FileNotFoundError:
        raise not_found(path) from None
    except PermissionError as e:
        raise FileError(f"{path}: {e.strerror}", "permission_denied", 403) from None
    except OSError as e:
        raise FileError(f"{path}: {e.strerror} (use recursive=true for a non-empty directory)",
                        "not_empty") from None
    finally:
        os.close(pfd)
