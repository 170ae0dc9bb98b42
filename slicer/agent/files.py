"""Copy files in and out of the guest (binary or tar, streamed) and the ``fs/*`` operations.

Tar work runs in a thread on ``tarfile``'s stream modes; the thread reads the request body
and writes the response through the event loop, so nothing is held whole in memory.
Extraction checks every member before it touches the disk: no absolute names, no ``..``,
no path that leads out through a symlink, no link pointing out, no device files.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import io
import os
import posixpath
import pwd
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Iterator

CHUNK = 65536


class FileError(Exception):
    def __init__(self, message: str, code: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


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


def not_found(path: str) -> FileError:
    return FileError(f"{path}: no such file or directory", "not_found", 404)


# -- binary -------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_file(path: str, permissions: int | None, uid: int | None, gid: int | None,
                fsync: bool = False) -> Iterator[io.BufferedWriter]:
    """A file to write ``path``'s new content into: a temp file beside it, renamed into place
    when the block ends (removed if it fails). Mode and owner are set by descriptor (in a
    directory a guest user can write, the temp name may be a symlink by now); without
    ``permissions`` it keeps those of the file it replaces (:func:`kept_mode`)."""
    parent = os.path.dirname(path)
    refuse_user_links(parent)
    if os.path.isdir(path):
        raise FileError(f"{path} is a directory; send a tar (mode=tar) or name the file", "is_directory")
    if not os.path.isdir(parent):
        raise not_found(parent)
    mode = permissions if permissions is not None else kept_mode(path)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=".slicer-cp-")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), mode)
            if uid is not None or gid is not None:
                os.fchown(f.fileno(), uid if uid is not None else -1, gid if gid is not None else -1)
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


async def receive_file(path: str, chunks, permissions: int | None, uid: int | None, gid: int | None) -> int:
    """Write the body to ``path`` (atomically: a temp file renamed into place)."""
    size = 0
    with atomic_file(path, permissions, uid, gid) as f:
        async for chunk in chunks:
            f.write(chunk)
            size += len(chunk)
    return size


def kept_mode(path: str) -> int:
    """The permission bits a file replacing ``path`` keeps: those of the regular file there (never
    set-id bits, never through a symlink: a guest user may have planted either), else 0644."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0o644
    return stat.S_IMODE(st.st_mode) & 0o777 if stat.S_ISREG(st.st_mode) else 0o644


def open_for_sending(path: str) -> tuple[io.BufferedReader, int, int]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise not_found(path) from None
    if stat.S_ISDIR(st.st_mode):
        raise FileError(f"{path} is a directory; ask for a tar (mode=tar)", "is_directory")
    return open(path, "rb"), st.st_size, stat.S_IMODE(st.st_mode)


# -- tar ----------------------------------------------------------------------------------------
class BodyReader(io.RawIOBase):
    """A blocking file over an aiohttp request body, for use from a worker thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, content) -> None:
        self._loop = loop
        self._content = content

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = asyncio.run_coroutine_threadsafe(self._content.read(len(b)), self._loop).result()
        b[: len(data)] = data
        return len(data)


class ResponseWriter(io.RawIOBase):
    """A blocking file over an aiohttp StreamResponse, for use from a worker thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, response) -> None:
        self._loop = loop
        self._response = response

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        data = bytes(b)
        asyncio.run_coroutine_threadsafe(self._response.write(data), self._loop).result()
        return len(data)


