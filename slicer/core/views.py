"""What the API shows of a VM beyond its record, read from the guest or its run directory: its
background execs (the guest's word, checked like input) and the tail of its console log."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from pathlib import Path

from slicer.core.error_codes import ErrorCode
from slicer.core.errors import NotFound, SlicerError
from slicer.core.node import Node


async def bg_execs(node: Node) -> list[dict] | None:
    """The agent's background execs in the SDK's summary shape; None if it cannot say."""
    try:
        found = await asyncio.wait_for(node.running_agent().list_execs(timeout=2), 3)
    except (SlicerError, TimeoutError):
        return None
    if not isinstance(found, list):  # the guest's word: checked like input
        return None
    return [{"exec_id": str(e.get("exec_id", "")), "command": str(e.get("command", "")),
             "pid": e["pid"] if isinstance(e.get("pid"), int) else 0,
             "state": "running" if e.get("running") else "exited",
             **({"started_at": e["started_at"]} if isinstance(e.get("started_at"), str) else {}),
             **({"exit_code": e["exit_code"]} if isinstance(e.get("exit_code"), int) else {})}
            for e in found[:1000] if isinstance(e, dict)]


def console_tail(log_file: Path, hostname: str, lines: int) -> str:
    """The last ``lines`` lines (0: all) of a console log and its one rotated file before it."""
    parts = [log_file.with_name(log_file.name + ".1"), log_file]
    if not any(p.exists() for p in parts):
        raise NotFound(f"no console log for {hostname} yet", ErrorCode.LOG_NOT_FOUND)
    tail: deque[str] = deque(maxlen=lines or None)
    for part in parts:
        with contextlib.suppress(FileNotFoundError), open(part, errors="replace", newline="") as f:
            for line in f:
                tail.append(line)
    return "".join(tail)
