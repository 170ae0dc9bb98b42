"""What every group's backend shares with the others: the daemon's names, its bridge ledger,
the uid passt runs as, and the helper processes (passt) it keeps until they end."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from slicer.net.ledger import BridgeLedger
from slicer.net.names import Names


class HelperProcesses:
    """Keeps each helper process referenced until it ends (asyncio would warn of it otherwise)."""

    def __init__(self) -> None:
        self.running: set[asyncio.subprocess.Process] = set()

    def track(self, proc: asyncio.subprocess.Process) -> None:
        self.running.add(proc)
        asyncio.get_running_loop().create_task(proc.wait()).add_done_callback(lambda _: self.running.discard(proc))

    def terminate(self) -> None:
        for proc in list(self.running):
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()


@dataclass
class NetContext:
    names: Names
    ledger: BridgeLedger
    helper_uid: int | None = None  # passt's uid, when the daemon can filter its connections
    helpers: HelperProcesses = field(default_factory=HelperProcesses)
