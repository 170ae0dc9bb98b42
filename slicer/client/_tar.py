"""Extracting a tar made by a guest: hostile input, checked member by member by us.

Python's ``tarfile`` filters are not relied on (the ``data`` filter of Python 3.11.7 is
escaped by CVE-2025-4517). The rules here never follow a link while writing, so nothing can
land outside the destination however members are ordered:

- names: relative, no ``..``, no NUL, at most 4096 bytes;
- no existing symlink on the way to a member (an earlier member cannot redirect a later one);
- what a member replaces is unlinked first (never written through, hard links included);
- symlinks: relative targets that stay inside the destination (lexically);
- hard links: to a regular file already extracted, reached without symlinks;
- files are created with ``O_EXCL | O_NOFOLLOW``; modes keep only the permission bits;
- devices, FIFOs and anything else are refused.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import stat
import tarfile
from pathlib import Path
from typing import IO

from slicer.client._errors import UnsafeArchive

MAX_NAME = 4096


def _parts(name: str) -> list[str]:
    if not name or "\0" in name or len(name.encode()) > MAX_NAME:
        raise UnsafeArchive(f"tar member name {name[:80]!r} is empty, too long or has a NUL")
    if name.startswith("/") or posixpath.isabs(name):
        raise UnsafeArchive(f"tar member {name!r} has an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchive(f"tar member {name!r} contains '..'")
    return parts


def _target(dest: Path, name: str) -> Path:
    """Where ``name`` goes, checked not to pass through a symlink already there."""
    parts = _parts(name)
    cur = dest
    for part in parts[:-1]:
        cur = cur / part
        if cur.is_symlink():
            raise UnsafeArchive(f"tar member {name!r} would be written through the symlink {cur}")
    return dest.joinpath(*parts) if parts else dest


def _clear(path: Path, keep_dir: bool) -> None:
    """Remove what is at ``path`` (never follow it); a directory stays if ``keep_dir``."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()
    elif path.is_dir() and not keep_dir:
        shutil.rmtree(path)


def extract(fileobj: IO[bytes], dest: Path) -> int:
    """Extract the tar stream ``fileobj`` into ``dest`` (created if missing); returns the
    member count. Raises :class:`UnsafeArchive` at the first member that breaks the rules."""
    dest.mkdir(parents=True, exist_ok=True)
    dest = Path(os.path.realpath(dest))
    count = 0
    with tarfile.open(fileobj=fileobj, mode="r|*") as tf:
        for member in tf:
            target = _target(dest, member.name)
            mode = member.mode & 0o777
            if member.isdir():
                _clear(target, keep_dir=True)
                target.mkdir(parents=True, exist_ok=True)
                target.chmod(mode | 0o700)  # we must be able to write into it
            elif member.isfile():
                _clear(target, keep_dir=False)
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tf.extractfile(member)
                assert src is not None
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
                with os.fdopen(fd, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
            elif member.issym():
                link = member.linkname
                inside = posixpath.normpath(posixpath.join(posixpath.dirname("/".join(_parts(member.name))), link))
                if not link or posixpath.isabs(link) or inside == ".." or inside.startswith("../"):
                    raise UnsafeArchive(f"tar symlink {member.name!r} -> {link!r} points outside the destination")
                _clear(target, keep_dir=False)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(link, target)
            elif member.islnk():
                source = _target(dest, member.linkname)
                if source.is_symlink() or not source.is_file() or not stat.S_ISREG(source.lstat().st_mode):
                    raise UnsafeArchive(f"tar hard link {member.name!r} -> {member.linkname!r} is not to a file "
                                        "extracted before it")
                _clear(target, keep_dir=False)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(source, target, follow_symlinks=False)
            else:
                raise UnsafeArchive(f"tar member {member.name!r} is a device, FIFO or other special file")
            count += 1
    return count
