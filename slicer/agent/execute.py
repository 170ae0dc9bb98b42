"""Run commands in the guest and stream their output as NDJSON frames.

Every frame carries Slicer's typed fields (``type``, ``data``, ``pid``, ``started_at``,
``ended_at``, ``signal``) and the seed API's (``stdout``, ``stderr``, ``exit_code``), so old
and new clients both read it. Output is sent as it appears; nothing is buffered whole unless
the caller asked for ``buffered``.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import contextlib
import functools
import json
import os
import shlex
import signal
from dataclasses import dataclass, field
from datetime import UTC, datetime

from slicer.agent import catrust, direct, paths, runtime

READ_CHUNK = 65536
BASE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


class ExecError(Exception):
    """The command could not be started; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, code: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


def now() -> str:
    return datetime.now(UTC).isoformat()


def _flag(query, name: str, default: bool) -> bool:
    value = query.get(name)
    if value is None or value == "":
        return default
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ExecError(f"{name} must be true or false, not {value!r}", "invalid_request")


def _int(query, name: str, default: int | None) -> int | None:
    value = query.get(name)
    if value is None or value == "":
        return default
    try:
        n = int(value)
    except ValueError:
        raise ExecError(f"{name} must be an integer, not {value!r}", "invalid_request") from None
    if not 0 <= n < 2**32:
        raise ExecError(f"{name} out of range", "invalid_request")
    return n


def wants_base64(query) -> bool | None:
    """The query's ``stdio``: True for base64, False for text, None when it names neither."""
    stdio = query.get("stdio") or None
    if stdio not in (None, "text", "base64"):
        raise ExecError("stdio must be text or base64", "invalid_request")
    return None if stdio is None else stdio == "base64"


@dataclass
class ExecRequest:
    cmd: str
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    uid: int = 0
    gid: int | None = None  # the user's primary group when None
    cwd: str | None = None
    shell: str = "/bin/bash"
    stdin: bool = False
    stdout: bool = True
    stderr: bool = True
    base64: bool = False
    buffered: bool = False
    background: bool = False
    ring_bytes: int = 0

    @classmethod
    def from_query(cls, query) -> ExecRequest:
        """Parse a multi-dict of query parameters (Slicer's names)."""
        cmd = query.get("cmd", "")
        if not cmd:
            raise ExecError("cmd is required", "invalid_request")
        env = {}
        for item in query.getall("env", []):
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ExecError(f"env must be KEY=VALUE, not {item!r}", "invalid_request")
            env[key] = value
        b64 = wants_base64(query)
        return cls(
            cmd=cmd,
            args=list(query.getall("args", [])),
            env=env,
            uid=_int(query, "uid", 0) or 0,
            gid=_int(query, "gid", None),
            cwd=query.get("cwd") or None,
            shell=query.get("shell", "/bin/bash"),
            stdin=_flag(query, "stdin", False),
            stdout=_flag(query, "stdout", True),
            stderr=_flag(query, "stderr", True),
            base64=bool(b64),
            buffered=_flag(query, "buffered", False),
            background=_flag(query, "background", False),
            ring_bytes=_int(query, "ring_bytes", 0) or 0,
        )

    def validate(self) -> None:
        if self.background and (self.stdin or self.buffered):
            raise ExecError("background execs take neither stdin nor buffered", "invalid_request")

    def argv(self) -> list[str]:
        cmd = runtime.helper(self.cmd)
        if self.shell:
            line = " ".join([cmd, *(shlex.quote(a) for a in self.args)])
            return [runtime.shell(self.shell), "-c", line]
        return [cmd, *self.args]


async def open_cwd(cwd: str | None, uid: int) -> int | None:
    """A working directory's descriptor (the caller closes it): a directory the command's user
    reaches; as root, under the agent's rule for paths (:mod:`slicer.agent.paths`: no guest
    user's symlink followed); as another uid, with that user's rights. The command starts in
    that very directory (``/proc/self/fd/N``), not in whatever the path names a moment later."""
    if not cwd:
        return None
    try:
        return await paths.run_as(uid, paths.open_dir, cwd)
    except paths.FileError as e:
        raise ExecError(f"cwd {cwd!r}: {e}", "unsafe_path" if e.code == "unsafe_path" else "invalid_cwd",
                        e.status if e.code == "unsafe_path" else 400) from None
    except OSError as e:
        raise ExecError(f"cwd {cwd!r} is not a directory ({e.strerror})", "invalid_cwd") from None


def identity_env(u: paths.User) -> dict[str, str]:
    return {"HOME": u.home or "/", "USER": u.name, "LOGNAME": u.name}


async def spawn(req: ExecRequest) -> asyncio.subprocess.Process:
    """Start the command. With a ``uid`` it runs as that user: its primary group (unless ``gid``
    says otherwise), its supplementary groups, and its HOME, USER and LOGNAME (unless ``env``
    names them), as ``su``/``initgroups`` would set them."""
    req.validate()
    cwd_fd = await open_cwd(req.cwd, req.uid)
    try:
        return await _spawn(req, cwd_fd)
    finally:
        if cwd_fd is not None:
            os.close(cwd_fd)


