"""Shell and forward WebSockets against a real VM, driven by the `websockets` client."""

from __future__ import annotations

import concurrent.futures
import struct
import time

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

pytestmark = pytest.mark.vm
DATA, WINDOW, SHUTDOWN, HEARTBEAT, CLOSE = 1, 2, 3, 4, 5


def frame(ftype: int, payload: bytes = b"") -> bytes:
    return struct.pack(">BI", ftype, len(payload)) + payload


def ws_url(daemon, path: str) -> str:
    return daemon.url.replace("http://", "ws://") + path


def auth(daemon) -> dict:
    return {"Authorization": f"Bearer {daemon.token}"}


def read_session(ws, until: bytes | None = None, timeout: float = 30) -> tuple[bytes, bytes | None]:
    """Output of a shell session until ``until`` appears or the session-close frame."""
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = ws.recv(timeout=deadline - time.monotonic())
        ftype, length = struct.unpack(">BI", msg[:5])
        assert length == len(msg) - 5
        if ftype == DATA:
            out += msg[5:]
            if until and until in out:
                return out, None
        elif ftype == CLOSE:
            return out, msg[5:]
    raise AssertionError(f"shell said: {out[-500:]!r}")


def test_shell_runs_on_a_pty_honours_resize_and_ends_with_exit(daemon, vm):
    with connect(ws_url(daemon, f"/vm/{vm}/shell?uid=1000"), additional_headers=auth(daemon)) as ws:
        ws.send(frame(WINDOW, struct.pack(">II", 132, 43)))
        ws.send(frame(DATA, b"stty size; tty; id -un; echo MARK-$((40+2))\n"))
        out, _ = read_session(ws, until=b"MARK-42")
        assert b"43 132" in out and b"/dev/pts/" in out and b"ubuntu" in out
        ws.send(frame(WINDOW, struct.pack(">II", 90, 30)))
        ws.send(frame(HEARTBEAT))
        ws.send(frame(DATA, b"stty size; exit 3\n"))
        out, code = read_session(ws)
        assert b"30 90" in out
        assert code == b"3", "the session-close frame carries the shell's exit status"


def test_shell_client_going_away_ends_the_shell(api, daemon, vm):
    with connect(ws_url(daemon, f"/vm/{vm}/shell"), additional_headers=auth(daemon)) as ws:
        ws.send(frame(DATA, b"echo $$ > /tmp/shell.pid; echo READY\n"))
        read_session(ws, until=b"READY\r\n")
    pid = api.post(f"/vm/{vm}/exec", params={"cmd": "cat /tmp/shell.pid", "buffered": "true"}).json()["stdout"].strip()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        alive = api.post(f"/vm/{vm}/exec", params={"cmd": f"kill -0 {pid} 2>/dev/null && echo alive",
                                                 "buffered": "true"}).json()["stdout"]
        if not alive:
            break
        time.sleep(0.5)
    assert not alive, "the shell of a vanished client is hung up"


def test_shell_refuses_bad_requests_with_json(daemon, vm):
    with pytest.raises(InvalidStatus) as e:
        connect(ws_url(daemon, f"/vm/{vm}/shell?shell=/no/shell"), additional_headers=auth(daemon))
    assert e.value.response.status_code == 400 and b"error" in e.value.response.body
    with pytest.raises(InvalidStatus) as e:
        connect(ws_url(daemon, f"/vm/{vm}/shell"))
    assert e.value.response.status_code == 401
    with pytest.raises(InvalidStatus) as e:
        connect(ws_url(daemon, "/vm/ghost-1/shell"), additional_headers=auth(daemon))
    assert e.value.response.status_code == 404


@pytest.fixture(scope="module")
def web_server(api, vm) -> int:
    port = 8765
    r = api.post(f"/vm/{vm}/exec", params={
        "cmd": f"mkdir -p /tmp/www && echo hello-from-guest > /tmp/www/index.html && cd /tmp/www && "
               f"(nohup python3 -m http.server {port} --bind 127.0.0.1 >/dev/null 2>&1 &)", "buffered": "true"})
    assert r.status_code == 200
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        probe = api.post(f"/vm/{vm}/exec", params={"cmd": f"exec 3<>/dev/tcp/127.0.0.1/{port} && echo up",
                                                 "buffered": "true"}).json()["stdout"]
        if "up" in probe:
            return port
        time.sleep(0.5)
    raise AssertionError("http.server did not start in the guest")


def fetch(daemon, vm: str, upstream: str) -> bytes:
    headers = {**auth(daemon), "X-Inlets-Upstream": upstream, "X-Inlets-Mode": "local"}
    with connect(ws_url(daemon, f"/vm/{vm}/forward"), additional_headers=headers) as ws:
        ws.send(b"GET /index.html HTTP/1.0\r\nHost: guest\r\n\r\n")
        data = b""
        try:
            while True:
                data += ws.recv(timeout=30)
        except Exception:
            pass
    return data


def test_forward_fetches_from_a_server_in_the_guest(daemon, vm, web_server):
    data = fetch(daemon, vm, f"127.0.0.1:{web_server}")
    assert data.startswith(b"HTTP/1.0 200") and data.endswith(b"hello-from-guest\n")


def test_forward_ten_connections_at_once(daemon, vm, web_server):
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        results = list(pool.map(lambda _: fetch(daemon, vm, f"127.0.0.1:{web_server}"), range(10)))
    assert all(r.endswith(b"hello-from-guest\n") for r in results)


def test_forward_errors_are_clear(daemon, vm):
    with pytest.raises(InvalidStatus) as e:
        connect(ws_url(daemon, f"/vm/{vm}/forward"),
                additional_headers={**auth(daemon), "X-Inlets-Upstream": "127.0.0.1:9"})
    assert e.value.response.status_code == 502 and b"upstream_unreachable" in e.value.response.body
    with pytest.raises(InvalidStatus) as e:
        connect(ws_url(daemon, f"/vm/{vm}/forward"), additional_headers=auth(daemon))
    assert e.value.response.status_code == 400
    with pytest.raises(InvalidStatus) as e:
        connect(ws_url(daemon, f"/vm/{vm}/forward"),
                additional_headers={**auth(daemon), "X-Inlets-Upstream": "bad target!"})
    assert e.value.response.status_code == 400
