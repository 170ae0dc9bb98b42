"""Exec through the API into a real VM: frames, exit codes, identity, stdin, bytes, big output."""

from __future__ import annotations

import base64
import hashlib
import json
import time

import pytest

pytestmark = pytest.mark.vm


def run(api, vm, **params) -> list[dict]:
    with api.stream("POST", f"/vm/{vm}/exec", params=params) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("application/x-ndjson")
        return [json.loads(line) for line in r.iter_lines() if line]


def test_frames_carry_typed_and_legacy_fields_in_order(api, vm):
    frames = run(api, vm, cmd="echo one; echo two >&2; sleep 0.2; echo three; exit 3")
    assert frames[0]["type"] == "started" and frames[0]["pid"] > 0 and frames[0]["started_at"]
    last = frames[-1]
    assert last["type"] == "exit" and last["exit_code"] == 3 and last["ended_at"] and last["signal"] == ""
    out = "".join(f["stdout"] for f in frames)
    err = "".join(f["stderr"] for f in frames)
    assert out == "one\nthree\n" and err == "two\n"
    for f in frames[1:-1]:
        assert f["data"] == f[f["type"]] and f["exit_code"] == 0
    kinds = [f["type"] for f in frames if f["type"] in ("stdout", "stderr")]
    assert kinds.index("stderr") < len(kinds) - 1, "stderr 'two' came before stdout 'three'"


@pytest.mark.parametrize("cmd, code, signal", [("true", 0, ""), ("false", 1, ""), ("kill -9 $$", 137, "SIGKILL"),
                                               ("kill -35 $$", 163, "SIGRTMIN+1")])
def test_exit_codes(api, vm, cmd, code, signal):
    last = run(api, vm, cmd=cmd)[-1]
    assert (last["exit_code"], last["signal"]) == (code, signal)


def test_env_cwd_uid_gid_and_args(api, vm):
    r = api.post(f"/vm/{vm}/exec", params=[
        ("cmd", 'echo "$GREETING $(pwd) $(id -u):$(id -g)"'),
        ("env", "GREETING=hello world"), ("cwd", "/tmp"), ("uid", "1000"), ("gid", "1000"),
        ("buffered", "true"),
    ])
    assert r.json()["stdout"] == "hello world /tmp 1000:1000\n"
    direct = api.post(f"/vm/{vm}/exec", params=[
        ("cmd", "/usr/bin/printf"), ("args", "%s|"), ("args", "a b"), ("args", "$HOME"), ("shell", ""),
        ("buffered", "true"),
    ]).json()
    assert direct["stdout"] == "a b|$HOME|", "without a shell, arguments are passed untouched"


@pytest.mark.parametrize("uid", [0, 1000])
def test_a_plain_command_runs_as_it_did_through_bash(api, vm, uid):
    """A plain line is execed by the agent itself (slicer.agent.direct); the quoted one below
    goes through bash, which execs the same program in its own place: the same argv, environment
    (PWD, SHLVL, _), directory and user."""
    def both(line: str, quoted: str, cwd: str = "/tmp") -> tuple[dict, dict]:
        def one(cmd: str) -> dict:
            return api.post(f"/vm/{vm}/exec", params={"cmd": cmd, "cwd": cwd, "uid": uid, "buffered": "true",
                                                      "env": "SHLVL=2"}).json()
        return one(line), one(quoted)

    for line, quoted in (("env", '"env"'), ("cat /proc/self/cmdline", '"cat" /proc/self/cmdline'),
                         ("id", '"id"'), ("/bin/pwd", '"/bin/pwd"'), ("ls /proc/self/fd", '"ls" /proc/self/fd')):
        plain, shell = both(line, quoted)
        assert plain["exit_code"] == shell["exit_code"] == 0, (plain, shell)
        if line == "env":  # bash exports in an order of its own
            plain["stdout"], shell["stdout"] = (sorted(x["stdout"].splitlines()) for x in (plain, shell))
        assert plain["stdout"] == shell["stdout"] and plain["stderr"] == shell["stderr"] == "", line
    # ... and the plain lines above were not through bash: in this guest, bash and PATH qualify
    probe = ("from slicer.agent import direct, execute, runtime; "
             "p = direct.plan('env', [], runtime.shell('/bin/bash'), dict(execute.BASE_ENV), '/tmp'); print(p.path)")
    r = api.post(f"/vm/{vm}/exec", params={"cmd": "/usr/bin/python3", "args": ["-c", probe], "shell": "",
                                           "env": "PYTHONPATH=/opt/slicer", "buffered": "true"}).json()
    assert r["stdout"] == "/usr/bin/env\n", r
    env = both("env", '"env"', cwd="/usr/share")[0]["stdout"].splitlines()
    assert {"PWD=/usr/share", "SHLVL=2", "_=/usr/bin/env"} <= set(env)
    # What fails is bash's to say, as before: not found 127, not executable 126, no #! run by bash.
    setup = ("printf 'echo from-a-script\\n' > /tmp/noshebang && chmod 755 /tmp/noshebang && "
             "printf 'x' > /tmp/noexec && chmod 644 /tmp/noexec")
    assert api.post(f"/vm/{vm}/exec", params={"cmd": setup, "buffered": "true"}).json()["exit_code"] == 0
    for line, code, out, err in (("no-such-program-here", 127, "", "command not found"),
                                 ("/tmp/noexec", 126, "", "Permission denied"),
                                 ("/tmp/noshebang", 0, "from-a-script\n", "")):
        r = api.post(f"/vm/{vm}/exec", params={"cmd": line, "uid": uid, "buffered": "true"}).json()
        assert (r["exit_code"], r["stdout"]) == (code, out) and err in r["stderr"], (line, r)


