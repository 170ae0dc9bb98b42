"""Where the VMs' run directories (sockets, console logs, pid files) are reached from.

A unix socket path holds at most 108 bytes, so a data directory like
``/home/alice/work/slicer-data`` would leave no room for ``run/<63-char name>/channel.sock``.
Then the run directory is reached through a short symlink, ``/run/slicer/<digest>`` (or a
0700 directory of ours under the temp dir without root): the files stay in the data directory.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from pathlib import Path

MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes
LONGEST = "x" * 63 + "/channel.sock"  # the longest socket path below a run directory


class RunDirError(Exception):
    pass


def _private_base() -> Path:
    base = Path("/run/slicer") if os.access("/run", os.W_OK) else Path(tempfile.gettempdir()) / f"slicer-{os.getuid()}"
    base.mkdir(mode=0o700, exist_ok=True)
    st = os.lstat(base)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise RunDirError(f"{base} must be a directory of ours with mode 0700")
    return base


def run_root(data_dir: Path) -> Path:
    """``<data_dir>/run``, or a short symlink to it when socket paths below it would be too long."""
    real = (data_dir / "run").resolve()
    real.mkdir(parents=True, exist_ok=True)
    if len(str(real / LONGEST)) <= MAX_SOCKET_PATH:
        return real
    link = _private_base() / hashlib.sha256(str(real).encode()).hexdigest()[:8]
    if not (link.is_symlink() and os.readlink(link) == str(real)):
        tmp = link.with_name(link.name + ".tmp")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(real)
        tmp.replace(link)  # atomic: a daemon never sees it missing
    if len(str(link / LONGEST)) > MAX_SOCKET_PATH:
        raise RunDirError(f"no short path for the run directory of {data_dir}")
    return link
