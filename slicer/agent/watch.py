"""``fs/watch``: filesystem events as Server-Sent Events, from Debian's ``inotifywait``."""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import os
from datetime import UTC, datetime

from slicer.agent import paths

KINDS = ("create", "write", "remove", "rename", "chmod")
INOTIFY = {
    "CREATE": "create", "MODIFY": "write", "CLOSE_WRITE": "write", "DELETE": "remove", "DELETE_SELF": "remove",
    "MOVED_FROM": "rename", "MOVED_TO": "rename", "MOVE_SELF": "rename", "ATTRIB": "chmod",
}
HEARTBEAT = 15.0


class WatchError(Exception):
    def __init__(self, message: str, code: str = "invalid_request", status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


def parse_go_duration(value: str | None, default: float | None) -> float | None:
    if not value:
        return default
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    total, number = 0.0, ""
    i = 0
    while i < len(value):
        c = value[i]
        if c.isdigit() or c == ".":
            number += c
            i += 1
            continue
        unit = "ms" if value.startswith("ms", i) else c
        if unit not in units or not number:
            raise WatchError(f"not a duration: {value!r} (try 200ms or 30s)")
        total += float(number) * units[unit]
        number = ""
        i += len(unit)
    if number:
        raise WatchError(f"not a duration: {value!r} (a unit is needed: ms, s, m, h)")
    return total


class Watch:
    def __init__(self, query) -> None:
        self.paths = [os.path.normpath(p) for p in query.getall("paths", [])]
        if not self.paths:
            raise WatchError("paths is required (repeat it for several)")
        for p in self.paths:
            if not p.startswith("/"):
                raise WatchError(f"path must be absolute: {p!r}")
        self.patterns = list(query.getall("patterns", []))
        kinds = {k for k in query.getall("events", []) if k}
        if kinds - {*KINDS, "all"}:
            raise WatchError(f"unknown events {sorted(kinds - {*KINDS, 'all'})}; use {', '.join(KINDS)} or all")
        self.kinds = set(KINDS) if not kinds or "all" in kinds else kinds
        self.recursive = query.get("recursive", "").lower() in ("1", "true", "yes")
        self.one_shot = query.get("one_shot", "").lower() in ("1", "true", "yes")
        self.debounce = parse_go_duration(query.get("debounce"), 0.2) or 0.0
        self.timeout = parse_go_duration(query.get("timeout"), None)
        max_events = query.get("max_events") or "0"
        if not max_events.isdigit():
            raise WatchError("max_events must be a number")
        self.max_events = 1 if self.one_shot else int(max_events)

    def open(self) -> None:
        """Reach every path under the agent's rule (slicer.agent.paths) and hold it: inotifywait
        watches what these descriptors are (``/proc/self/fd/N``), not what the names are by then."""
        self.fds: list[int] = []
        self.reported: list[tuple[str, str]] = []
        try:
            for p in self.paths:
                self.fds.append(paths.open_at(p, os.O_PATH))
                self.reported.append((f"/proc/self/fd/{self.fds[-1]}", p))
        except paths.FileError as e:
            self.close()
            raise WatchError(str(e), e.code, e.status) from None
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def real_path(self, reported: str) -> str:
        """The watched path's own name for what inotifywait reports under ``/proc/self/fd/N``."""
        for prefix, p in self.reported:
            if reported == prefix or reported.startswith(prefix + "/"):
                return p.rstrip("/") + reported[len(prefix):] if p != "/" else reported[len(prefix):] or "/"
        return reported

    def matches(self, path: str) -> bool:
        if not self.patterns:
            return True
        return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(os.path.basename(path), p) for p in self.patterns)

    async def events(self):
        """SSE text blocks: events as they happen, heartbeat comments while idle."""
        cmd = ["inotifywait", "-m", "-q", "--format", "%e\t%w%f",
               "-e", "create", "-e", "modify", "-e", "close_write", "-e", "delete", "-e", "delete_self",
               "-e", "move", "-e", "move_self", "-e", "attrib"]
        if self.recursive:
            cmd += ["-r", "-P"]  # -P: a directory swapped for a link mid-walk is not followed
        try:
            proc = await asyncio.create_subprocess_exec(*cmd, "--", *(prefix for prefix, _ in self.reported),
                                                        stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.DEVNULL, pass_fds=self.fds)
        finally:
            self.close()  # inotifywait holds its copies until its watches are set
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout if self.timeout else None
        last: dict[tuple[str, str], float] = {}
        sent = 0
        try:
            yield ": watching\n\n"
            while True:
                wait = HEARTBEAT if deadline is None else min(HEARTBEAT, deadline - loop.time())
                if wait <= 0:
                    return
                try:
                    line = await asyncio.wait_for(proc.stdout.readline(), wait)
                except TimeoutError:
                    yield ":\n\n"
                    continue
                if not line:
                    return
                flags, _, path = line.decode(errors="replace").rstrip("\n").partition("\t")
                path = self.real_path(path)
                names = flags.split(",")
                kind = next((INOTIFY[n] for n in names if n in INOTIFY), None)
                if kind not in self.kinds or not self.matches(path):
                    continue
                now = loop.time()
                if now - last.get((kind, path), -1e9) < self.debounce:
                    continue  # coalesce a burst per type and path
                last[(kind, path)] = now
                sent += 1
                event = {"id": sent, "type": kind, "path": path, "timestamp": datetime.now(UTC).isoformat(),
                         "isDir": "ISDIR" in names}
                with contextlib.suppress(OSError, paths.FileError):
                    if (st := paths.lstat(path, follow=False)) is not None:
                        event["size"] = st.st_size
                yield f"id: {sent}\nevent: watch\ndata: {json.dumps(event)}\n\n"
                if self.max_events and sent >= self.max_events:
                    return
        finally:
            self.close()
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