async def _spawn(req: ExecRequest, cwd_fd: int | None) -> asyncio.subprocess.Process:
    u = paths.user(req.uid, req.gid)
    # The group's CAs for runtimes with trust stores of their own (catrust.CA_ENV); the request's env wins.
    env = {**BASE_ENV, **catrust.ca_env(), **identity_env(u), **req.env}
    if req.uid:
        ids = {"user": req.uid, "group": u.gid, "extra_groups": u.groups}
    elif req.gid is not None:
        ids = {"group": req.gid, "extra_groups": []}
    else:
        ids = {}
    # the child changes into it before it drops privileges and before exec closes the descriptor
    cwd = f"/proc/self/fd/{cwd_fd}" if cwd_fd is not None else u.home or "/"
    launch = functools.partial(
        asyncio.create_subprocess_exec,
        stdin=asyncio.subprocess.PIPE if req.stdin else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE if req.stdout else asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE if req.stderr else asyncio.subprocess.DEVNULL,
        cwd=cwd, **ids,
        start_new_session=True,  # its own process group: killed as a whole
    )
    if req.shell and (plain := direct.plan(runtime.helper(req.cmd), req.args, runtime.shell(req.shell), env, cwd)):
        try:
            return await launch(*plain.argv, executable=plain.path, env=plain.env)
        except (OSError, ValueError):
            pass  # nothing ran: bash meets the same failure and words it as it always has (127, 126)
    try:
        return await launch(*req.argv(), env=env)
    except FileNotFoundError:
        raise ExecError(f"{req.argv()[0]}: command not found", "not_found", 400) from None
    except PermissionError as e:
        raise ExecError(f"cannot run {req.argv()[0]}: {e.strerror}", "permission_denied") from None
    except (OSError, ValueError) as e:
        raise ExecError(f"cannot start {req.argv()[0]}: {e}", "exec_failed") from None


def kill_group(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


def frame(ftype: str, **fields) -> bytes:
    out = {"type": ftype, "timestamp": now(), "stdout": "", "stderr": "", "exit_code": 0, **fields}
    return json.dumps(out, separators=(",", ":")).encode() + b"\n"


class _Encoder:
    def __init__(self, b64: bool) -> None:
        self.b64 = b64
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def __call__(self, data: bytes, final: bool = False) -> str:
        if self.b64:
            return base64.b64encode(data).decode()
        return self.decoder.decode(data, final)


def signal_name(number: int) -> str:
    """``SIGKILL``; realtime signals as the kernel's tools name them (``SIGRTMIN+3``)."""
    try:
        return signal.Signals(number).name
    except ValueError:
        if signal.SIGRTMIN <= number <= signal.SIGRTMAX:
            return f"SIGRTMIN+{number - signal.SIGRTMIN}"
        return f"SIG{number}"


def exit_fields(returncode: int) -> dict:
    if returncode < 0:
        return {"exit_code": 128 - returncode, "signal": signal_name(-returncode)}
    return {"exit_code": returncode, "signal": ""}


async def output_events(proc: asyncio.subprocess.Process, stdin_source=None):
    """Yield ``(name, bytes)`` for stdout/stderr as they come; the process is killed on exit."""
    queue: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue(maxsize=16)
    readers = []

    async def pump(name: str, pipe: asyncio.StreamReader) -> None:
        while chunk := await pipe.read(READ_CHUNK):
            await queue.put((name, chunk))  # bounded: a slow client slows the process, not memory
        await queue.put(None)

    for name, pipe in (("stdout", proc.stdout), ("stderr", proc.stderr)):
        if pipe is not None:
            readers.append(asyncio.ensure_future(pump(name, pipe)))
    feeder = asyncio.ensure_future(_feed_stdin(proc, stdin_source)) if stdin_source is not None else None
    try:
        open_pipes = len(readers)
        while open_pipes:
            item = await queue.get()
            if item is None:
                open_pipes -= 1
            else:
                yield item
        await proc.wait()
    finally:
        kill_group(proc)
        for task in [*readers, feeder]:
            if task is not None:
                task.cancel()


async def stream_frames(req: ExecRequest, proc: asyncio.subprocess.Process, stdin_source=None):
    """NDJSON frames: started, stdout/stderr as they appear, then exit with the true code."""
    started = now()
    yield frame("started", pid=proc.pid, started_at=started)
    encoders = {"stdout": _Encoder(req.base64), "stderr": _Encoder(req.base64)}
    encoding = {"encoding": "base64"} if req.base64 else {}  # the SDKs decode only when told
    async for name, chunk in output_events(proc, stdin_source):
        if text := encoders[name](chunk):
            yield frame(name, data=text, **{name: text}, **encoding)
    for name, enc in encoders.items():
        if not req.base64 and (rest := enc(b"", final=True)):
            yield frame(name, data=rest, **{name: rest})
    code = await proc.wait()
    yield frame("exit", pid=proc.pid, started_at=started, ended_at=now(), **exit_fields(code))


async def _feed_stdin(proc: asyncio.subprocess.Process, source) -> None:
    assert proc.stdin is not None
    try:
        async for chunk in source:
            proc.stdin.write(chunk)
            await proc.stdin.drain()
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            proc.stdin.close()


async def run_buffered(req: ExecRequest, proc: asyncio.subprocess.Process, stdin_source=None) -> dict:
    """One ``{stdout, stderr, exit_code}`` (the caller asked for the whole output at once)."""
    started = now()
    out = {"stdout": bytearray(), "stderr": bytearray()}
    async for name, chunk in output_events(proc, stdin_source):
        out[name] += chunk
    code = await proc.wait()
    times = {"pid": proc.pid, "started_at": started, "ended_at": now()}

    def enc(b: bytearray) -> str:
        return base64.b64encode(bytes(b)).decode() if req.base64 else b.decode(errors="replace")

    encoding = {"encoding": "base64"} if req.base64 else {}
    return {"stdout": enc(out["stdout"]), "stderr": enc(out["stderr"]), **exit_fields(code), **times, **encoding}
