"""slicer-init: PID 1 of every guest (standard library only).

Mounts the pseudo filesystems, links ``/dev/virtio-ports`` (there is no udev), sets the
hostname and the network from the kernel command line (``slicer.hostname``, ``slicer.ip``,
``slicer.gw``, ``slicer.dns``, ``slicer.mac``), starts and supervises the agent, reaps orphans, and powers off
or reboots cleanly on request: SIGUSR2 or the ACPI power button (QMP ``system_powerdown``)
powers off, SIGTERM or SIGINT reboots.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time

from slicer.agent import runtime

AGENT_HOME = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RB_POWER_OFF = 0x4321FEDC
RB_AUTOBOOT = 0x01234567
KEY_POWER = 116
EV_KEY = 1
INPUT_EVENT = struct.Struct("llHHi")

SSHD = """
for t in ed25519 ecdsa; do
    [ -s /etc/ssh/ssh_host_${t}_key ] || ssh-keygen -q -t $t -N '' -f /etc/ssh/ssh_host_${t}_key
done
mkdir -p /run/sshd
exec /usr/sbin/sshd -h /etc/ssh/ssh_host_ed25519_key -h /etc/ssh/ssh_host_ecdsa_key
"""
# Written when this init starts sshd: a template waits for sshd only where one will come (an
# image without sshd, or whose own init runs the services, would keep it waiting for nothing).
SSHD_STARTED = "/run/slicer/sshd-started"

_request: str | None = None


def log(msg: str) -> None:
    print(f"slicer-init: {msg}", flush=True)


def run(*cmd: str, stdin: str | None = None) -> None:
    try:
        r = subprocess.run(cmd, input=stdin, capture_output=True, text=True)
    except OSError as e:
        log(f"{cmd[0]}: {e.strerror}")
        return
    if r.returncode:  # a batch's error names its line: say the lines too
        log(f"{' '.join(cmd)}: {r.stderr.strip()}" + (f" (its input: {stdin.strip()!r})" if stdin else ""))


MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT = 1, 2, 4, 32
_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV}


def _libc_mount(source: str, target: str, fstype: str | None, flags: int, data: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None, flags,
                  data.encode()) != 0:
        log(f"mount {target}: {os.strerror(ctypes.get_errno())}")


def mount(fstype: str, target: str, options: str = "") -> None:
    """Mount a pseudo filesystem by system call: a user's image may have no ``mount``. A mount
    the initramfs already made (``/run``, holding the runtime) is kept."""
    os.makedirs(target, exist_ok=True)
    if os.path.ismount(target):
        return
    words = [w for w in options.split(",") if w]
    flags = sum(_FLAGS.get(w, 0) for w in words)
    _libc_mount(fstype, target, fstype, flags, ",".join(w for w in words if w not in _FLAGS))


# As systemd's sysctl.d sets them on a distribution (the kernel's defaults are 0): a symlink in a
# sticky world-writable directory (/tmp) is not followed into another user's files, and nobody
# hard-links a file they could not write.
PROTECTED = {"protected_symlinks": "1", "protected_hardlinks": "1"}


def harden_links() -> None:
    for name, value in PROTECTED.items():
        try:
            with open(f"/proc/sys/fs/{name}", "w") as f:
                f.write(value)
        except OSError as e:
            log(f"fs.{name}: {e}")


def kernel_params() -> dict[str, str]:
    with open("/proc/cmdline") as f:
        words = f.read().split()
    return dict(w.split("=", 1) for w in words if w.startswith("slicer.") and "=" in w)


def link_virtio_ports() -> None:
    os.makedirs("/dev/virtio-ports", exist_ok=True)
    for path in glob.glob("/sys/class/virtio-ports/*/name"):
        with open(path) as f:
            name = f.read().strip()
        dev = os.path.basename(os.path.dirname(path))
        link = f"/dev/virtio-ports/{name}"
        if os.path.exists(f"/dev/{dev}"):  # the channel and the bulk port: root's alone
            os.chown(f"/dev/{dev}", 0, 0)
            os.chmod(f"/dev/{dev}", 0o600)
        if name and not os.path.lexists(link):
            os.symlink(f"../{dev}", link)


def setup_network(params: dict[str, str]) -> None:
    """Loopback, and eth0 as the kernel command line says: one ``ip`` process for all of it (each
    costs ~0.1 s under TCG); ``-force`` goes on past a command that fails, as separate runs did."""
    commands = ["link set lo up"]
    if ip := params.get("slicer.ip"):
        if mac := params.get("slicer.mac"):  # the host's firewall passes only this MAC from this VM
            commands.append(f"link set eth0 address {mac}")
        commands += [f"addr add {ip} dev eth0", "link set eth0 up"]
        if gw := params.get("slicer.gw"):
            commands.append(f"route add default via {gw}")
    run("ip", "-force", "-batch", "-", stdin="\n".join(commands) + "\n")
    if ip and (dns := params.get("slicer.dns")):
        write_resolv_conf(dns.split(","))


def write_resolv_conf(servers: list[str]) -> None:
    if os.path.islink("/etc/resolv.conf"):  # e.g. to systemd-resolved's stub, not running here
        os.unlink("/etc/resolv.conf")
    with open("/etc/resolv.conf", "w") as f:
        f.writelines(f"nameserver {d}\n" for d in servers)


def set_hostname(name: str) -> None:
    socket.sethostname(name)
    os.makedirs("/etc", exist_ok=True)
    with open("/etc/hostname", "w") as f:
        f.write(name + "\n")
    with open("/etc/hosts", "w") as f:
        f.write(f"127.0.0.1 localhost\n127.0.1.1 {name}\n::1 localhost ip6-localhost\n")


def ensure_machine_id() -> None:
    """A machine-id of this VM's own, made at its first boot and kept on its disk."""
    try:
        with open("/etc/machine-id") as f:
            if len(f.read().strip()) == 32:
                return
    except FileNotFoundError:
        pass
    with open("/etc/machine-id", "w") as f:
        f.write(os.urandom(16).hex() + "\n")


