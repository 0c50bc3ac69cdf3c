"""Late arrivals: a request that comes while a batch runs starts at once, beside it.

The real default model in process, driven by the real scheduler; the order of events is
recorded by the sinks (no timing)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgeagent.engine import Delta, Engine, Finish, Sampling
from edgeagent.planner import ModelMeta, plan
from edgeagent.probe import probe
from edgeagent.scheduler import Item, Job, Scheduler, Sink
from edgeagent.settings import LimitsSettings, RuntimeSettings, Settings

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def engine(default_model: Path) -> Engine:
    the_plan = plan(probe(), ModelMeta.from_folder(default_model),
                    RuntimeSettings(context_length=1024, max_batch=4), LimitsSettings())
    return Engine(default_model, the_plan)


class Timeline:
    """What happened, in order: (job name, "first" | "finish"); events wait on it."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.items: dict[str, list[Item]] = {}
        self.changed = threading.Condition()

    def sink(self, name: str) -> Sink:
        self.items[name] = []

        def record(item: Item) -> None:
            with self.changed:
                self.items[name].append(item)
                if isinstance(item, Delta) and len(self.items[name]) == 1:
                    self.events.append((name, "first"))
                elif not isinstance(item, Delta):
                    self.events.append((name, "finish"))
                self.changed.notify_all()
        return record

    def wait_for(self, event: tuple[str, str], timeout: float = 120.0) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: event in self.events, timeout), self.events


def job(engine: Engine, text: str, max_tokens: int, sink: Sink) -> Job:
    tokens = engine.chat_tokens([{"role": "user", "content": text}])
    return Job(np.asarray(tokens), Sampling(max_tokens=max_tokens, ignore_eos=True), sink,
               deadline=time.monotonic() + 300)


def test_a_late_request_gets_its_first_token_before_the_running_one_ends(
        engine: Engine) -> None:
    scheduler = Scheduler(engine, engine.plan, Settings())
    scheduler.start()
    timeline = Timeline()
    try:
        scheduler.submit(job(engine, "Tell me a long story about a lighthouse.", 300,
                             timeline.sink("long")))
        timeline.wait_for(("long", "first"))  # the long one's batch is running
        scheduler.submit(job(engine, "Say hello.", 4, timeline.sink("late")))
        timeline.wait_for(("long", "finish"))
        timeline.wait_for(("late", "finish"))
    finally:
        scheduler.stop()
    order = timeline.events
    assert order.index(("late", "first")) < order.index(("long", "finish")), order
    # Both ran to their length, nothing lost.
    for name, n in (("long", 300), ("late", 4)):
        fin = timeline.items[name][-1]
        assert isinstance(fin, Finish) and (fin.reason, fin.completion_tokens) == ("length", n)