def excluded(rel: str, patterns: list[str]) -> bool:
    """Whether the entry at ``rel`` (relative, ``/``-separated) matches an ``exclude`` pattern
    (globs; ``**`` spans directories; a pattern without ``/`` also matches any base name)."""
    base = rel.rsplit("/", 1)[-1]
    for pattern in patterns:
        flat = pattern.replace("**/", "*").replace("/**", "*").replace("**", "*")
        if fnmatch.fnmatchcase(rel, flat) or ("/" not in pattern and fnmatch.fnmatchcase(base, flat)):
            return True
    return False


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def check_member(root: str, member: tarfile.TarInfo) -> str:
    """The absolute destination of ``member`` under ``root``, or FileError if it is unsafe."""
    name = member.name
    if name.startswith("/") or posixpath.isabs(name):
        raise FileError(f"tar member {name!r} has an absolute path", "unsafe_tar")
    if ".." in name.split("/"):
        raise FileError(f"tar member {name!r} contains '..'", "unsafe_tar")
    if member.isdev() or not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
        raise FileError(f"tar member {name!r} is a device or special file", "unsafe_tar")
    target = os.path.normpath(os.path.join(root, name))
    parent = os.path.realpath(os.path.dirname(target)) if target != root else root
    if not _within(parent, root) or not _within(target, root):
        raise FileError(f"tar member {name!r} would be written outside {root} (through a symlink)", "unsafe_tar")
    if member.issym():
        link = member.linkname
        resolved = os.path.normpath(os.path.join(os.path.dirname(target), link))
        if posixpath.isabs(link) or not _within(resolved, root):
            raise FileError(f"tar symlink {name!r} -> {link!r} points outside {root}", "unsafe_tar")
    if member.islnk():
        resolved = os.path.normpath(os.path.join(root, member.linkname))
        if posixpath.isabs(member.linkname) or not _within(os.path.realpath(resolved), root):
            raise FileError(f"tar hard link {name!r} -> {member.linkname!r} points outside {root}", "unsafe_tar")
    return target


def refuse_user_links(path: str) -> None:
    """As root, refuse a path that passes through a symlink a guest user owns: that user could
    point it anywhere (``ln -s /etc ~/dir``), and root would write there. Root's own links
    (``/var/run``) are followed."""
    if os.geteuid() != 0:
        return
    parts = os.path.normpath(path).split("/")
    for i in range(2, len(parts) + 1):
        prefix = "/".join(parts[:i])
        try:
            st = os.lstat(prefix)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode) and st.st_uid != 0:
            raise FileError(f"{prefix} is a symlink of uid {st.st_uid}: not followed as root", "unsafe_path", 409)


DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _walk(root_fd: int, rel: str, make: bool) -> int:
    """A new descriptor of directory ``rel`` under ``root_fd``, one component at a time and
    never through a symlink (made on the way when ``make``)."""
    fd = os.dup(root_fd)
    for name in [p for p in rel.split("/") if p not in ("", ".")]:
        try:
            if make:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o755, dir_fd=fd)
            nxt = os.open(name, DIR_FLAGS, dir_fd=fd)
        except OSError as e:
            raise FileError(f"{rel}: {name} is not a directory of the tree ({e.strerror})", "unsafe_tar") from None
        finally:
            os.close(fd)
        fd = nxt
    return fd


def _clear(name: str, dir_fd: int) -> None:
    """Remove what is at ``name`` unless it is a directory: a member replaces it, never writes through it."""
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISDIR(os.lstat(name, dir_fd=dir_fd).st_mode):
            os.unlink(name, dir_fd=dir_fd)


def _extract_member(tf: tarfile.TarFile, member: tarfile.TarInfo, root_fd: int, mode: int | None,
                    owner: tuple[int, int] | None) -> None:
    """One member, written by descriptor: created with O_EXCL|O_NOFOLLOW, its mode and owner set
    on that descriptor, so nothing a guest user swaps in meanwhile is written, chmod-ed or chown-ed."""
    rel = os.path.normpath(member.name)
    parent, name = os.path.split(rel)
    pfd = _walk(root_fd, parent, make=True)
    try:
        if member.isdir():
            _clear(name, pfd)
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o700, dir_fd=pfd)
            fd = os.open(name, DIR_FLAGS, dir_fd=pfd)
        elif member.isfile():
            _clear(name, pfd)
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=pfd)
            src = tf.extractfile(member)
            assert src is not None
            with open(os.dup(fd), "wb") as out:
                shutil.copyfileobj(src, out, CHUNK)
        elif member.issym():
            _clear(name, pfd)
            os.symlink(member.linkname, name, dir_fd=pfd)
            if owner is not None:
                os.chown(name, *owner, dir_fd=pfd, follow_symlinks=False)
            return
        else:  # a hard link to a member already extracted (check_member kept it inside)
            _clear(name, pfd)
            src_parent, src_name = os.path.split(os.path.normpath(member.linkname))
            sfd = _walk(root_fd, src_parent, make=False)
            try:
                os.link(src_name, name, src_dir_fd=sfd, dst_dir_fd=pfd, follow_symlinks=False)
            finally:
                os.close(sfd)
            return
        try:
            if owner is not None:
                os.fchown(fd, *owner)  # before the mode: a chown clears set-id bits
            os.fchmod(fd, mode if mode is not None and member.isfile() else member.mode & 0o7777)
            os.utime(fd, (member.mtime, member.mtime))
        finally:
            os.close(fd)
    finally:
        os.close(pfd)


