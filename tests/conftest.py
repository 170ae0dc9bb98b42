"""Fixtures that run real daemons booting real VMs under QEMU (TCG on these hosts).

The guest image is built once into ``SLICER_TEST_IMAGE_DIR`` (default ``/var/lib/slicer``,
where ``slicer image build`` puts it) and shared by every test daemon through a symlink.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from slicer.image.build import build_image
from tests.failures import FAILED

IMAGE_DATA_DIR = Path(os.environ.get("SLICER_TEST_IMAGE_DIR", "/var/lib/slicer"))
BOOT_TIMEOUT = 240.0
# The session's template cache (``slicer up --template-cache``): a template one test's daemon
# built (a cold boot, 10-20 s of a core under TCG) is copied by the next daemon that needs one of
# the same machine, whatever its group. Set it to share one across sessions; "" for none.
TEMPLATE_CACHE_ENV = "SLICER_TEST_TEMPLATE_CACHE"
CLONE_NEWNET = 0x40000000


def pytest_configure(config) -> None:
    """Run the whole session in a network namespace of its own: the test daemons' bridges,
    TAPs, namespaces and nftables tables live there and vanish with it, and no guest can reach
    anything but loopback and the test's own hosts. The controller (xdist's, or the only
    process) makes the session's template cache; its workers inherit its environment."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False  # pytest_collection_modifyitems orders the files
    if not hasattr(config, "workerinput") and TEMPLATE_CACHE_ENV not in os.environ:
        os.environ[TEMPLATE_CACHE_ENV] = tempfile.mkdtemp(prefix="slt-templates-", dir="/tmp")
        config.made_template_cache = os.environ[TEMPLATE_CACHE_ENV]
    if os.environ.get("SLICER_TEST_HOST_NETNS") == "1":
        return  # debugging: stay in the host's namespace
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        raise pytest.UsageError(f"unshare(CLONE_NEWNET) failed ({os.strerror(ctypes.get_errno())}): run as root")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


def pytest_unconfigure(config) -> None:
    if made := getattr(config, "made_template_cache", None):
        shutil.rmtree(made, ignore_errors=True)


KEPT_LOGS = Path("/tmp/slt-failed")


def pytest_runtest_logreport(report) -> None:
    if report.failed:  # a daemon that saw a test fail keeps its logs
        FAILED[0] += 1


def pytest_collection_modifyitems(config, items) -> None:
    """The order pytest-xdist (``--dist loadfile``) hands files out in; its own reordering is
    turned off (``pytest_configure``). Its order, most tests first, put the long files of one test
    last: one worker then ran the suite's last 60-90 s alone (139 s once, measured 2026-12-05).
    Here files marked ``long`` (one long test) go first, then the other VM files by their number
    of tests, most first, as before; the files that boot no VM (seconds each) go last, to fill
    the workers' ends. (Every file handed out longest first, measured 2026-12-04, ran the
    heaviest files side by side and was slower: 1,091 and 1,124 s against 1,004 and 1,062 s.)"""
    per_file = collections.Counter(item.path for item in items)

    def group(item) -> int:
        return 0 if item.get_closest_marker("long") else 1 if item.get_closest_marker("vm") else 2

    items.sort(key=lambda item: (group(item), -per_file[item.path], str(item.path)))


