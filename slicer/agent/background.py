"""Background execs: detached processes whose output lives in a bounded ring of frames.

Each process has its own ring (1 MiB by default); all rings together stay within an
agent-wide budget, and a start that would exceed it is refused (503). Readers replay the ring
from any frame id; when what they ask for was evicted they get a ``gap`` frame first.
After ``DELETE`` an exec is reaped: its ring is freed and every later call answers 410.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import secrets
import signal
from collections import deque
from dataclasses import dataclass, field

from slicer.agent.execute import ExecError, ExecRequest, exit_fields, frame, now, output_events

DEFAULT_RING = 1 << 20
AGENT_BUDGET = 64 << 20
SIGNALS = {"TERM": signal.SIGTERM, "KILL": signal.SIGKILL, "INT": signal.SIGINT, "HUP": signal.SIGHUP,
           "QUIT": signal.SIGQUIT, "USR1": signal.SIGUSR1, "USR2": signal.SIGUSR2}


@dataclass
class Entry:
    exec_id: str
    req: ExecRequest
    proc: asyncio.subprocess.Process
    ring_bytes: int
    started_at: str = field(default_factory=now)
    ring: deque = field(default_factory=deque)  # (id, size, frame dict)
    held: int = 0
    next_id: int = 1
    bytes_written: int = 0
    bytes_dropped: int = 0
    frames_dropped: int = 0
    ended_at: str | None = None
    exit: dict = field(default_factory=dict)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def running(self) -> bool:
        return not self.ended_at

    def info(self) -> dict:
        return {
            "exec_id": self.exec_id, "pid": self.proc.pid, "command": self.req.cmd, "args": self.req.args,
            "cwd": self.req.cwd or "", "uid": self.req.uid, "started_at": self.started_at,
            "running": self.running, "exit_code": self.exit.get("exit_code"), "signal": self.exit.get("signal", ""),
            "ended_at": self.ended_at, "bytes_written": self.bytes_written, "bytes_dropped": self.bytes_dropped,
            "next_id": self.next_id, "ring_bytes": self.ring_bytes,
        }

    async def append(self, ftype: str, **fields) -> None:
        data = fields.get("raw", b"")
        f = {"type": ftype, "id": self.next_id, "timestamp": now(), **fields}
        self.ring.append((self.next_id, len(data), f))
        self.next_id += 1
        self.held += len(data)
        self.bytes_written += len(data)
        while self.held > self.ring_bytes and len(self.ring) > 1:
            _, size, _ = self.ring.popleft()
            self.held -= size
            self.bytes_dropped += size
            self.frames_dropped += 1
        async with self.changed:
            self.changed.notify_all()


class _Utf8Cut:
    """Output bytes cut where a UTF-8 character ends, so that each piece decodes alone to the
    text an incremental decoder gives (the rest waits for the next chunk, or the end)."""

    def __init__(self) -> None:
        self.carry = b""

    def __call__(self, data: bytes, final: bool = False) -> bytes:
        buf = self.carry + data
        cut = len(buf) if final else _utf8_end(buf)
        self.carry = buf[cut:]
        return buf[:cut]


def _utf8_end(buf: bytes) -> int:
    """Where the last complete UTF-8 character of ``buf`` ends (its length if none is cut)."""
    for back in range(1, min(4, len(buf)) + 1):
        b = buf[-back]
        if b & 0xC0 != 0x80:  # a lead byte (or ASCII): how long is its character?
            need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4 if b & 0xF8 == 0xF0 else 1
            return len(buf) - back if need > back else len(buf)
    return len(buf)


class Registry:
    def __init__(self, budget: int = AGENT_BUDGET) -> None:
        self.budget = budget
        self.entries: dict[str, Entry] = {}
        self.reaped: set[str] = set()

    @property
    def reserved(self) -> int:
        return sum(e.ring_bytes for e in self.entries.values())

    def get(self, exec_id: str) -> Entry:
        if exec_id in self.reaped:
            raise ExecError(f"exec {exec_id} was reaped", "gone", 410)
        entry = self.entries.get(exec_id)
        if entry is None:
            raise ExecError(f"no exec {exec_id}", "not_found", 404)
        return entry

    def check_budget(self, ring_bytes: int) -> int:
        ring_bytes = ring_bytes or DEFAULT_RING
        if ring_bytes > self.budget:
            raise ExecError(f"ring_bytes {ring_bytes} exceeds the agent budget {self.budget}", "invalid_request")
        if self.reserved + ring_bytes > self.budget:
            raise ExecError("background exec buffer budget exhausted; reap finished execs", "budget_exhausted", 503)
        return ring_bytes

    def start(self, req: ExecRequest, proc: asyncio.subprocess.Process, ring_bytes: int) -> Entry:
        entry = Entry("ex_" + secrets.token_hex(8), req, proc, ring_bytes)  # Slicer's ids look like ex_…
        self.entries[entry.exec_id] = entry
        asyncio.ensure_future(self._collect(entry))
        return entry

    async def _collect(self, entry: Entry) -> None:
        # The ring keeps bytes, cut at UTF-8 boundaries: a reader may ask for text or base64.
        cutters = {"stdout": _Utf8Cut(), "stderr": _Utf8Cut()}
        await entry.append("started", pid=entry.proc.pid, started_at=entry.started_at)
        async for name, chunk in output_events(entry.proc):
            if raw := cutters[name](chunk):
                await entry.append(name, raw=raw)
        for name, cut in cutters.items():
            if raw := cut(b"", final=True):
                await entry.append(name, raw=raw)
        code = await entry.proc.wait()
        entry.ended_at = now()
        entry.exit = exit_fields(code)
        await entry.append("exit", ended_at=entry.ended_at, **entry.exit)

    async def frames(self, entry: Entry, from_id: int, follow: bool, b64: bool | None = None):
        """NDJSON lines from ``from_id`` on; a gap frame first if some were evicted. Output in
        base64 or as text as ``b64`` says (None: as the exec was started)."""
        b64 = entry.req.base64 if b64 is None else b64
        cursor = from_id or 1
        while True:
            oldest = entry.ring[0][0] if entry.ring else entry.next_id
            if cursor < oldest:
                yield frame("gap", dropped_frames=oldest - cursor,
                            dropped_bytes=entry.bytes_dropped, id=cursor,
                            message=f"{oldest - cursor} frames were evicted from the ring")
                cursor = oldest
            for fid, _, f in list(entry.ring):
                if fid >= cursor:
                    fields = {k: v for k, v in f.items() if k not in ("type", "raw")}
                    if f["type"] in ("stdout", "stderr"):
                        raw = f["raw"]
                        data = base64.b64encode(raw).decode() if b64 else raw.decode("utf-8", "replace")
                        fields.update(data=data, **({"encoding": "base64"} if b64 else {}))
                        fields[f["type"]] = data  # the seed's field beside the typed one
                    yield frame(f["type"], **fields)
                    cursor = fid + 1
            if not follow or not entry.running and cursor >= entry.next_id:
                return
            async with entry.changed:
                if cursor >= entry.next_id:
                    await entry.changed.wait()

    async def kill(self, entry: Entry, sig_name: str, grace_ms: int) -> dict:
        sig = SIGNALS.get(sig_name.upper().removeprefix("SIG"))
        if sig is None:
            raise ExecError(f"unknown signal {sig_name!r}", "invalid_request")
        if entry.running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(entry.proc.pid, sig)
            if sig == signal.SIGTERM:
                asyncio.ensure_future(self._escalate(entry, grace_ms / 1000))
        return {"exec_id": entry.exec_id, "pid": entry.proc.pid, "running": entry.running,
                "signal_sent": sig.name.removeprefix("SIG")}

    async def _escalate(self, entry: Entry, grace: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(entry.proc.wait(), grace)
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(entry.proc.pid, signal.SIGKILL)

    async def wait_exit(self, entry: Entry, timeout: float) -> dict:
        timed_out = False
        if entry.running:
            try:
                async with entry.changed:
                    await asyncio.wait_for(entry.changed.wait_for(lambda: not entry.running), timeout)
            except TimeoutError:
                timed_out = True
        return {"exec_id": entry.exec_id, "running": entry.running, "exit_code": entry.exit.get("exit_code"),
                "signal": entry.exit.get("signal", ""), "ended_at": entry.ended_at, "timed_out": timed_out}

    def reap(self, entry: Entry) -> dict:
        del self.entries[entry.exec_id]
        self.reaped.add(entry.exec_id)
        entry.ring.clear()
        return {"exec_id": entry.exec_id, "reaped": True}