def power_buttons() -> list[int]:
    fds = []
    for dev in glob.glob("/sys/class/input/event*"):
        try:
            with open(f"{dev}/device/name") as f:
                if "Power Button" not in f.read():
                    continue
            fds.append(os.open(f"/dev/input/{os.path.basename(dev)}", os.O_RDONLY | os.O_NONBLOCK))
        except OSError:
            continue
    return fds


AGENT_PROCESSES = ("slicer.agent", "slicer.agent.server")  # channel demux, HTTP server


def start_agent(module: str) -> subprocess.Popen:
    # PYTHONPATH: where this package is (the image's /opt/slicer, or the runtime disk's).
    env = {"PATH": runtime.agent_path(), "PYTHONPATH": AGENT_HOME, "HOME": "/root",
           "SLICER_AGENT_STARTED": str(time.monotonic())}
    return subprocess.Popen([sys.executable, "-m", module], env=env, start_new_session=True)


def chore(argv: list[str]) -> None:
    """Run ``argv`` niced, in the background; a tool the image lacks is skipped."""
    try:
        subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=lambda: os.nice(10))
    except OSError as e:
        log(f"{argv[0]}: {e.strerror}")


def on_signal(signum: int, _frame: object) -> None:
    global _request
    if signum == signal.SIGUSR2:
        _request = "poweroff"
    elif signum in (signal.SIGTERM, signal.SIGINT):
        _request = "reboot"


def reap() -> list[int]:
    gone = []
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return gone
        if pid == 0:
            return gone
        gone.append(pid)


def finish(action: str) -> None:
    log(f"{action}: stopping processes")
    for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 1.0)):
        try:
            os.kill(-1, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            reap()
            try:
                os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            time.sleep(0.05)
    os.sync()
    _libc_mount("", "/", None, MS_REMOUNT | MS_RDONLY, "")
    os.sync()
    log(f"{action} now")
    ctypes.CDLL(None, use_errno=True).reboot(RB_POWER_OFF if action == "poweroff" else RB_AUTOBOOT)


def main(agent_only: bool = False) -> None:
    """PID 1; or, with ``agent_only``, a service of the image's own init (systemd) that sets
    the guest up and runs the agent beside it."""
    os.environ["PATH"] = runtime.agent_path()
    if not agent_only:
        mount("proc", "/proc")
        mount("sysfs", "/sys")
        mount("tmpfs", "/run", "mode=0755,nosuid,nodev")
        mount("tmpfs", "/tmp", "mode=1777,nosuid,nodev")
        mount("devpts", "/dev/pts", "mode=0620,ptmxmode=0666,gid=5")
        mount("tmpfs", "/dev/shm", "mode=1777,nosuid,nodev")
        harden_links()
    os.makedirs("/run/slicer", mode=0o700, exist_ok=True)
    params = kernel_params()
    set_hostname(params.get("slicer.hostname", "slicer"))
    link_virtio_ports()
    setup_network(params)
    ensure_machine_id()
    for sig in (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wfd)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the select below
    buttons = power_buttons()
    agents = {start_agent(m).pid: m for m in AGENT_PROCESSES}
    # Background chores, niced so the agent comes up first: grow the root filesystem to the
    # disk's size (storage_size), and start sshd with host keys of this VM's own, made at its
    # first boot and kept on its disk (ed25519 and ecdsa: RSA keygen costs seconds under TCG).
    chore(["resize2fs", "/dev/vda"])
    if not agent_only and os.access("/usr/sbin/sshd", os.X_OK) and os.access("/bin/sh", os.X_OK):
        with open(SSHD_STARTED, "w"):
            pass
        chore(["/bin/sh", "-c", SSHD])  # the image's sshd (under its own init, its init starts it)
    log(f"agent started (pids {', '.join(map(str, agents))})")
    while _request is None:
        try:
            ready, _, _ = select.select([rfd, *buttons], [], [], 5.0)
        except InterruptedError:
            ready = []
        for fd in ready:
            if fd == rfd:
                os.read(rfd, 4096)
                continue
            data = os.read(fd, INPUT_EVENT.size * 16)
            for i in range(0, len(data) - INPUT_EVENT.size + 1, INPUT_EVENT.size):
                _, _, etype, code, value = INPUT_EVENT.unpack_from(data, i)
                if etype == EV_KEY and code == KEY_POWER and value == 1:
                    if agent_only:  # the image's init powers off (systemd: SIGRTMIN+4)
                        os.kill(1, runtime.pid1_signal("shutdown"))
                    else:
                        on_signal(signal.SIGUSR2, None)
        for pid in reap():
            module = agents.pop(pid, None)
            if module and _request is None:
                log(f"{module} exited; restarting it")
                time.sleep(0.5)
                agents[start_agent(module).pid] = module
    if not agent_only:
        finish(_request)
    for pid in agents:  # stopped by the image's init: the agent goes with us
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)


def entry() -> None:
    if "--agent" in sys.argv:  # a service of the image's init; on failure, it restarts us
        main(agent_only=True)
        return
    try:
        main()
    except Exception as e:  # PID 1 must never exit: that panics the kernel
        log(f"fatal: {e!r}")
        finish("poweroff")


if __name__ == "__main__":
    entry()
