"""Assemble and run the daemon: data directory, image, accelerator, driver, manager, API."""

from __future__ import annotations

import asyncio
import fcntl
import getpass
import hashlib
import logging
import os
import secrets
import signal
import socket
import subprocess
from pathlib import Path

import uvicorn

from slicer.api.app import create_app
from slicer.core.config import Config
from slicer.core.errors import SlicerError
from slicer.core.images import BootImages
from slicer.core.manager import Manager
from slicer.image.build import current_image
from slicer.image.oci import ImageStore
from slicer.vmm.accel import choose_accelerator
from slicer.vmm.jail import Jailer, JailError
from slicer.vmm.qemu import QEMU_BINARY, QemuDriver

log = logging.getLogger("slicer")


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def ensure_token(data_dir: Path) -> str:
    """The API token, created once (mode 0600) and reused after; beside it ``curl-header``
    (0600), for ``curl -H @<data-dir>/auth/curl-header``: a token written on a command line is
    in ``/proc/<pid>/cmdline`` for every local user to read."""
    path = data_dir / "auth" / "token"
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():
        _write_private(path, secrets.token_urlsafe(32) + "\n")
    token = path.read_text().strip()
    header = path.with_name("curl-header")
    line = f"Authorization: Bearer {token}\n"
    if not header.exists() or header.read_text() != line:
        _write_private(header, line)
    return token


_held_locks: list[int] = []


def lock_data_dir(data_dir: Path) -> None:
    """Take the data directory for this process (an exclusive ``flock`` held until it exits,
    not inherited by VMs); a second daemon stops here, before it touches anything."""
    if _held_locks:
        return
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "daemon.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise SlicerError(f"another slicer daemon (pid {holder}) is using {data_dir}; stop it first or use "
                          "another --data-dir", "data_dir_locked") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held_locks.append(fd)


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def make_jailer(config: Config, data_dir: Path) -> Jailer | None:
    """The VMMs' confinement, as the config asks (unset: when running as root)."""
    if config.confine is False:
        log.warning("confine: false: every QEMU runs as %s without a seccomp filter or cgroup", getpass.getuser())
        return None
    if config.confine is None and os.geteuid() != 0:
        log.warning("not root: QEMUs run unconfined as %s (their own user is all that separates them)",
                    getpass.getuser())
        return None
    try:
        # SLICER_VMM_NAMESPACES=off: the jail without its namespaces and root (bench/confine.py's baseline)
        root = None if os.environ.get("SLICER_VMM_NAMESPACES") == "off" else data_dir / "jail"
        jailer = Jailer(hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:4], root=root)
    except JailError as e:
        raise SlicerError(f"cannot confine VMMs: {e}", "confinement_unavailable") from e
    log.info("VMMs confined: own uid (%s), seccomp, %s", jailer.describe()["uids"], jailer.cgroups.describe())
    return jailer


def make_manager(config: Config, data_dir: Path) -> tuple[Manager, Jailer | None]:
    """The manager on this host's hypervisor: image, accelerator, confinement, driver."""
    image = current_image(data_dir)
    accel = choose_accelerator(QEMU_BINARY, image.kernel, image.initrd, image.directory.parent / "accel.json")
    log.info("hypervisor qemu microvm, accelerator %s, image %s", accel, image.build_id)
    if config.hypervisor != "qemu":
        log.warning("hypervisor: %s asks for a KVM-only VMM, which this daemon does not drive; every host group "
                    "runs on QEMU microvm (/info shows both)", config.hypervisor)
    jailer = make_jailer(config, data_dir)
    images = BootImages(image, ImageStore.of(data_dir), config)
    images.resolve_groups()  # pulls what is not cached yet; a group whose image fails is marked so
    # a disk made before backing records may be believed if it sits on one of the daemon's layers
    layers = (data_dir / "images", (data_dir / "images").resolve(), data_dir / "templates", data_dir / "commits")
    driver = QemuDriver(accel, jailer=jailer, legacy_roots=layers)
    return Manager(config, data_dir, driver, images), jailer


def _unix_socket(path: str) -> socket.socket:
    """The API's unix socket, bound here, not by uvicorn, which would make it world-writable (0666)."""
    if os.path.exists(path):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(128)
    return sock


def run_daemon(config: Config, data_dir: Path) -> None:
    lock_data_dir(data_dir)
    data_dir.chmod(0o700)  # guest disks, memory, secrets, the token and the record live below
    manager, jailer = make_manager(config, data_dir)
    api = config.api
    uds = api.unix_socket
    token = ensure_token(data_dir) if api.auth.enabled and not uds else None
    app = create_app(manager, token, git_commit())
    server = uvicorn.Server(uvicorn.Config(
        app, host=api.bind_address, port=api.port, log_level="info",
        access_log=False, timeout_graceful_shutdown=5,
    ))
    if uds:
        log.info("API on unix socket %s (mode 0600, no token)", uds)
    else:
        where = f"http://{api.bind_address}:{api.port}"
        log.info("API on %s%s", where, f", token in {data_dir / 'auth/token'}" if token else "")

    async def serve() -> None:
        try:
            await server.serve(sockets=[_unix_socket(uds)] if uds else None)
        except SystemExit:  # uvicorn's way of saying the startup failed
            if getattr(app.state, "startup_error", None) is not None:
                raise app.state.startup_error from None
            raise

    # POST /daemon/shutdown: the graceful stop SIGTERM gives (sandboxes deleted, services shut down).
    app.state.shutdown = lambda: setattr(server, "should_exit", True)

    def leave_running(*_: object) -> None:
        manager.leave_running = True
        server.should_exit = True

    # uvicorn handles SIGTERM/SIGINT during serve() and re-raises them afterwards; with these
    # no-op handlers in place a graceful stop ends the process with status 0, not a signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    signal.signal(signal.SIGQUIT, leave_running)  # an upgrade: exit, and let the next daemon adopt every VM
    asyncio.run(serve())
    if manager.leave_running:
        # Now, before the interpreter's exit: asyncio kills the child processes whose
        # transports it closes, and QEMUs are children of this process.
        log.info("daemon stopped; its VMs run on")
        logging.shutdown()
        os._exit(0)
    if jailer is not None:
        jailer.close()
    log.info("daemon stopped")
