"""The Retry-After estimate, over a clock the test moves (no model, no daemon)."""

from __future__ import annotations

from edgeagent.backpressure import RETRY_AFTER_MAX_S, DrainRate


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_refused_clients_are_spread_out_behind_each_other() -> None:
    clock = Clock()
    rate = DrainRate(clock)
    for _ in range(4):  # four sequences finished in the last 2 s: 2 per second
        rate.finished(submitted=clock.now - 2.0)
    # One waits in the queue; each refusal counts those told to come back before it.
    assert [rate.retry_after(waiting=1) for _ in range(4)] == [1, 2, 2, 3]
    clock.now += 3.0  # they are all due: nobody is ahead any more
    for _ in range(6):  # and the drain went on at 2 per second
        rate.finished(submitted=clock.now - 5.0)
    assert rate.retry_after(waiting=1) == 1


def test_an_idle_spell_does_not_dilute_the_rate_of_a_burst() -> None:
    clock = Clock()
    rate = DrainRate(clock)
    rate.finished(submitted=clock.now - 0.5)  # a burst after an idle hour: 0.5 s a job
    assert rate.retry_after(waiting=3) == 2


def test_unmeasured_and_capped() -> None:
    clock = Clock()
    rate = DrainRate(clock)
    assert rate.retry_after(waiting=0) == 1  # nothing finished yet: 1 s a sequence
    assert rate.retry_after(waiting=1000) == RETRY_AFTER_MAX_S
