"""How the agent (root in the guest) reaches a path for a request: one rule for every file operation.

A guest user holds only what guest root grants it, and the agent is root: a link the user plants
(``ln -s /root/secret.txt ~/out``, ``ln -s /srv ~/ws``) must not make root read, list, watch or
remove what the user could not. So every path the agent works on is resolved here, by descriptor,
one component at a time (:func:`locate`):

* a symlink on the way (the last component too, unless the operation acts on the link itself) is
  followed only when it belongs to root or to the uid the operation runs as; any other is 409
  ``unsafe_path``. Root's own links (``/var/run``) keep working.
* what is checked is what is used: the caller gets the descriptor of the last directory and a name
  in it, and works with ``dir_fd`` and ``O_NOFOLLOW`` from there, so a directory swapped for a link
  after the check is never followed. Walks of a tree (tar, recursive remove) go by descriptor too.

A request that names a non-root ``uid`` instead runs with that user's rights (:func:`run_as`): the
work is done in a thread of its own whose filesystem uid, gid and groups are the user's (Linux keeps
credentials per thread), so the kernel checks every access as it would for the user.
"""

from __future__ import annotations

import os
import pwd
import stat
import threading

PATH_FLAGS = os.O_PATH | os.O_CLOEXEC
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_LINKS = 40  # as the kernel's ELOOP limit
SYS_SETGROUPS = {"x86_64": 116, "aarch64": 159}  # per-thread when called raw (glibc's wrapper sets every thread)


