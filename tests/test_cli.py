"""The `slicer` CLI through subprocess (and a pseudo-terminal for `vm shell`), real daemon and VMs."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pty
import re
import select
import socket
import subprocess
import sys
import time

import httpx
import pytest

from slicer.core.config import load_config
from tests.conftest import free_port, wait_agent

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def cli(daemon, api):
    wait_agent(api, "vm-1")
    env = {**os.environ, "SLICER_URL": daemon.url, "SLICER_TOKEN": daemon.token, "COLUMNS": "200"}

    def run(*args: str, input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess:
        stdin = {"input": input} if input is not None else {"stdin": subprocess.DEVNULL}  # no pipe: not read
        p = subprocess.run([sys.executable, "-m", "slicer", *args], env=env, **stdin, capture_output=True,
                           timeout=300)
        if check:
            assert p.returncode == 0, (args, p.stdout[-2000:], p.stderr[-2000:])
        return p

    run.env = env
    return run


def test_help_teaches_with_examples(cli):
    for cmd in (["--help"], ["vm", "--help"], ["vm", "exec", "--help"], ["vm", "cp", "--help"],
                ["secret", "create", "--help"]):
        text = cli(*cmd).stdout.decode()
        assert "Usage" in text
    assert "Example" in cli("vm", "add", "--help").stdout.decode()


def test_info_list_and_json(cli):
    info = json.loads(cli("info", "--json").stdout)
    assert info["version"] and info["accelerator"] in ("tcg", "kvm")
    nodes = json.loads(cli("vm", "list", "--json").stdout)
    assert "vm-1" in [n["hostname"] for n in nodes]
    assert "vm-1" in cli("vm", "list").stdout.decode()
    assert json.loads(cli("vm", "get", "vm-1", "--json").stdout)["status"] == "Running"
    assert json.loads(cli("vm", "health", "vm-1", "--json").stdout)["hostname"] == "vm-1"
    assert "Linux version" in cli("vm", "logs", "vm-1", "-n", "0").stdout.decode()
    top = json.loads(cli("vm", "top", "--json").stdout)
    assert any(r["hostname"] == "vm-1" and r.get("snapshot") for r in top)
    wide = subprocess.run([sys.executable, "-m", "slicer", "vm", "top"], env={**cli.env, "COLUMNS": "300"},
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120).stdout
    header = next(line for line in wide.splitlines() if "HOSTNAME" in line)
    assert [c for c in ("IP", "CPUS", "LOAD", "MEM", "DISK", "NET RX/TX", "DISK R/W", "CONNS", "UPTIME")
            if c not in header] == [], wide
    row = next(line for line in wide.splitlines() if "vm-1" in line)
    assert "192.168." in row and "MiB /" in row and "%" in row, wide
    # health: the uptime as a duration, the VM's address
    health = cli("vm", "health", "vm-1").stdout.decode()
    assert "192.168." in health and re.search(r"\b(\d+h)?(\d+m)?\d+s\b", health), health
    assert "host_groups" in cli("new", "web", "--count", "2").stdout.decode()


def test_exec_status_and_streams(cli):
    p = cli("vm", "exec", "vm-1", "--", "sh", "-c", "echo out; echo err >&2; exit 3", check=False)
    assert p.returncode == 3 and p.stdout == b"out\n" and p.stderr == b"err\n"
    p = cli("vm", "exec", "vm-1", "--stdin", "--", "wc", "-c", input=b"12345")
    assert p.stdout.strip() == b"5"
    # a pipe is read without --stdin, as Slicer does; --no-stdin leaves it alone
    assert cli("vm", "exec", "vm-1", "--", "wc", "-c", input=b"123").stdout.strip() == b"3"
    assert cli("vm", "exec", "vm-1", "--no-stdin", "--", "wc", "-c", input=b"123").stdout.strip() == b"0"


def test_piped_stdin_streams_both_ways_at_once(cli):
    """Full duplex: ``cat`` of more than every buffer between it and us holds gets through (sent
    whole before reading, it would deadlock), and an endless producer does not keep it open."""
    data = base64.b64encode(os.urandom(12 << 20)) + b"\n"
    p = cli("vm", "exec", "vm-1", "--", "cat", input=data)
    assert len(p.stdout) == len(data) and hashlib.sha256(p.stdout).digest() == hashlib.sha256(data).digest()
    yes = subprocess.Popen(["yes"], stdout=subprocess.PIPE)
    try:
        p = subprocess.run([sys.executable, "-m", "slicer", "vm", "exec", "vm-1", "--", "head", "-c", "5"],
                           env=cli.env, stdin=yes.stdout, capture_output=True, timeout=120)
    finally:
        yes.kill()
        yes.wait()
    assert p.returncode == 0 and p.stdout == b"y\ny\ny", p
    p = cli("vm", "exec", "ghost-9", "--", "true", check=False)
    assert p.returncode == 1 and b"not found" in p.stderr


def test_cp_both_ways_and_directories(cli, tmp_path):
    data = os.urandom(1_500_000)
    (tmp_path / "f.bin").write_bytes(data)
    cli("vm", "cp", str(tmp_path / "f.bin"), "vm-1:/tmp/cli.bin")
    cli("vm", "cp", "vm-1:/tmp/cli.bin", str(tmp_path / "back.bin"))
    cli("vm", "cp", str(tmp_path / "f.bin"), "vm-1:/tmp/")  # into a directory, like cp
    assert json.loads(cli("vm", "exec", "vm-1", "--", "stat", "-c", "%s", "/tmp/f.bin").stdout) == len(data)
    assert hashlib.sha256((tmp_path / "back.bin").read_bytes()).digest() == hashlib.sha256(data).digest()
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.txt").write_text("alpha")
    (tree / "sub" / "b.txt").write_text("beta")
    cli("vm", "cp", "-r", str(tree), "vm-1:/tmp/clitree")
    cli("vm", "cp", "-r", "vm-1:/tmp/clitree", str(tmp_path / "out"))
    assert (tmp_path / "out" / "clitree" / "sub" / "b.txt").read_text() == "beta"
    cli("vm", "cp", str(tree), "vm-1:/tmp/clitree2")  # a directory needs no -r (Slicer's cp copies it as a tar)
    cli("vm", "cp", "vm-1:/tmp/clitree2", str(tmp_path / "out2"))
    assert (tmp_path / "out2" / "clitree2" / "sub" / "b.txt").read_text() == "beta"
    p = cli("vm", "cp", "--mode=binary", str(tree), "vm-1:/tmp/x", check=False)
    assert p.returncode == 1 and b"--mode binary copies one file" in p.stderr
    p = cli("vm", "cp", "a", "b", check=False)
    assert p.returncode != 0


def test_add_delete_and_secrets(cli):
    created = json.loads(cli("vm", "add", "sbx", "--tag", "cli", "--json").stdout)
    h = created["hostname"]
    try:
        assert [n["hostname"] for n in json.loads(cli("vm", "list", "--tag", "cli", "--json").stdout)] == [h]
        assert cli("vm", "ready", h, "--timeout", "60").returncode == 0
        cli("vm", "pause", h)
        assert json.loads(cli("vm", "get", h, "--json").stdout)["status"] == "Paused"
        cli("vm", "resume", h)
        cli("vm", "reboot", h)  # a sandbox's reboot ends it, as in Slicer
        deadline = time.monotonic() + 90
        while cli("vm", "get", h, check=False).returncode == 0 and time.monotonic() < deadline:
            time.sleep(1)
        assert cli("vm", "get", h, check=False).returncode != 0, "the rebooted sandbox is gone"
    finally:
        cli("vm", "delete", h, check=False)
    # Slicer's own forms: --wait is a flag, --timeout a Go duration, launch the same as add.
    other = json.loads(cli("vm", "launch", "sbx", "--wait", "--timeout", "120s", "--json").stdout)["hostname"]
    assert json.loads(cli("vm", "health", other, "--json").stdout)["hostname"] == other
    cli("vm", "shutdown", other)  # a sandbox that powers off is removed
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and cli("vm", "get", other, check=False).returncode == 0:
        time.sleep(1)
    assert cli("vm", "get", other, check=False).returncode == 1
    cli("secret", "create", "cli-secret", input=b"from-stdin")
    rows = json.loads(cli("secret", "list", "--json").stdout)
    assert any(r["name"] == "cli-secret" and r["size"] == 10 for r in rows)
    cli("secret", "create", "cli-literal", "--from-literal=v4lue")
    rows = json.loads(cli("secret", "list", "--json").stdout)
    assert any(r["name"] == "cli-literal" and r["size"] == 5 for r in rows)
    assert "PERMISSIONS" in cli("secret", "list", "-v").stdout.decode()
    cli("secret", "remove", "cli-literal")
    cli("secret", "update", "cli-secret", "--value", "changed!")
    cli("secret", "remove", "cli-secret")
    assert cli("secret", "remove", "cli-secret", check=False).returncode == 1


def test_background_commands_and_slicer_forms(cli, tmp_path):
    exec_id = cli("bg", "exec", "vm-1", "--", "sh", "-c", "echo bg-out; exit 3").stdout.decode().strip()
    assert exec_id.startswith("ex_")
    assert cli("bg", "wait", "vm-1", exec_id, "--timeout", "60s", check=False).returncode == 3
    assert cli("vm", "bg", "logs", "vm-1", exec_id).stdout.decode() == "bg-out\n"
    assert exec_id in cli("bg", "list", "vm-1").stdout.decode()
    cli("bg", "remove", "vm-1", exec_id)
    assert cli("bg", "info", "vm-1", exec_id, check=False).returncode == 1
    other = cli("bg", "exec", "vm-1", "-c", "sleep", "-a", "300").stdout.decode().strip()
    cli("bg", "kill", "vm-1", other, "--signal", "TERM", "--grace", "2s")
    cli("bg", "remove", "vm-1", other)
    (tmp_path / "home.txt").write_text("tilde")
    cli("cp", str(tmp_path / "home.txt"), "vm-1:~/")  # the top-level shortcut, ~ is the user's home
    assert cli("exec", "vm-1", "--", "cat", "/root/home.txt").stdout == b"tilde"
    assert "vm-1" in cli("ls", "--api", cli.env["SLICER_URL"]).stdout.decode()  # --api: Slicer's --url
    config = cli("new", "sandbox", "--count=0", "--graceful-shutdown=false", "--hypervisor", "firecracker").stdout
    assert b"count: 0" in config and b"graceful_shutdown: false" in config and b"hypervisor: firecracker" in config
    for flags in (["--net", "isolated", "--cidr", "169.254.100.0/22", "--drop", "10.0.0.0/8", "--socket",
                   "/run/s.sock", "--github", "alice", "--ssh-key", "ssh-ed25519 AAAA x", "--ram", "1.5", "--cpu", "1",
                   "--persistent=true", "--userdata-file", "/etc/hostname"],
                  ["--cidr", "10.77.0.0/24", "--range", "10.77.0.10-10.77.0.20", "--tap-prefix", "webtap",
                   "--api-bind", "127.0.0.1", "--api-port", "9090", "--api-auth=false", "--storage-size", "20G"]):
        cfg = load_config(cli("new", "g", *flags).stdout.decode())  # what `slicer new` prints, `slicer up` takes
        assert cfg.host_groups[0].name == "g"
    assert cfg.host_groups[0].network.range == "10.77.0.10-10.77.0.20" and cfg.api.port == 9090
    narrow = subprocess.run([sys.executable, "-m", "slicer", "vm", "list"], env={**cli.env, "COLUMNS": "80"},
                            capture_output=True, timeout=60).stdout.decode()
    assert "vm-1" in narrow and "512 MiB" in narrow and max(len(line) for line in narrow.splitlines()) <= 80
    cli("cp", "--mode=tar", "vm-1:~/home.txt", str(tmp_path / "tarred"))
    assert (tmp_path / "tarred" / "home.txt").read_text() == "tilde"
    unit = cli("service", "generate", "--name", "slicer-test").stdout.decode()
    assert "ExecStart=" in unit and " up " in unit and "KillMode=process" in unit


def test_shell_in_a_pseudo_terminal(cli):
    pid, fd = pty.fork()
    if pid == 0:
        os.execvpe(sys.executable, [sys.executable, "-m", "slicer", "vm", "shell", "vm-1"], cli.env)
    out = b""

    def read_until(marker: bytes, timeout: float = 60) -> None:
        nonlocal out
        deadline = time.monotonic() + timeout
        while marker not in out and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.5)[0]:
                try:
                    out += os.read(fd, 65536)
                except OSError:
                    break
        assert marker in out, out[-500:]

    read_until(b"\x1b[?2004h")  # readline is waiting for input: the session is up
    os.write(fd, b"echo MARK-$((6*7))\r")
    read_until(b"MARK-42")
    os.write(fd, b"exit 5\r")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 5


def forwarded(cli, spec: list[str], get) -> str:
    """Run ``slicer vm forward vm-1 SPEC`` and ``get()`` through it until it answers; its body."""
    proc = subprocess.Popen([sys.executable, "-m", "slicer", "vm", "forward", "vm-1", *spec],
                            env=cli.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                body = get().text
                if "fw-ok" in body or time.monotonic() > deadline:
                    return body
            except (OSError, httpx.HTTPError):
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.5)
    finally:
        proc.send_signal(2)
        proc.wait(10)


def test_forward_serves_http_from_the_guest(cli):
    cli("vm", "exec", "vm-1", "--", "sh", "-c", "mkdir -p /tmp/fw && echo fw-ok > /tmp/fw/index.html && cd /tmp/fw "
        "&& (nohup python3 -m http.server 8766 --bind 127.0.0.1 >/dev/null 2>&1 &)")
    port = free_port()
    assert forwarded(cli, [f"{port}:127.0.0.1:8766"], lambda: httpx.get(f"http://127.0.0.1:{port}/index.html",
                                                                         timeout=30)) == "fw-ok\n"
    # Ctrl-C with a connection open through it (a keep-alive one, idle): it ends at once
    port = free_port()
    with httpx.Client(timeout=30) as keep:
        def get_kept() -> httpx.Response:
            return keep.get(f"http://127.0.0.1:{port}/index.html", headers={"Connection": "keep-alive"})
        proc = subprocess.Popen([sys.executable, "-m", "slicer", "vm", "forward", "vm-1", f"{port}:127.0.0.1:8766"],
                                env=cli.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if get_kept().text == "fw-ok\n":
                        break
                except httpx.HTTPError:
                    assert time.monotonic() < deadline, "the forward never answered"
                    time.sleep(0.5)
            idle = socket.create_connection(("127.0.0.1", port))  # its WebSocket open, nothing sent
            time.sleep(1.5)
            t = time.monotonic()
            proc.send_signal(2)
            assert proc.wait(10) is not None and time.monotonic() - t < 3, "Ctrl-C did not end it at once"
            assert b"Traceback" not in proc.stderr.read()
            idle.close()
        finally:
            if proc.poll() is None:
                proc.kill()
    # A local unix socket to the same server (Slicer's -L ./docker.sock:/var/run/docker.sock form)
    sock = f"/tmp/slt-fw-{os.getpid()}.sock"

    def through_socket() -> httpx.Response:
        with httpx.Client(transport=httpx.HTTPTransport(uds=sock)) as c:
            return c.get("http://vm/index.html", timeout=30)

    assert forwarded(cli, ["-L", f"{sock}:127.0.0.1:8766"], through_socket) == "fw-ok\n"
    assert not os.path.exists(sock), "the forward removes its socket"
    # A unix socket on the VM's side (PORT:/path), served by a one-line HTTP answerer in the guest
    server = ("import os, socket\ns = socket.socket(socket.AF_UNIX)\np = '/tmp/fw.sock'\n"
              "os.path.exists(p) and os.unlink(p)\ns.bind(p)\ns.listen(8)\nwhile True:\n"
              "    c, _ = s.accept(); c.recv(4096)\n"
              "    c.sendall(b'HTTP/1.0 200 OK\\r\\nContent-Length: 6\\r\\n\\r\\nfw-ok\\n'); c.close()\n")
    cli("vm", "exec", "vm-1", "--", "sh", "-c", f"(nohup python3 -c \"{server}\" >/dev/null 2>&1 &)")
    port = free_port()
    assert forwarded(cli, [f"{port}:/tmp/fw.sock"], lambda: httpx.get(f"http://127.0.0.1:{port}/",
                                                                       timeout=30)) == "fw-ok\n"


def test_suspend_restore_and_storage(cli, api):
    r = api.post("/hostgroup/sbx/nodes", params={"wait": "agent"}, json={})
    assert r.status_code == 201, r.text
    h = r.json()["hostname"]
    try:
        assert "suspended" in cli("vm", "suspend", h).stdout.decode()
        text = cli("storage").stdout.decode()
        assert h in text and "Templates" in text and "total:" in text
        assert "restored" in cli("vm", "restore", h).stdout.decode()
        assert api.get(f"/vm/{h}").json()["status"] == "Running"
        again = cli("vm", "restore", h, check=False)
        assert again.returncode == 1 and b"not_suspended" in again.stderr
        templates = json.loads(cli("template", "list", "--json").stdout)
        assert any(t["hostgroup"] == "sbx" and t["clones"] >= 1 for t in templates)
    finally:
        api.delete(f"/hostgroup/sbx/nodes/{h}")
