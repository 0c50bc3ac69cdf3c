"""n > 1 in the scheduler, in process over the harness's fake engine (the fast lane): a job
of n choices runs n rows together, counts n against the capacity and the queue, gets one
error, and each row's seed is derived from the request's."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import cast

import numpy as np
import pytest

from edgeagent.engine import Engine, Finish, Sampling
from edgeagent.scheduler import (
    AdmissionError,
    Item,
    Job,
    JobError,
    QueueFull,
    Scheduler,
    row_sampling,
)
from edgeagent.settings import LimitsSettings, Settings
from edgeagent.testing.fake_engine import FAIL, FakeEngine


class Choices:
    """A sink that waits for the ends of all ``n`` choices (or one error)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.items: list[Item] = []
        self.done = threading.Event()

    def sink(self, item: Item) -> None:
        self.items.append(item)
        ends = [i for i in self.items if isinstance(i, Finish)]
        if isinstance(item, JobError) or len(ends) == self.n:
            self.done.set()

    def wait(self) -> list[Item]:
        assert self.done.wait(30), self.items
        return self.items


def job(n: int, max_tokens: int = 1000, guidance: tuple[str, str] | None = None
        ) -> tuple[Job, Choices]:
    out = Choices(n)
    return Job(np.arange(10, 20, dtype=np.int32), Sampling(max_tokens=max_tokens), out.sink,
               deadline=float("inf"), guidance=guidance, n=n), out


@pytest.fixture
def fake() -> FakeEngine:
    return FakeEngine()  # capacity 4


def scheduler(fake: FakeEngine, max_queue: int = 32) -> Scheduler:
    return Scheduler(cast(Engine, fake), fake.plan,
                     Settings(limits=LimitsSettings(max_queue=max_queue)))


@pytest.fixture
def sched(fake: FakeEngine) -> Iterator[Scheduler]:
    s = scheduler(fake)
    yield s
    fake.gate.set()
    s.stop()


def one_step(fake: FakeEngine) -> None:
    """Let the step the scheduler waits in go, and return once it waits in the next one
    (the loop has admitted from the queue in between)."""
    fake.stepping.clear()
    fake.gate.set()
    fake.gate.clear()
    assert fake.stepping.wait(30)


def test_n_rows_run_together_and_count_against_the_capacity(fake: FakeEngine,
                                                            sched: Scheduler) -> None:
    a, a_out = job(3)
    fake.gate.clear()
    sched.submit(a)
    sched.start()
    assert fake.stepping.wait(30)
    assert fake.active == 3 and sched.active == 3
    b, b_out = job(2)
    sched.submit(b)
    one_step(fake)
    assert fake.active == 3 and sched.queue_depth == 1  # 3 + 2 rows exceed 4
    sched.cancel(a)
    one_step(fake)  # a's rows end cancelled
    one_step(fake)  # b starts
    assert fake.active == 2
    ends = [i for i in a_out.wait() if isinstance(i, Finish)]
    assert sorted(f.index for f in ends) == [0, 1, 2]
    assert {f.reason for f in ends} == {"cancelled"}
    fake.gate.set()
    sched.cancel(b)
    assert sorted(i.index for i in b_out.wait() if isinstance(i, Finish)) == [0, 1]


def test_n_counts_against_the_queue(fake: FakeEngine) -> None:
    s = scheduler(fake, max_queue=4)  # not started: submitted jobs stay queued
    s.submit(job(3)[0])
    with pytest.raises(QueueFull):
        s.submit(job(2)[0])
    s.submit(job(1)[0])
    with pytest.raises(AdmissionError) as err:
        scheduler(fake).submit(job(fake.capacity + 1)[0])
    assert err.value.param == "n" and err.value.status == 400


def test_a_failed_step_gives_one_error_for_all_the_rows(fake: FakeEngine,
                                                        sched: Scheduler) -> None:
    j, out = job(3, guidance=FAIL)
    sched.submit(j)
    sched.start()
    items = out.wait()
    assert [type(i) for i in items] == [JobError]
    assert sched.active == 0


def test_each_row_has_its_own_seed_derived_from_the_request() -> None:
    seeded = Sampling(seed=42)
    assert row_sampling(seeded, 0) is seeded  # n = 1 reproduces as before
    seeds = [row_sampling(seeded, i).seed for i in range(1, 4)]
    assert len(set(seeds)) == 3 and 42 not in seeds
    assert seeds == [row_sampling(Sampling(seed=42), i).seed for i in range(1, 4)]
    assert all(0 <= s < 2**63 for s in seeds if s is not None)
    assert row_sampling(Sampling(), 2).seed is None  # no seed: each row draws its own