# Workers (.ci/run starts three on these two cores): with this order two left the CPU 19 % idle over
# the pytest run (a worker's test that waits on one VM, or on a sleep, uses less than its core) and
# took 741-760 s; three left it 4 % idle and took 689 s (2026-12-05). With xdist's own order three
# had not helped (776 s against two's 786 s): the long files at the end decided the time.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def qemu_pids(marker: str) -> list[int]:
    """PIDs of QEMU processes whose run directory (in their environment) is below ``marker``
    (a data dir): QEMU gets descriptors, not paths, so its command line names none."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if not (proc / "comm").read_text().startswith("qemu-system"):
                continue
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(e.startswith(b"SLICER_RUN_DIR=" + marker.encode()) for e in environ):
            pids.append(int(proc.name))
    return pids


class Daemon:
    """One ``slicer up`` process with its own data directory and config."""

    def __init__(self, config: str, data_dir: Path | None = None, template_cache: bool = True) -> None:
        """``template_cache``: share the session's (tests of template builds themselves: False)."""
        self.template_cache = os.environ.get(TEMPLATE_CACHE_ENV, "") if template_cache else ""
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="slt-", dir="/tmp"))
        images = self.data_dir / "images"
        if not images.exists():
            images.symlink_to(IMAGE_DATA_DIR / "images")
        self.port = free_port()
        self.socket = self.data_dir / "api.sock" if "SOCKET" in config else None
        self.config_text = config.replace("PORT", str(self.port)).replace("SOCKET", str(self.socket))
        self.config_path = self.data_dir / "config.yaml"
        self.config_path.write_text(self.config_text)
        self.proc: subprocess.Popen | None = None
        self.log_path = self.data_dir / "daemon.log"
        self.failures_before = FAILED[0]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token(self) -> str | None:
        path = self.data_dir / "auth" / "token"
        return path.read_text().strip() if path.exists() else None

    def start(self) -> Daemon:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "slicer", "up", str(self.config_path), "--data-dir", str(self.data_dir),
             "--no-build", *(["--template-cache", self.template_cache] if self.template_cache else [])],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}:\n{self.log()}")
            try:
                with self.client(token=None) as c:
                    if c.get("/healthz", timeout=1).status_code == 200:
                        return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"daemon did not come up:\n{self.log()}")

    def client(self, token: str | None = "default") -> httpx.Client:
        headers = {}
        token = self.token if token == "default" else token
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if self.socket is not None:
            transport = httpx.HTTPTransport(uds=str(self.socket))
            return httpx.Client(transport=transport, base_url="http://slicer", headers=headers, timeout=300)
        return httpx.Client(base_url=self.url, headers=headers, timeout=300)

    def log(self, tail: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()
        for pid in qemu_pids(str(self.data_dir)):
            os.kill(pid, signal.SIGKILL)
        if FAILED[0] > self.failures_before:
            self.keep_logs()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def keep_logs(self) -> None:
        """A test failed while this daemon ran: keep its log and its VMs' console logs (in
        ``/tmp/slt-failed/<data dir>/``) to find out why after the run."""
        into = KEPT_LOGS / self.data_dir.name
        with contextlib.suppress(OSError):
            into.mkdir(parents=True, exist_ok=True)
            shutil.copy(self.log_path, into / "daemon.log")
            for console in (self.data_dir / "run").glob("*/console.log"):
                shutil.copy(console, into / f"{console.parent.name}.console.log")
            for console in (self.data_dir / "run").glob(".*/console.log"):  # template VMs' (.tpl-*)
                shutil.copy(console, into / f"{console.parent.name}.console.log")
            sys.stderr.write(f"\nslicer test daemon {self.data_dir}: logs kept in {into}\n")


def ticker(path: str, every: float = 0.1) -> str:
    """A guest command (for a background exec) appending a line to ``path`` every ``every`` seconds
    on bash's builtins alone. A loop forking ``sleep`` (and ``mv``) each tick kept a guest 30 % busy
    under TCG, against 3 % for this, and slowed every test running beside it. Readers count lines
    (``wc -l``): an append is never seen half-written."""
    return (f"mkfifo /tmp/.tick-$$ && exec 3<>/tmp/.tick-$$ && rm /tmp/.tick-$$; i=0; "
            f"while true; do echo $i >> {path}; i=$((i+1)); read -t {every} -u 3; done")


def wait_agent(client: httpx.Client, hostname: str, timeout: float = BOOT_TIMEOUT) -> dict:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = client.get(f"/vm/{hostname}/health")
        if last.status_code == 200:
            return last.json()
        time.sleep(0.5)
    raise AssertionError(f"{hostname} agent not healthy: {last and last.text}")


@pytest.fixture(scope="session")
def guest_image() -> Path:
    IMAGE_DATA_DIR.mkdir(parents=True, exist_ok=True)
    return build_image(IMAGE_DATA_DIR, progress=lambda m: print(f"image: {m}")).directory


MAIN_CONFIG = """
config:
  github_keys_url: KEYS_URL
  host_groups:
  - name: vm
    count: 1
    vcpu: 2
    ram_mb: 512
    storage_size: 2G
    network:
      gateway: 192.168.137.1/24
  - name: sbx
    count: 0
    vcpu: 1
    ram_mb: 384
    storage_size: 2G
  api:
    bind_address: 127.0.0.1
    port: PORT
    auth:
      enabled: true
"""


class KeyServer:
    """A loopback stand-in for github.com/<user>.keys, with a real key pair for alice."""

    def __init__(self) -> None:
        import functools
        import http.server
        import threading

        self.dir = Path(tempfile.mkdtemp(prefix="slt-keys-"))
        self.private_key = self.dir / "alice_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "alice@test", "-f",
                        str(self.private_key)], check=True)
        self.public_key = (self.dir / "alice_ed25519.pub").read_text().strip()
        (self.dir / "alice.keys").write_text(self.public_key + "\n")
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(self.dir))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def key_server():
    ks = KeyServer()
    yield ks
    ks.close()


@pytest.fixture(scope="session")
def daemon(guest_image, key_server):
    d = Daemon(MAIN_CONFIG.replace("KEYS_URL", key_server.url)).start()
    yield d
    d.cleanup()


@pytest.fixture(scope="session")
def api(daemon) -> httpx.Client:
    with daemon.client() as c:
        yield c


@pytest.fixture(scope="module")
def vm(api) -> str:
    """The main daemon's service vm-1, its agent answering (checked again by each module: a
    module before may have rebooted it)."""
    wait_agent(api, "vm-1")
    return "vm-1"
