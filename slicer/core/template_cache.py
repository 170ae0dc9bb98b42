"""A directory of finished templates that daemons on one host share (``template_cache``).

A template's key digests all its saved state depends on (hypervisor, devices, sizes, kernel,
image: see :meth:`slicer.core.templates.Templates.key`) and nothing of the daemon that built it,
so a daemon that needs a template another has built copies it from here instead of booting
one cold (a copy takes a fraction of a second; a cold boot under TCG, 10–20 s). Entries are
``<key>/`` directories, published whole by a rename and never changed in place: a daemon copies
(never links) in and out, so nothing it does to its own template reaches another daemon's.

A daemon about to build a template holds the key's lock (``.lock-<key>``, an ``flock``, which
goes with a daemon that dies) until it has stored it: another daemon, or another group of the
same machine, that needs that key meanwhile waits, then copies it, rather than booting the same
template at the same time.

Guest memory is in these files, and whoever can write here chooses what every daemon's guests
restore: the directory must be its owner's alone (as ``~/.ssh`` is for sshd).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import shutil
import stat
from collections.abc import AsyncIterator
from pathlib import Path

from slicer.core.error_codes import ErrorCode
from slicer.core.errors import SlicerError
from slicer.vmm.base import VMMError
from slicer.vmm.disks import copy_files

log = logging.getLogger(__name__)

COPY_TIMEOUT = 120.0
LOCK_WAIT = 600.0  # past any build's own limit (a stuck builder is then ignored, not waited for forever)
LOCK_POLL = 0.1
SKIPPED = ("meta.json", "retired")  # each daemon writes its own


class TemplateCache:
    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def open(cls, root: Path) -> TemplateCache:
        """The cache at ``root`` (made if missing); :class:`SlicerError` if others could write it."""
        try:
            root.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = root.lstat()
        except OSError as e:
            raise SlicerError(f"template cache {root}: {e.strerror}", ErrorCode.DATA_DIR) from e
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise SlicerError(f"template cache {root} must be a directory of this daemon's user that no one else "
                              "can write (guests restore what it holds): chmod 700 it", ErrorCode.DATA_DIR)
        cache = cls(root)
        cache._remove_abandoned()
        return cache

    def _remove_abandoned(self) -> None:
        """Half-made entries of daemons that died making them (``.new-<key>-<pid>-*``)."""
        for path in self.root.glob(".*-*-*-*"):
            pid = path.name.split("-")[2]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                shutil.rmtree(path, ignore_errors=True)

    @contextlib.asynccontextmanager
    async def building(self, key: str) -> AsyncIterator[None]:
        """Hold the lock of ``key`` while it is looked for and, if missing, built and stored."""
        try:
            fd = os.open(self.root / f".lock-{key}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            log.warning("template cache: no lock for %s (%s); building without it", key, e)
            yield
            return
        try:
            deadline = asyncio.get_running_loop().time() + LOCK_WAIT
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if asyncio.get_running_loop().time() > deadline:
                        log.warning("template cache: %s is still being built elsewhere; building it here too", key)
                        break
                    await asyncio.sleep(LOCK_POLL)  # polled: a daemon that stops is not stuck in flock()
            yield
        finally:
            os.close(fd)  # and the lock with it

    def has(self, key: str) -> bool:
        return (self.root / key / "meta.json").is_file()

    async def fetch(self, key: str, into: Path) -> dict | None:
        """Copy the entry of ``key`` into the directory ``into``; its meta, or None if there is none."""
        entry = self.root / key
        try:
            meta = json.loads((entry / "meta.json").read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("template cache: entry %s is unreadable (%s); building instead", key, e)
            return None
        if not isinstance(meta, dict) or meta.get("key") != key:
            log.warning("template cache: entry %s is not the template of that key; building instead", key)
            return None
        before = entry.stat().st_ino
        await _copy_files(entry, into)
        # A daemon replacing the entry meanwhile (store(replace=True)) could have given this copy
        # the RAM of one build and the device state of another: such a copy is not used.
        if entry.stat().st_ino != before:
            raise OSError(f"entry {key} was replaced while it was copied")
        return meta

    async def store(self, key: str, template: Path, replace: bool = False) -> None:
        """Publish a copy of the finished template directory ``template`` as the entry of ``key``
        (if another daemon published one first, theirs stays, unless ``replace``)."""
        if self.has(key) and not replace:
            return
        tmp = self.root / f".new-{key}-{os.getpid()}-{id(template):x}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o700)
        try:
            await _copy_files(template, tmp)
            # meta.json last, as a template's own: an entry without it was never finished.
            shutil.copyfile(template / "meta.json", tmp / "meta.json")
            entry = self.root / key
            if replace and entry.exists():
                old = self.root / f".old-{key}-{os.getpid()}-{id(template):x}"
                os.rename(entry, old)
                shutil.rmtree(old, ignore_errors=True)
            os.rename(tmp, entry)
        except OSError as e:  # another daemon published it meanwhile (ENOTEMPTY), or the disk is full
            log.info("template cache: entry %s not stored (%s)", key, e)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


async def _copy_files(src: Path, dst: Path) -> None:
    """The files of ``src`` (but :data:`SKIPPED`) into ``dst``."""
    files = [p for p in src.iterdir() if p.name not in SKIPPED and p.is_file() and not p.is_symlink()]
    if files:
        try:
            await copy_files(files, dst, COPY_TIMEOUT)
        except VMMError as e:
            raise OSError(str(e)) from None
