"""The daemon-wide frame budget (``slicer.channel.budget``): fairness properties on a simulated
clock, so they hold exactly (no timing)."""

from __future__ import annotations

import pytest

from slicer.channel import host
from slicer.channel.budget import FrameBudget


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def simulate(budget: FrameBudget, clock: Clock, heavy: int, light: int, seconds: float, step: float = 0.01,
             light_rate: float = 50) -> tuple[list[float], list[float], list[float]]:
    """``heavy`` members sending as fast as they are let (a chunk whenever not paused) and
    ``light`` ones sending ``light_rate`` frames a second; returns frames each parsed, and the
    longest pause each light member was given."""
    members = [budget.member() for _ in range(heavy + light)]
    paused_until = [0.0] * len(members)
    parsed = [0.0] * len(members)
    worst = [0.0] * light
    end = clock.now + seconds
    while clock.now < end:
        for i, m in enumerate(members):
            if clock.now < paused_until[i]:
                continue
            n = 2000 if i < heavy else light_rate * step  # a flooder's read is a chunk of frames
            debt = m.spend(n)
            parsed[i] += n
            paused_until[i] = clock.now + debt
            if i >= heavy:
                worst[i - heavy] = max(worst[i - heavy], debt)
        clock.now += step
    return parsed[:heavy], parsed[heavy:], worst


@pytest.mark.parametrize("flooders", [1, 2, 4, 8])
def test_flooders_together_get_the_global_rate_and_share_it_equally(flooders):
    clock = Clock()
    budget = FrameBudget(20_000, 20_000, clock)
    seconds = 20
    heavy, light, worst = simulate(budget, clock, flooders, 1, seconds)
    burst = (flooders + 1) * 20_000  # each starts with at most one second's worth
    assert sum(heavy) <= 20_000 * seconds + burst + 2000 * flooders
    assert sum(heavy) >= 0.9 * 20_000 * seconds * flooders / (flooders + 1)  # none of it wasted on the idle
    assert max(heavy) - min(heavy) <= 20_000 + 2000  # equal shares, to a burst
    assert worst == [0.0], "a VM under its share is never paused, however many flood"
    assert light[0] == pytest.approx(50 * seconds, rel=0.02)


def test_a_lone_vm_keeps_its_own_rate_and_a_departed_one_frees_its_share():
    clock = Clock()
    budget = FrameBudget(20_000, 20_000, clock)
    heavy, _, _ = simulate(budget, clock, 1, 0, 10)
    assert heavy[0] == pytest.approx(20_000 * 11, rel=0.05)  # 10 s at 20 000, plus the first second's burst
    others = [budget.member() for _ in range(3)]
    for m in others:
        m.spend(1)
    assert budget.active() == 4 and budget.share() == 5000
    clock.now += 2  # they stopped sending: gone from the count at the next recount
    budget.member().spend(1)
    assert budget.active() == 1 and budget.share() == 20_000


def test_the_daemon_shares_one_budget_between_channels():
    a, b = host.Channel("/nonexistent/a"), host.Channel("/nonexistent/b")
    assert a._frames.budget is b._frames.budget is host.FRAMES
    assert host.FRAMES.rate == 20_000 and host.FRAMES.per_vm == host.FRAME_RATE