def extract_tar(fileobj, root: str, permissions: int | None, uid: int | None, gid: int | None,
                exclude: list[str] | None = None) -> int:
    """Extract a tar stream into ``root`` (created if missing); returns the member count.
    Members matching an ``exclude`` pattern (see :func:`excluded`) are skipped. Everything is
    written through directory descriptors (see :func:`_extract_member`); as root, owners are the
    archive's unless ``uid``/``gid`` say otherwise."""
    refuse_user_links(root)
    os.makedirs(root, exist_ok=True)
    root = os.path.realpath(root)
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    count = 0
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*") as tf:
            for member in tf:
                if exclude and excluded(member.name.removeprefix("./").rstrip("/"), exclude):
                    continue
                check_member(root, member)
                owner = None
                if os.geteuid() == 0:
                    owner = (uid if uid is not None else member.uid, gid if gid is not None else member.gid)
                if os.path.normpath(member.name) != ".":
                    _extract_member(tf, member, root_fd, permissions, owner)
                count += 1
    finally:
        os.close(root_fd)
    return count


def write_tar(fileobj, path: str) -> None:
    """Stream ``path`` (file or directory) as an uncompressed tar, named by its basename; like
    ``tar --one-file-system``, other mounts below it (``/proc`` and its endless ``kcore``,
    ``/sys``) are left out."""
    device = os.stat(path).st_dev
    base = os.path.basename(path.rstrip("/")) or "."
    with tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.PAX_FORMAT) as tf:
        tf.add(path, arcname=base, recursive=False)
        if not os.path.isdir(path) or os.path.islink(path):
            return
        for dirpath, dirnames, filenames in os.walk(path):
            rel_dir = os.path.relpath(dirpath, path)
            keep = []
            for name in sorted(dirnames):
                full = os.path.join(dirpath, name)
                tf.add(full, arcname=posixpath.normpath(f"{base}/{rel_dir}/{name}"), recursive=False)
                if not os.path.islink(full) and os.lstat(full).st_dev == device:
                    keep.append(name)
            dirnames[:] = keep
            for name in sorted(filenames):
                tf.add(os.path.join(dirpath, name), arcname=posixpath.normpath(f"{base}/{rel_dir}/{name}"),
                       recursive=False)


# -- fs -----------------------------------------------------------------------------------------
def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "file"


def describe(path: str, name: str | None = None) -> dict:
    st = os.lstat(path)
    return {
        "name": name or os.path.basename(path) or "/",
        "type": _kind(st.st_mode),
        "size": st.st_size,
        "mtime": int(st.st_mtime),
        "mode": f"{stat.S_IMODE(st.st_mode):04o}",
    }


def fs_stat(path: str) -> dict:
    try:
        return describe(path)
    except FileNotFoundError:
        raise not_found(path) from None


def fs_readdir(path: str) -> list[dict]:
    try:
        with os.scandir(path) as it:
            names = sorted(e.name for e in it)
    except FileNotFoundError:
        raise not_found(path) from None
    except NotADirectoryError:
        raise FileError(f"{path} is not a directory", "not_a_directory") from None
    out = []
    for name in names:
        try:
            out.append(describe(os.path.join(path, name), name))
        except FileNotFoundError:
            continue  # removed while we listed
    return out


def fs_mkdir(path: str, recursive: bool, mode: int | None) -> None:
    try:
        if recursive:
            os.makedirs(path, mode=mode or 0o755, exist_ok=True)
        else:
            os.mkdir(path, mode or 0o755)
    except FileExistsError:
        raise FileError(f"{path} already exists", "exists", 409) from None
    except FileNotFoundError:
        raise not_found(os.path.dirname(path)) from None
    if mode is not None:
        os.chmod(path, mode)


def fs_remove(path: str, recursive: bool) -> None:
    if os.path.realpath(path) == "/":  # "//", "/.", "/tmp/.." and links to / too
        raise FileError(f"refusing to remove / ({path!r})", "invalid_request")
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            if recursive:
                shutil.rmtree(path)
            else:
                os.rmdir(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        raise not_found(path) from None
    except OSError as e:
        raise FileError(f"{path}: {e.strerror} (use recursive=true for a non-empty directory)",
                        "not_empty") from None
