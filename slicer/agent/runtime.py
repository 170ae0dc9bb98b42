"""Where the agent's own runtime lives in a guest, and the shells it falls back to.

A VM of the project's image runs the agent on the image's Python (``/opt/slicer``). A VM of a
user's image (any OCI image: busybox only, musl, no Python) gets a second, read-only disk of
ours that the initramfs mounts at :data:`ROOT`: Python, aiohttp and a few tools patched to load
their libraries from there only. The agent runs from it while ``/`` stays the image's root, so
commands, files and users are the image's own.
"""

from __future__ import annotations

import os
import signal

ROOT = "/run/slicer/rt"  # mount point of the runtime disk (read-only)
TOOLS = ROOT + "/opt/slicer/bin"  # ip, resize2fs, inotifywait, busybox (sh) from the runtime
STANDARD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SHELLS = ("/bin/bash", "/bin/sh", "bash", "sh")
HELPER = "/usr/local/bin/slicer-agent"  # the SDKs run it by this path (chunked copy: slicer.agent.upload)


def active() -> bool:
    """Whether this guest boots from a user's image with our runtime mounted."""
    return os.path.isdir(TOOLS)


def agent_path() -> str:
    """PATH for the agent's own helpers: the runtime's tools first, when there is one."""
    return f"{TOOLS}:{STANDARD_PATH}" if active() else STANDARD_PATH


def helper(cmd: str) -> str:
    """``cmd``, or our copy of the ``slicer-agent`` helper when ``cmd`` names it and the image
    has none of its own (a user's image: the helper lives on the runtime disk)."""
    if cmd == HELPER and active() and not os.path.lexists(HELPER):
        return TOOLS + "/slicer-agent"
    return cmd


def shell(requested: str | None = None) -> str:
    """``requested`` if it can run; for a stock shell name the image lacks, the nearest one the
    image has, then the runtime's busybox ``sh`` (an image may have no shell at all)."""
    if requested and (os.access(requested, os.X_OK) or requested not in SHELLS):
        return requested
    for candidate in ("/bin/bash", "/bin/sh", TOOLS + "/sh"):
        if os.access(candidate, os.X_OK):
            return candidate
    return requested or "/bin/sh"


def pid1_signal(action: str) -> int:
    """The signal that asks PID 1 to power off ("shutdown") or reboot: slicer-init's own
    (SIGUSR2, SIGTERM), or systemd's (SIGRTMIN+4, SIGRTMIN+5) when the image's init runs."""
    try:
        with open("/proc/1/cmdline", "rb") as f:
            ours = b"slicer" in f.read()
    except OSError:
        ours = True
    if ours:
        return signal.SIGUSR2 if action == "shutdown" else signal.SIGTERM
    return signal.SIGRTMIN + (4 if action == "shutdown" else 5)