def test_stdin_is_piped(api, vm):
    payload = b"line one\nline two\n" * 1000
    r = api.post(f"/vm/{vm}/exec", params={"cmd": "sha256sum", "stdin": "true", "buffered": "true"},
                 content=payload)
    assert r.json()["stdout"].split()[0] == hashlib.sha256(payload).hexdigest()


def test_base64_round_trips_every_byte(api, vm):
    every = bytes(range(256))
    r = api.post(f"/vm/{vm}/exec", params={"cmd": "cat", "stdin": "true", "stdio": "base64", "buffered": "true"},
                 content=every)
    assert base64.b64decode(r.json()["stdout"]) == every
    assert r.json()["encoding"] == "base64"  # the official SDKs decode only when told
    frames = run(api, vm, cmd="printf '\\x00\\xff\\x80'", stdio="base64")
    data = b"".join(base64.b64decode(f["data"]) for f in frames if f["type"] == "stdout")
    assert data == b"\x00\xff\x80"
    assert all(f["encoding"] == "base64" for f in frames if f["type"] in ("stdout", "stderr"))
    assert "encoding" not in run(api, vm, cmd="echo text")[1], "text frames carry no encoding"
    bg = api.post(f"/vm/{vm}/exec", params={"cmd": "printf '\\xff'", "stdio": "base64", "background": "true"}).json()
    assert bg["exec_id"].startswith("ex_")
    api.get(f"/vm/{vm}/exec/{bg['exec_id']}/wait-exit", params={"timeout": 30})
    logs = [json.loads(x) for x in api.get(f"/vm/{vm}/exec/{bg['exec_id']}/logs").text.splitlines()]
    (out,) = [f for f in logs if f["type"] == "stdout"]
    assert out["encoding"] == "base64" and base64.b64decode(out["data"]) == b"\xff"
    # a text exec's logs in base64 (the TS SDK asks for them so): every byte as it was written
    bg = api.post(f"/vm/{vm}/exec", params={"cmd": "printf 'caf\\xc3\\xa9 \\xff\\x00'", "background": "true"}).json()
    assert "exec_id" in bg, bg
    api.get(f"/vm/{vm}/exec/{bg['exec_id']}/wait-exit", params={"timeout": 30})
    url = f"/vm/{vm}/exec/{bg['exec_id']}/logs"
    logs = [json.loads(x) for x in api.get(url, params={"stdio": "base64"}).text.splitlines()]
    outs = [f for f in logs if f["type"] == "stdout"]
    assert all(f["encoding"] == "base64" for f in outs)
    assert b"".join(base64.b64decode(f["data"]) for f in outs) == "café ".encode() + b"\xff\x00"
    text = [json.loads(x) for x in api.get(url).text.splitlines()]
    assert "".join(f["data"] for f in text if f["type"] == "stdout") == "café \ufffd\x00"
    assert all("encoding" not in f for f in text)
    bad = api.get(url, params={"stdio": "hex"})
    assert bad.status_code == 400 and bad.json()["code"] == "invalid_request", bad.text