class FileError(Exception):
    def __init__(self, message: str, code: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


def not_found(path: str) -> FileError:
    return FileError(f"{path}: no such file or directory", "not_found", 404)


def unsafe(path: str, owner: int) -> FileError:
    return FileError(f"{path} is a symlink of uid {owner}: not followed for this request", "unsafe_path", 409)


# -- who the work runs as -----------------------------------------------------------------------
class User:
    """A guest user as :func:`user` found it. (Not a dataclass: ``dataclasses`` pulls ``inspect``
    in, a tenth of a second of the chunked copy's helper start under TCG.)"""

    __slots__ = ("uid", "gid", "groups", "name", "home")

    def __init__(self, uid: int, gid: int, groups: list[int], name: str, home: str | None) -> None:
        self.uid, self.gid, self.groups, self.name, self.home = uid, gid, groups, name, home


def user(uid: int, gid: int | None = None) -> User:
    """``uid`` as the guest's user database knows it: its primary gid (unless ``gid`` is given),
    its supplementary groups (as ``initgroups``), name and home. A uid without an entry gets
    ``gid`` (its own number by default) and no other group."""
    try:
        pw = pwd.getpwuid(uid)
    except KeyError:
        g = uid if gid is None else gid
        return User(uid, g, [g], str(uid), None)
    g = pw.pw_gid if gid is None else gid
    return User(uid, g, sorted(set(os.getgrouplist(pw.pw_name, g))), pw.pw_name, pw.pw_dir or None)


_acting = threading.local()


def acting_uid() -> int:
    """The uid this thread works as (the process's unless inside :func:`run_as`)."""
    return getattr(_acting, "uid", None) or os.geteuid()


def _become(u: User) -> None:
    """Make this thread (only) work on files as ``u``: filesystem uid and gid, groups. Leaving a
    filesystem uid of 0 clears the file capabilities (DAC override and the like) of the thread."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    groups = (ctypes.c_uint * len(u.groups))(*u.groups)
    if libc.syscall(SYS_SETGROUPS[os.uname().machine], len(u.groups), groups) != 0:
        raise OSError(ctypes.get_errno(), "setgroups failed")
    libc.setfsgid(u.gid)
    libc.setfsuid(u.uid)
    if libc.setfsgid(u.gid) != u.gid or libc.setfsuid(u.uid) != u.uid:  # they answer the current value
        raise OSError(f"cannot work as uid {u.uid} gid {u.gid}")
    _acting.uid = u.uid


async def run_as(uid: int | None, fn, *args):
    """``fn(*args)`` in a worker thread: as root when ``uid`` is None or 0, else in a thread of its
    own that works as ``uid`` (its user's gid and groups) and ends with the call, so no other
    work ever runs with its credentials."""
    # Imported here: ``slicer-agent upload`` (a process of its own per chunked copy) uses this
    # module too, and asyncio alone takes a second to import under TCG.
    import asyncio
    import concurrent.futures

    if not uid:
        return await asyncio.to_thread(fn, *args)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, initializer=_become, initargs=(user(uid),))
    try:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)
    except concurrent.futures.BrokenExecutor:
        raise FileError(f"cannot work as uid {uid} in the guest", "invalid_request") from None
    finally:
        pool.shutdown(wait=False)


# -- the walk -----------------------------------------------------------------------------------
def locate(path: str, follow: bool = True) -> tuple[int, str]:
    """Resolve absolute ``path`` by descriptor under the rule above: the descriptor of the
    directory its last component is in (``O_PATH``; the caller closes it) and that component's
    name there (``.`` when the path is a directory reached through its own name, like ``/``).
    With ``follow`` a symlink in last place is resolved too; without, it is what the name names.
    The last component need not exist; a missing directory on the way is 404."""
    trusted = {0, acting_uid()}
    todo = [p for p in path.split("/") if p][::-1]  # a stack: the next component is last
    fd = os.open("/", PATH_FLAGS | os.O_DIRECTORY)
    where, links = "", 0
    try:
        while todo:
            name = todo.pop()
            if name == ".":
                continue
            if name == "..":
                nxt = os.open("..", PATH_FLAGS | os.O_DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd, where = nxt, os.path.dirname(where)
                continue
            here = f"{where}/{name}"
            if not todo and not follow:
                return fd, name
            try:
                lfd = os.open(name, PATH_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                if not todo:
                    return fd, name
                raise not_found(here) from None
            try:
                st = os.fstat(lfd)
                if stat.S_ISLNK(st.st_mode):
                    if st.st_uid not in trusted:
                        raise unsafe(here, st.st_uid)
                    links += 1
                    if links > MAX_LINKS:
                        raise FileError(f"{path}: too many levels of symbolic links", "invalid_request")
                    target = os.readlink("", dir_fd=lfd)  # the link this descriptor holds, not the name's
                    if target.startswith("/"):
                        nxt = os.open("/", PATH_FLAGS | os.O_DIRECTORY)
                        os.close(fd)
                        fd, where = nxt, ""
                    todo.extend(p for p in reversed(target.split("/")) if p)
                    continue
                if not todo:
                    return fd, name
                if not stat.S_ISDIR(st.st_mode):
                    raise FileError(f"{here} is not a directory", "not_a_directory")
                os.close(fd)
                fd, lfd, where = lfd, -1, here
            finally:
                if lfd >= 0:
                    os.close(lfd)
        return fd, "."
    except BaseException:
        os.close(fd)
        raise


def open_at(path: str, flags: int, follow: bool = True) -> int:
    """``open(path, flags)`` under the rule (see :func:`locate`); never through a symlink put in
    place after the check (409 ``unsafe_path``)."""
    pfd, name = locate(path, follow)
    try:
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
    except FileNotFoundError:
        raise not_found(path) from None
    except OSError as e:
        if e.errno == 40 and follow:  # ELOOP: a symlink swapped in since the walk
            raise FileError(f"{path} became a symlink: not followed for this request", "unsafe_path", 409) from None
        raise
    finally:
        os.close(pfd)


def open_dir(path: str) -> int:
    """A directory's descriptor (``O_RDONLY``), reached under the rule."""
    try:
        return open_at(path, os.O_RDONLY | os.O_DIRECTORY)
    except NotADirectoryError:
        raise FileError(f"{path} is not a directory", "not_a_directory") from None


def check_dir(path: str) -> None:
    """FileError unless ``path`` is a directory reached under the rule (a working directory)."""
    os.close(open_dir(path))


def lstat(path: str, follow: bool = True) -> os.stat_result | None:
    """What ``path`` is (the link itself unless ``follow``), reached under the rule; None if missing."""
    pfd, name = locate(path, follow)
    try:
        return os.stat(name, dir_fd=pfd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    finally:
        os.close(pfd)


def make_dirs(path: str, mode: int = 0o755) -> int:
    """``mkdir -p`` under the rule; the descriptor of the last directory (``O_RDONLY``)."""
    parts = [p for p in path.split("/") if p]
    for i in range(1, len(parts) + 1):
        pfd, name = locate("/" + "/".join(parts[:i]))
        try:
            os.mkdir(name, mode, dir_fd=pfd)
        except FileExistsError:
            pass
        finally:
            os.close(pfd)
    return open_dir(path)
