"""The daemon's budget of guest frames: how many a second it parses, for all VMs together.

Each VM's channel already pauses reading beyond ``per_vm`` frames a second; alone, that lets N
flooding guests take N times as much of the event loop. Here the daemon-wide ``rate`` is shared
equally among the VMs that sent frames in the last second: each may parse ``min(per_vm, rate /
active)`` a second (its own token bucket, refilled at that rate). So

* N flooders together parse at most ``rate`` frames a second (plus one second's burst each),
  whatever N is: they cost the loop what one flooder did;
* a VM using less than its share is never paused, however many others flood (its share never
  falls below ``rate / active``, and its answers need a few frames, not thousands);
* a lone busy VM still gets ``per_vm``.

Single-threaded (the event loop's); ``clock`` is injectable for tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable

GLOBAL_FRAME_RATE = 20_000  # frames a second for the whole daemon: one flooder's worth
ACTIVE_WINDOW = 1.0  # a VM that sent frames this recently counts as taking a share


class FrameBudget:
    def __init__(self, rate: float, per_vm: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.per_vm = per_vm
        self.clock = clock
        self._seen: dict[Share, float] = {}
        self._active = 1
        self._counted_at = float("-inf")

    def member(self) -> Share:
        """A new VM's share (one per channel)."""
        return Share(self)

    def active(self) -> int:
        return self._active

    def share(self) -> float:
        return min(self.per_vm, self.rate / self._active)

    def _touch(self, member: Share, now: float) -> None:
        fresh = member not in self._seen
        self._seen[member] = now
        if fresh or now - self._counted_at >= ACTIVE_WINDOW / 10:
            self._seen = {m: t for m, t in self._seen.items() if now - t <= ACTIVE_WINDOW}
            self._active = max(1, len(self._seen))
            self._counted_at = now


class Share:
    """One VM's part of a :class:`FrameBudget`: ``spend(n)`` says how many seconds it is in
    debt after ``n`` frames (0: within its share)."""

    def __init__(self, budget: FrameBudget) -> None:
        self.budget = budget
        self.rate = budget.share()
        self.tokens = self.rate
        self.at = budget.clock()

    def spend(self, n: float) -> float:
        now = self.budget.clock()
        self.budget._touch(self, now)
        self.rate = self.budget.share()
        self.tokens = min(self.rate, self.tokens + (now - self.at) * self.rate) - n
        self.at = now
        return max(0.0, -self.tokens / self.rate)