def test_big_output_streams_completely(api, vm):
    size = 50 * 1024 * 1024
    h = hashlib.sha256()
    total = 0
    frames = 0
    with api.stream("POST", f"/vm/{vm}/exec", params={"cmd": f"head -c {size} /dev/urandom | base64 -w 0",
                                                        "stderr": "false"}) as r:
        for line in r.iter_lines():
            if not line:
                continue
            f = json.loads(line)
            frames += 1
            if f["type"] == "stdout":
                h.update(f["data"].encode())
                total += len(f["data"])
            last = f
    assert last["type"] == "exit" and last["exit_code"] == 0
    assert total == (size + 2) // 3 * 4
    assert frames > 100, "output arrives in many frames, not one buffer"


@pytest.mark.parametrize(
    "params, status, code",
    [
        ({}, 400, "invalid_request"),
        ({"cmd": "/no/such/binary", "shell": ""}, 400, "not_found"),
        ({"cmd": "pwd", "cwd": "/no/such/dir"}, 400, "invalid_cwd"),
        ({"cmd": "true", "uid": "abc"}, 400, "invalid_request"),
        ({"cmd": "true", "stdio": "hex"}, 400, "invalid_request"),
        ({"cmd": "true", "env": "NOEQUALS"}, 400, "invalid_request"),
    ],
)
def test_bad_exec_requests_are_refused_before_the_stream(api, vm, params, status, code):
    r = api.post(f"/vm/{vm}/exec", params=params)
    assert r.status_code == status and r.json()["code"] == code and r.json()["error"]


def test_exec_on_a_paused_vm_is_409(api, vm):
    assert api.post(f"/vm/{vm}/pause").status_code == 200
    try:
        r = api.post(f"/vm/{vm}/exec", params={"cmd": "true"})
        assert r.status_code == 409 and r.json()["code"] == "paused"
    finally:
        assert api.post(f"/vm/{vm}/resume").status_code == 200


def test_exec_on_unknown_vm_is_404(api):
    assert api.post("/vm/ghost-1/exec", params={"cmd": "true"}).status_code == 404


def test_background_exec_lifecycle(api, vm):
    r = api.post(f"/vm/{vm}/exec", params={"cmd": "for i in 1 2 3; do echo line$i; sleep 0.2; done; echo err >&2; "
                                                  "exit 7", "background": "true"})
    assert r.status_code == 201, r.text
    started = r.json()
    exec_id = started["exec_id"]
    assert started["pid"] > 0 and started["ring_bytes"] == 1 << 20
    assert exec_id in [e["exec_id"] for e in api.get(f"/vm/{vm}/exec").json()]
    with api.stream("GET", f"/vm/{vm}/exec/{exec_id}/logs", params={"follow": "true"}) as logs:
        frames = [json.loads(line) for line in logs.iter_lines() if line]
    assert "".join(f.get("data", "") for f in frames if f["type"] == "stdout") == "line1\nline2\nline3\n"
    assert frames[-1]["type"] == "exit" and frames[-1]["exit_code"] == 7
    assert [f["id"] for f in frames] == sorted(f["id"] for f in frames)
    waited = api.get(f"/vm/{vm}/exec/{exec_id}/wait-exit", params={"timeout": 30}).json()
    assert waited["running"] is False and waited["exit_code"] == 7 and waited["timed_out"] is False
    info = api.get(f"/vm/{vm}/exec/{exec_id}").json()
    assert info["running"] is False and info["exit_code"] == 7 and info["bytes_written"] >= 21
    replay = [json.loads(x) for x in api.get(f"/vm/{vm}/exec/{exec_id}/logs", params={"from_id": 3}).text.splitlines()]
    assert replay[0]["id"] == 3
    assert api.delete(f"/vm/{vm}/exec/{exec_id}").json() == {"exec_id": exec_id, "reaped": True}
    for method, path in [("GET", ""), ("GET", "/logs"), ("POST", "/kill"), ("GET", "/wait-exit"), ("DELETE", "")]:
        gone = api.request(method, f"/vm/{vm}/exec/{exec_id}{path}")
        assert gone.status_code == 410 and gone.json()["code"] == "gone", (method, path, gone.text)


