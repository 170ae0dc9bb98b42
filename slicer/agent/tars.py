"""Tars in and out of the guest, on ``tarfile``'s stream modes.

Tar work runs in a thread; the thread reads the request body and writes the response through
the event loop, so nothing is held whole in memory. Extraction checks every member before it
touches the disk: no absolute names, no ``..``, no path that leads out through a symlink, no link
pointing out, no device files.
"""

from __future__ import annotations

import contextlib
import fnmatch
import grp
import os
import posixpath
import pwd
import shutil
import stat
import tarfile

from slicer.agent.files import CHUNK, Entry
from slicer.agent.paths import DIR_FLAGS, FileError, make_dirs


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
