"""The scheduler's failure paths in process, over the harness's fake engine: no model, no
subprocess, milliseconds (the fast lane)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

import numpy as np
import pytest

from edgeagent.engine import Engine, Finish, Sampling
from edgeagent.scheduler import Job, JobError, QueueFull, Scheduler, bursty
from edgeagent.settings import Settings
from edgeagent.testing.fake_engine import FAIL, Collector, FakeEngine


def job(max_tokens: int = 3, guidance: tuple[str, str] | None = None
        ) -> tuple[Job, Collector]:
    out = Collector()
    return Job(np.arange(10, 20, dtype=np.int32), Sampling(max_tokens=max_tokens), out.sink,
               deadline=float("inf"), guidance=guidance), out


@pytest.fixture
def fake() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def sched(fake: FakeEngine) -> Iterator[Scheduler]:
    s = Scheduler(cast(Engine, fake), fake.plan, Settings())
    yield s
    fake.gate.set()
    s.stop()


def _held_in_a_step(fake: FakeEngine, sched: Scheduler, j: Job) -> None:
    """Submit ``j`` and return once the scheduler is inside a step that holds it."""
    fake.gate.clear()
    sched.submit(j)
    sched.start()
    assert fake.stepping.wait(30)


def test_a_cancel_mid_generation_finishes_cancelled_and_frees_the_slot(
        fake: FakeEngine, sched: Scheduler) -> None:
    j, out = job(max_tokens=1000)
    _held_in_a_step(fake, sched, j)
    sched.cancel(j)
    fake.gate.set()
    fin = out.final()
    assert isinstance(fin, Finish) and fin.reason == "cancelled", fin
    assert fin.completion_tokens < 1000
    assert sched.active == 0 and fake.active == 0
    assert sched.stats.cancelled == 1


def test_a_deadline_passed_mid_generation_is_a_408(fake: FakeEngine, sched: Scheduler) -> None:
    j, out = job(max_tokens=1000)
    _held_in_a_step(fake, sched, j)
    j.deadline = 0.0  # passed while the step ran
    fake.gate.set()
    failed = out.final()
    assert isinstance(failed, JobError) and failed.status == 408, failed
    assert sched.active == 0 and fake.active == 0
    assert sched.stats.errors["timeout"] == 1


def test_a_failing_step_fails_its_jobs_and_the_next_job_is_served(
        fake: FakeEngine, sched: Scheduler) -> None:
    bad, bad_out = job(guidance=FAIL)
    sched.submit(bad)
    sched.start()
    failed = bad_out.final()
    assert isinstance(failed, JobError) and failed.status == 500, failed
    assert "failed a step" in failed.message
    good, good_out = job()
    sched.submit(good)
    fin = good_out.final()
    assert isinstance(fin, Finish) and fin.reason == "length" and fin.completion_tokens == 3
    assert sched.active == 0


def test_a_full_queue_refuses_with_429_and_keeps_what_it_holds(fake: FakeEngine) -> None:
    sched = Scheduler(cast(Engine, fake), fake.plan,
                      Settings.model_validate({"limits": {"max_queue": 1}}))
    kept, kept_out = job()
    sched.submit(kept)  # not started: it stays queued
    with pytest.raises(QueueFull) as err:
        sched.submit(job()[0])
    assert err.value.status == 429
    assert sched.stats.rejected["queue_full"] == 1
    sched.start()
    try:
        fin = kept_out.final()
        assert isinstance(fin, Finish) and fin.completion_tokens == 3
    finally:
        sched.stop()


def test_the_batch_window_applies_only_to_requests_that_come_in_bursts() -> None:
    window = 0.1
    # Clients fired together: most requests within the window of the one before.
    assert bursty([0.0, 0.01, 0.03, 2.0, 2.02, 2.05], window)
    # Clients acting apart (random gaps of hundreds of ms): one in five is close.
    assert not bursty([0.0, 0.4, 0.45, 1.1, 1.6, 2.3], window)
    # One request, or none, says nothing about bursts: start at once.
    assert not bursty([5.0], window)
    assert not bursty([], window)