def test_background_kill_wait_and_ring_eviction(api, vm):
    r = api.post(f"/vm/{vm}/exec", params={"cmd": "yes filler-line | head -c 300000; sleep 600",
                                           "background": "true", "ring_bytes": "65536"})
    assert r.status_code == 201, r.text
    exec_id = r.json()["exec_id"]
    timed = api.get(f"/vm/{vm}/exec/{exec_id}/wait-exit", params={"timeout": 1}).json()
    assert timed["timed_out"] is True and timed["running"] is True
    frames = [json.loads(x) for x in api.get(f"/vm/{vm}/exec/{exec_id}/logs").text.splitlines()]
    assert frames[0]["type"] == "gap" and frames[0]["dropped_bytes"] > 0, "old output was evicted"
    kept = sum(len(f.get("data", "")) for f in frames if f["type"] == "stdout")
    assert 0 < kept <= 65536
    killed = api.post(f"/vm/{vm}/exec/{exec_id}/kill", json={"signal": "KILL"}).json()
    assert killed["signal_sent"] == "KILL"
    done = api.get(f"/vm/{vm}/exec/{exec_id}/wait-exit", params={"timeout": 30}).json()
    assert done["running"] is False and done["exit_code"] == 137 and done["signal"] == "SIGKILL"
    api.delete(f"/vm/{vm}/exec/{exec_id}")


def test_background_budget_and_bad_requests(api, vm):
    r = api.post(f"/vm/{vm}/exec", params={"cmd": "true", "background": "true", "ring_bytes": str(1 << 40)})
    assert r.status_code == 400
    ids = []
    try:
        for _ in range(80):
            r = api.post(f"/vm/{vm}/exec", params={"cmd": "sleep 300", "background": "true"})
            if r.status_code != 201:
                break
            ids.append(r.json()["exec_id"])
        assert r.status_code == 503 and r.json()["code"] == "budget_exhausted"
    finally:
        for exec_id in ids:
            api.post(f"/vm/{vm}/exec/{exec_id}/kill", json={"signal": "KILL"})
            api.delete(f"/vm/{vm}/exec/{exec_id}")
    assert api.post(f"/vm/{vm}/exec", params={"cmd": "cat", "background": "true", "stdin": "true"}).status_code == 400
    assert api.get(f"/vm/{vm}/exec/not..valid").status_code in (400, 404)
    assert api.get(f"/vm/{vm}/exec/deadbeef").status_code == 404
    assert api.post(f"/vm/{vm}/exec/deadbeef/kill", json={"signal": "BOOM"}).status_code == 400


def still_running(api, vm: str, tag: str, wait: float = 30) -> str:
    """PIDs of processes named ``tag`` in the VM once they are gone or ``wait`` has passed."""
    deadline = time.monotonic() + wait
    while True:
        left = api.post(f"/vm/{vm}/exec", params={"cmd": f"pgrep -f ^{tag} || true", "buffered": "true"})
        pids = left.json()["stdout"].strip()
        if not pids or time.monotonic() > deadline:
            return pids
        time.sleep(0.5)


def test_client_disconnect_kills_the_foreground_process(api, vm):
    tag = f"disconnect-{time.time_ns()}"
    with api.stream("POST", f"/vm/{vm}/exec", params={"cmd": f"echo started; exec -a {tag} sleep 600"}) as r:
        for line in r.iter_lines():
            if line and json.loads(line).get("stdout") == "started\n":
                break
    # the client is gone: the agent must kill the process group
    assert not still_running(api, vm, tag), "the process outlived its client"
    # the same with a stdin that has ended (the piped `slicer vm exec < file` form): the daemon
    # watches for the client only once the body is read, and the command goes with it
    tag = f"disconnect-stdin-{time.time_ns()}"
    with api.stream("POST", f"/vm/{vm}/exec", params={"cmd": f"cat; echo started; exec -a {tag} sleep 600",
                                                       "stdin": "true"}, content=b"input\n") as r:
        for line in r.iter_lines():
            if line and json.loads(line).get("stdout") == "started\n":
                break
    assert not still_running(api, vm, tag), "the process outlived its client"


