"""Build the runtime disk: the agent with a Python of its own, for VMs of users' images.

The disk is the project's Debian root filesystem, mounted read-only at ``/run/slicer/rt`` in
the guest (:mod:`slicer.agent.runtime`), with every absolute symlink made relative (so it
resolves inside the disk, not in the image's root) and the programs the agent runs patched
(``patchelf``) to load their dynamic loader and libraries from the disk. Nothing from the
user's image is needed: it may be busybox only, musl, or have no Python at all.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from slicer.agent import runtime

LIBS = "usr/lib/x86_64-linux-gnu"
LOADER = f"{LIBS}/ld-linux-x86-64.so.2"
# Programs the agent and its init run (name in the tools dir → path in the disk).
TOOLS = {
    "python3": "usr/bin/python3.11",
    "ip": "usr/bin/ip",
    "resize2fs": "usr/sbin/resize2fs",
    "inotifywait": "usr/bin/inotifywait",
}
INIT = f"""#!{runtime.ROOT}/usr/bin/python3.11 -I
# PID 1 of a VM of a user's image (the initramfs switches to it): slicer-init from this disk.
import sys
sys.path.insert(0, "{runtime.ROOT}/opt/slicer")
from slicer.agent.init import entry
entry()
"""


def helper_script(python: str, agent_home: str) -> str:
    """``slicer-agent``, the agent's command-line helpers (``upload``: the SDKs' chunked copy)."""
    return (f"#!{python} -IS\nimport sys\nsys.path.insert(0, {agent_home!r})\n"
            "from slicer.agent.helper import main\nsys.exit(main(sys.argv[1:]))\n")


def relativize_links(root: Path) -> int:
    """Rewrite every symlink under ``root`` as ``root`` being ``/``: absolute targets become
    relative, and ``..`` cannot climb above ``root`` (as in a chroot), so following any link
    on the host stays inside the tree. Returns how many links changed."""
    count = 0
    for dirpath, dirnames, filenames in os.walk(root):
        here = "/" + os.path.relpath(dirpath, root).removeprefix(".")
        for name in dirnames + filenames:
            link = Path(dirpath) / name
            if not link.is_symlink():
                continue
            target = os.readlink(link)
            inside = posixpath.normpath(posixpath.join(here, target))  # "/../x" is "/x": clamped at the root
            fixed = os.path.relpath(root / inside.lstrip("/"), dirpath)
            if fixed != target:
                link.unlink()
                link.symlink_to(fixed)
                count += 1
    return count


def inside(root: Path, rel: str) -> Path:
    """``root/rel`` with its links resolved, refused if that leaves ``root``."""
    path = (root / rel).resolve()
    if not path.is_relative_to(root.resolve()):
        raise ValueError(f"{rel} resolves outside the runtime tree ({path})")
    return path


def populate(root: Path, install_agent: Callable[[Path], None], progress: Callable[[str], None]) -> None:
    """Turn the extracted Debian tree at ``root`` into the runtime (see the module's doc)."""
    progress(f"runtime: {relativize_links(root)} absolute links made relative")
    tools = root / runtime.TOOLS.removeprefix(runtime.ROOT + "/")
    tools.mkdir(parents=True, exist_ok=True)
    for name, rel in TOOLS.items():
        binary = inside(root, rel)  # never a file outside the tree (an absolute link would be the host's)
        subprocess.run(
            ["patchelf", "--set-interpreter", f"{runtime.ROOT}/{LOADER}", "--force-rpath",
             "--set-rpath", f"{runtime.ROOT}/{LIBS}", str(binary)],
            check=True, capture_output=True,
        )
        (tools / name).symlink_to(os.path.relpath(binary, tools))
    shutil.copy2("/bin/busybox", tools / "busybox")  # static: a shell for images without one
    (tools / "sh").symlink_to("busybox")
    agent_home = root / "opt/slicer"
    install_agent(agent_home)
    init = agent_home / "init"
    init.write_text(INIT)
    init.chmod(0o755)
    helper = tools / "slicer-agent"  # the agent runs it for /usr/local/bin/slicer-agent when the image has none
    helper.write_text(helper_script(f"{runtime.ROOT}/usr/bin/python3.11", f"{runtime.ROOT}/opt/slicer"))
    helper.chmod(0o755)
