"""What the host sets up in a guest after each boot: secrets, SSH keys, and userdata (once)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import pwd
import sys
import tempfile

from slicer.agent import USERDATA_SENTINEL, files, paths, runtime

SECRETS_DIR = "/run/slicer/secrets"  # on /run: tmpfs, never on the VM's disk
USERDATA_SCRIPT = "/etc/slicer/userdata"
USERDATA_LOG = "/var/log/slicer-userdata.log"
DEFAULT_USER = "ubuntu"


def atomic_write(path: str, data: bytes, mode: int, uid: int = 0, gid: int = 0) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
        os.fchown(fd, uid, gid)
        os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def sync_secrets(secrets: dict[str, dict]) -> dict:
    """Make ``SECRETS_DIR`` hold exactly ``secrets`` (name -> data, permissions, uid, gid)."""
    os.makedirs(SECRETS_DIR, exist_ok=True)
    os.chmod("/run/slicer", 0o711)  # owners of secrets must be able to reach them
    os.chmod(SECRETS_DIR, 0o711)
    for name, s in secrets.items():
        if "/" in name or name in (".", ".."):
            raise ValueError(f"bad secret name {name!r}")
        atomic_write(os.path.join(SECRETS_DIR, name), base64.b64decode(s["data"]), int(s["permissions"], 8),
                      int(s["uid"]), int(s["gid"]))
    removed = [n for n in os.listdir(SECRETS_DIR) if n not in secrets and not n.startswith(".tmp-")]
    for name in removed:
        os.unlink(os.path.join(SECRETS_DIR, name))
    return {"secrets": sorted(secrets), "removed": sorted(removed)}


def install_keys(keys: list[str], user: str = DEFAULT_USER) -> dict:
    """Write ``authorized_keys`` of ``user`` (the keys the host gathered: config, body, GitHub);
    in an image without that user, root's (if there are keys to write)."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        if not [k for k in keys if k.strip()]:
            return {"user": user, "keys": 0}
        pw = pwd.getpwuid(0)
    # The home is the user's: ~/.ssh is reached by descriptor and never through a symlink (the
    # user could point it at /etc, and root would chown that), the file written through it.
    home = paths.make_dirs(pw.pw_dir)  # the agent's rule for paths (slicer.agent.paths)
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(".ssh", 0o700, dir_fd=home)
        try:
            ssh = os.open(".ssh", paths.DIR_FLAGS, dir_fd=home)
        except OSError as e:
            raise files.FileError(f"{pw.pw_dir}/.ssh is not a directory ({e.strerror}): not written",
                                  "unsafe_path", 409) from None
    finally:
        os.close(home)
    try:
        os.fchown(ssh, pw.pw_uid, pw.pw_gid)
        os.fchmod(ssh, 0o700)
        body = "".join(k.strip() + "\n" for k in keys if k.strip())
        with files.atomic_file("authorized_keys", 0o600, pw.pw_uid, pw.pw_gid, dir_fd=ssh) as f:
            f.write(body.encode())
    finally:
        os.close(ssh)
    return {"user": pw.pw_name, "keys": len([k for k in keys if k.strip()])}


def userdata_status() -> tuple[bool, int | None]:
    try:
        with open(USERDATA_SENTINEL) as f:
            text = f.read().strip()
    except FileNotFoundError:
        return False, None
    return True, int(text) if text.lstrip("-").isdigit() else 0


_running: asyncio.Task | None = None


def start_userdata(script: str) -> str:
    """Run the userdata once, as root, in the background; the sentinel holds its exit code."""
    global _running
    if userdata_status()[0]:
        return "already ran"
    if _running is not None and not _running.done():
        return "running"
    os.makedirs(os.path.dirname(USERDATA_SCRIPT), exist_ok=True)
    atomic_write(USERDATA_SCRIPT, script.encode(), 0o700, 0, 0)
    _running = asyncio.ensure_future(_run_userdata())
    return "started"


async def _run_userdata() -> None:
    try:
        code = await _userdata_process()
    except OSError as e:  # it could not even start: say so, and count it as run (it would fail again)
        print(f"slicer-userdata: cannot run: {e}", file=sys.stderr, flush=True)
        code = 127
    atomic_write(USERDATA_SENTINEL, f"{code}\n".encode(), 0o644, 0, 0)


async def _userdata_process() -> int:
    shell = runtime.shell("/bin/bash")
    os.makedirs("/root", mode=0o700, exist_ok=True)  # the script's cwd; a bare image may lack it
    os.makedirs(os.path.dirname(USERDATA_LOG), exist_ok=True)
    with open(USERDATA_LOG, "ab") as log, open("/dev/console", "wb", buffering=0) as console:
        console.write(b"slicer-userdata: running\n")
        proc = await asyncio.create_subprocess_exec(
            shell, USERDATA_SCRIPT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL, cwd="/root", start_new_session=True,
            env={"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"},
        )
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            log.write(line)
            console.write(b"slicer-userdata: " + line)  # to the serial log on the host
        code = await proc.wait()
        console.write(f"slicer-userdata: exited with {code}\n".encode())
    return code