def test_stdin_is_full_duplex(daemon, vm):
    """Each line sent to `cat` comes back while the request body is still open."""
    import socket

    import h11

    sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=60)
    conn = h11.Connection(h11.CLIENT)
    sock.sendall(conn.send(h11.Request(method="POST", target=f"/vm/{vm}/exec?cmd=cat&stdin=true", headers=[
        ("Host", f"127.0.0.1:{daemon.port}"), ("Transfer-Encoding", "chunked"),
        ("Authorization", f"Bearer {daemon.token}")])))
    pending = b""

    def next_frame() -> dict:
        nonlocal pending
        while b"\n" not in pending:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(sock.recv(65536))
            elif isinstance(event, h11.Response):
                assert event.status_code == 200
            elif isinstance(event, h11.Data):
                pending += event.data
            else:
                raise AssertionError(f"stream ended: {event}")
        line, pending = pending.split(b"\n", 1)
        return json.loads(line)

    assert next_frame()["type"] == "started"
    for i in range(3):
        sock.sendall(conn.send(h11.Data(data=f"ping-{i}\n".encode())))
        echoed = ""
        while echoed != f"ping-{i}\n":
            f = next_frame()
            assert f["type"] == "stdout", f
            echoed += f["stdout"]
    sock.sendall(conn.send(h11.EndOfMessage()))
    last = next_frame()
    while last["type"] != "exit":
        last = next_frame()
    assert last["exit_code"] == 0
    sock.close()


def test_64_streams_at_once_and_health_still_answers(daemon, vm):
    """Sixty-four long execs on one VM: health and a fresh exec are still served meanwhile."""
    import asyncio

    import httpx

    async def run() -> None:
        headers = {"Authorization": f"Bearer {daemon.token}"}
        async with httpx.AsyncClient(base_url=daemon.url, headers=headers, timeout=120) as c:
            async def long(i: int) -> dict:
                r = await c.post(f"/vm/{vm}/exec", params={"cmd": f"sleep 6; echo done-{i}", "buffered": "true"})
                return r.json()

            many = [asyncio.ensure_future(long(i)) for i in range(64)]
            await asyncio.sleep(3)  # all 64 are running in the guest now
            assert not any(t.done() for t in many)
            health = await c.get(f"/vm/{vm}/health")
            assert health.status_code == 200, health.text
            fresh = await c.post(f"/vm/{vm}/exec", params={"cmd": "echo fresh", "buffered": "true"})
            assert fresh.json()["stdout"] == "fresh\n"
            results = await asyncio.gather(*many)
            assert sorted(r["stdout"] for r in results) == sorted(f"done-{i}\n" for i in range(64))

    asyncio.run(run())


def test_buffered_output_is_capped_and_a_leaving_client_cancels_it(daemon, api, vm):
    import httpx

    r = api.post(f"/vm/{vm}/exec", params={"cmd": "yes | head -c 20000000", "buffered": "true"})
    assert r.status_code == 413 and r.json()["code"] == "too_large" and "buffered=false" in r.json()["error"]
    tag = f"buffered-leaves-{time.time_ns()}"
    with daemon.client() as impatient, pytest.raises(httpx.TimeoutException):
        impatient.post(f"/vm/{vm}/exec", params={"cmd": f"exec -a {tag} sleep 600", "buffered": "true"}, timeout=3)
    assert not still_running(api, vm, tag), "the buffered command outlived its client"


def test_a_call_on_a_vm_still_booting_waits_and_gets_through(api):
    """Right after a create that does not wait (a cold boot: seconds), exec and cp wait for the
    agent and the guest's setup, then answer, instead of 503 (Slicer's clients call at once)."""
    r = api.post("/hostgroup/sbx/nodes", json={"boot": "cold"})
    assert r.status_code == 201, r.text
    h = r.json()["hostname"]
    try:
        assert api.get(f"/vm/{h}").json()["status"] in ("Starting", "Running")
        r = api.post(f"/vm/{h}/exec", params={"cmd": "hostname", "buffered": "true"})
        assert r.status_code == 200, r.text
        assert r.json()["stdout"] == f"{h}\n"
        r = api.post(f"/vm/{h}/cp", params={"path": "/tmp/early"}, content=b"early\n",
                     headers={"content-type": "application/octet-stream"})
        assert r.status_code == 200, r.text
    finally:
        api.delete(f"/hostgroup/sbx/nodes/{h}")
