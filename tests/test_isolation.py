"""One bad request cannot hurt the others, and a wedged engine is not healthy (issue 10).

In process: the real scheduler over the real engine, or over a fake engine (no model) that
loses a sequence or blocks a step on demand. End to end: the daemon as a subprocess.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, cast

import httpx
import numpy as np
import pytest

from edgeagent.daemon import Daemon
from edgeagent.engine import Engine, Finish, Sampling
from edgeagent.planner import ModelMeta, Plan, plan
from edgeagent.probe import probe
from edgeagent.scheduler import Job, JobError, Scheduler
from edgeagent.settings import LimitsSettings, RuntimeSettings, Settings
from edgeagent.testing.fake_engine import LOSE, Collector, FakeEngine
from tests.conftest import DaemonProc

pytestmark = pytest.mark.model

HICCUP = ("json_schema", '{"type": "hiccup"}')


@pytest.fixture(scope="module")
def the_plan(default_model: Path) -> Plan:
    return plan(probe(), ModelMeta.from_folder(default_model),
                RuntimeSettings(context_length=1024), LimitsSettings())


@pytest.fixture(scope="module")
def engine(default_model: Path, the_plan: Plan) -> Engine:
    return Engine(default_model, the_plan)




def _job(sampling: Sampling, guidance: tuple[str, str] | None = None,
         prompt: np.ndarray | None = None) -> tuple[Job, Collector]:
    out = Collector()
    tokens = prompt if prompt is not None else np.arange(10, 30, dtype=np.int32)
    return Job(tokens, sampling, out.sink, deadline=float("inf"), guidance=guidance), out


def _scheduler(engine: Engine | FakeEngine, the_plan: Plan,
               settings: Settings | None = None) -> Scheduler:
    return Scheduler(cast(Engine, engine), the_plan, settings or Settings())


def test_a_refused_grammar_fails_only_its_own_job(engine: Engine) -> None:
    """A grammar onnxruntime-genai refuses, queued first with good jobs (past admission):
    it gets a 500 with the reason, every other job its answer, and no slot leaks."""
    sched = _scheduler(engine, engine.plan)
    prompt = engine.encode(engine.chat_prompt([{"role": "user", "content": "Hi."}]))
    bad, bad_out = _job(Sampling(max_tokens=4), HICCUP, prompt)
    good = [_job(Sampling(max_tokens=4, ignore_eos=True), prompt=prompt) for _ in range(3)]
    for job in [bad] + [j for j, _ in good]:
        sched.submit(job)  # before the loop starts: admitted together
    sched.start()
    try:
        failed = bad_out.final()
        assert isinstance(failed, JobError), failed
        assert failed.status == 500
        assert "hiccup" in failed.message
        for _, out in good:
            fin = out.final()
            assert isinstance(fin, Finish) and fin.reason == "length", fin
        assert sched.active == 0
        assert engine.active == 0
    finally:
        sched.stop()


def test_a_job_the_engine_loses_is_failed_and_frees_its_slot(the_plan: Plan) -> None:
    fake = FakeEngine(the_plan)
    sched = _scheduler(fake, the_plan)
    lost, lost_out = _job(Sampling(max_tokens=3), LOSE)
    good, good_out = _job(Sampling(max_tokens=3))
    sched.submit(lost)
    sched.submit(good)
    sched.start()
    try:
        failed = lost_out.final(30)
        assert isinstance(failed, JobError) and failed.status == 500, failed
        fin = good_out.final(30)
        assert isinstance(fin, Finish) and fin.completion_tokens == 3, fin
        assert sched.active == 0
    finally:
        sched.stop()


def test_healthy_needs_recent_scheduler_progress(the_plan: Plan) -> None:
    """The watchdog's condition: a scheduler thread alive but wedged in a step is not
    healthy; once the step returns it is again."""
    fake = FakeEngine(the_plan)
    daemon = Daemon(Settings(stall_timeout_s=30))
    sched = daemon.scheduler = _scheduler(fake, the_plan, daemon.settings)
    daemon.serving.serve(sched, the_plan, None)
    sched.start()
    try:
        assert daemon.healthy()
        fake.gate.clear()
        job, out = _job(Sampling(max_tokens=1))
        sched.submit(job)
        assert fake.stepping.wait(30)  # the scheduler is inside a step that does not end
        wedged_since = sched.last_progress
        assert sched.alive
        assert daemon.healthy(now=wedged_since + 29)
        assert not daemon.healthy(now=wedged_since + 30)
        fake.gate.set()
        assert isinstance(out.final(30), Finish)
        assert sched.last_progress > wedged_since
        assert daemon.healthy()
    finally:
        fake.gate.set()
        sched.stop()


def _post(d: DaemonProc, body: dict[str, Any]) -> httpx.Response:
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(d.socket_path)),
                      base_url="http://localhost", timeout=120) as client:
        return client.post("/v1/chat/completions", json=body)


def test_bad_schemas_are_400s_next_to_good_requests(start_daemon: Any) -> None:
    """Over the socket, at once: refused grammars are 400s naming their field; the good
    requests (one with a top_k far above the vocabulary) are answered."""
    d: DaemonProc = start_daemon(extra_toml="[runtime]\ncontext_length = 1024\n")
    d.wait_ready()
    ask = [{"role": "user", "content": "Give me a JSON object."}]
    bodies = {
        "bad_format": {"messages": ask, "max_tokens": 8,
                       "response_format": {"type": "json_schema",
                                           "json_schema": {"schema": {"type": "hiccup"}}}},
        "bad_tools": {"messages": ask, "max_tokens": 8, "tools": [
            {"type": "function", "function": {"name": "f", "parameters": {
                "type": "object", "properties": {"x": {"type": "hiccup"}}}}}]},
        "good": {"messages": ask, "max_tokens": 8},
        "good_huge_top_k": {"messages": ask, "max_tokens": 8, "temperature": 1.0,
                            "top_k": 10**12, "response_format": {"type": "json_object"}},
    }
    start = threading.Barrier(len(bodies))
    replies: dict[str, httpx.Response] = {}

    def send(name: str) -> None:
        start.wait(30)
        replies[name] = _post(d, bodies[name])

    workers = [threading.Thread(target=send, args=(name,)) for name in bodies]
    for w in workers:
        w.start()
    for w in workers:
        w.join(180)
    for name, field in (("bad_format", "response_format"), ("bad_tools", "tools")):
        assert replies[name].status_code == 400, replies[name].text
        error = replies[name].json()["error"]
        assert error["param"].split(".")[0] == field, error  # where in it, after the field
        assert "hiccup" in error["message"]
    for name in ("good", "good_huge_top_k"):
        assert replies[name].status_code == 200, replies[name].text
    assert _post(d, bodies["good"]).status_code == 200  # still serving
    assert d.stop() == 0
