"""Copy files in and out of the guest (binary or tar, streamed) and the ``fs/*`` operations.

Tar work runs in a thread on ``tarfile``'s stream modes; the thread reads the request body
and writes the response through the event loop, so nothing is held whole in memory.
Extraction checks every member before it touches the disk: no absolute names, no ``..``,
no path that leads out through a symlink, no link pointing out, no device files.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import grp
import io
import os
import posixpath
import pwd
import secrets
import shutil
import stat
import tarfile
import time
from collections.abc import Callable, Iterator

from slicer.agent.paths import DIR_FLAGS, FileError, locate, lstat, make_dirs, not_found, open_at, open_dir

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
        tmp = f".slicer-cp-{secrets.token_hex(6)}"
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


# -- tar ----------------------------------------------------------------------------------------
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
    """Extract a tar stream into ``root`` (created if missing, under the rule of
    :mod:`slicer.agent.paths`); returns the member count. Members matching an ``exclude`` pattern
    (see :func:`excluded`) are skipped. Everything is written through directory descriptors (see
    :func:`_extract_member`); as root, owners are the archive's unless ``uid``/``gid`` say otherwise."""
    root_fd = make_dirs(root)
    root = os.path.realpath(root)
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


_names: dict[tuple[str, int], str] = {}


def _name_of(kind: str, number: int) -> str:
    if (kind, number) not in _names:
        try:
            _names[kind, number] = pwd.getpwuid(number).pw_name if kind == "u" else grp.getgrgid(number).gr_name
        except KeyError:
            _names[kind, number] = ""
    return _names[kind, number]


def _add(tf: tarfile.TarFile, arcname: str, entry: Entry) -> None:
    """One tar member for ``entry`` (sockets have none)."""
    st, mode = entry.st, entry.st.st_mode
    info = tarfile.TarInfo(arcname)
    info.mode, info.uid, info.gid, info.mtime = stat.S_IMODE(mode), st.st_uid, st.st_gid, int(st.st_mtime)
    info.uname, info.gname = _name_of("u", st.st_uid), _name_of("g", st.st_gid)
    if stat.S_ISREG(mode) and entry.fd >= 0:
        info.size = st.st_size
        with open(os.dup(entry.fd), "rb") as f:
            tf.addfile(info, f)
        return
    if stat.S_ISDIR(mode):
        info.type = tarfile.DIRTYPE
    elif stat.S_ISLNK(mode):
        info.type, info.linkname = tarfile.SYMTYPE, entry.link
    elif stat.S_ISFIFO(mode):
        info.type = tarfile.FIFOTYPE
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        info.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
        info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    else:
        return
    tf.addfile(info)


def _add_tree(tf: tarfile.TarFile, dir_fd: int, prefix: str, rel: str, device: int, patterns: list[str]) -> None:
    """The contents of directory ``dir_fd``, by descriptor: never into a symlink, nor into another mount."""
    for name in sorted(os.listdir(dir_fd)):
        path = f"{rel}/{name}" if rel else name
        if patterns and excluded(path, patterns):
            continue
        try:
            entry = Entry.at(name, dir_fd)
        except OSError:
            continue  # gone meanwhile, or swapped for a symlink after its stat
        try:
            _add(tf, f"{prefix}/{path}" if prefix else path, entry)
            if entry.is_dir and entry.st.st_dev == device:
                _add_tree(tf, entry.fd, prefix, path, device, patterns)
        finally:
            entry.close()


def write_tar(fileobj, entry: Entry, base: str, patterns: list[str] | None = None, contents: bool = False) -> None:
    """Stream ``entry`` (see :meth:`Entry.of`) as an uncompressed tar, named ``base`` (``.`` for
    none); with ``contents``, a directory's contents only, named relative to it. Like
    ``tar --one-file-system``, other mounts below it (``/proc`` and its endless ``kcore``, ``/sys``)
    are left out; ``patterns`` exclude entries (see :func:`excluded`)."""
    prefix = "" if base == "." else base
    with tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.PAX_FORMAT) as tf:
        if not contents:
            _add(tf, base, entry)
        if entry.is_dir:
            _add_tree(tf, entry.fd, "" if contents else prefix, "", entry.st.st_dev, patterns or [])


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
