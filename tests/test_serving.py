"""The serving interface in process, over fake engines (no model, milliseconds): each
fake engine has a tokenizer of its own, so a request run on another engine than the one that
tokenized it reads as nonsense.

What transports see of the model: prepare a request against the engine that will run it,
submit, cancel, status; and the response policy both transports render with.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

import pytest

from edgeagent import protocol
from edgeagent.engine import Engine, Finish
from edgeagent.scheduler import AdmissionError, JobError, Scheduler
from edgeagent.serving import Serving
from edgeagent.settings import Settings
from edgeagent.testing.fake_engine import Collector, FakeEngine, fake_plan

PLAN = fake_plan(max_batch=1)  # one slot: a second request waits in the queue


class Answer(Collector):
    def result(self, timeout: float = 30) -> str | JobError:
        last = self.final(timeout)
        return last if isinstance(last, JobError) else self.text()


@pytest.fixture
def engine_a() -> FakeEngine:
    return FakeEngine(PLAN, "A", 1000)


@pytest.fixture
def serving(engine_a: FakeEngine) -> Iterator[Serving]:
    settings = Settings()
    serving = Serving(settings)
    scheduler = Scheduler(cast(Engine, engine_a), PLAN, settings)
    serving.serve(scheduler, PLAN, None)
    scheduler.start()
    yield serving
    engine_a.gate.set()
    scheduler.stop()


def _send(serving: Serving, prompt: str) -> Answer:
    answer = Answer()
    prepared = serving.prepare_completion(protocol.CompletionRequest(prompt=prompt,
                                                                     max_tokens=1))
    serving.submit(protocol.to_job(prepared, answer.sink, "test"))
    return answer


def test_a_swap_runs_each_request_on_the_engine_that_tokenized_it(
        serving: Serving, engine_a: FakeEngine) -> None:
    """A model swap while requests wait: those tokenized by the old engine finish on it,
    those prepared after the swap was asked for run on the new one."""
    engine_a.gate.clear()
    running = _send(serving, "one")
    assert engine_a.stepping.wait(30)
    queued = _send(serving, "two")  # waits: one slot, taken
    serving.swap(cast(Engine, FakeEngine(PLAN, "B", 5000)), PLAN, None)
    after = _send(serving, "three")
    engine_a.gate.set()
    assert running.result() == "A:one"
    assert queued.result() == "A:two"
    assert after.result() == "B:three"
    assert serving.status()["serving"]["completed"] == 3


def test_a_request_prepared_for_a_replaced_engine_is_refused(serving: Serving) -> None:
    """Prepared, then the model changed under it before it was submitted: 503, retry."""
    stale = serving.prepare_completion(protocol.CompletionRequest(prompt="old"))
    serving.swap(cast(Engine, FakeEngine(PLAN, "B", 5000)), PLAN, None)
    assert _send(serving, "new").result() == "B:new"  # the swap has happened
    with pytest.raises(AdmissionError) as refused:
        serving.submit(protocol.to_job(stale, Answer().sink, "test"))
    assert refused.value.status == 503
    assert refused.value.code == "model_changed"


def test_not_ready_is_503_loading() -> None:
    serving = Serving(Settings())
    serving.loading()
    with pytest.raises(AdmissionError) as refused:
        serving.prepare_completion(protocol.CompletionRequest(prompt="hi"))
    assert (refused.value.status, refused.value.code) == (503, "model_loading")
    assert "loading" in refused.value.message
    assert serving.status()["status"] == "loading"


def test_cancel_reaches_the_job(serving: Serving, engine_a: FakeEngine) -> None:
    engine_a.gate.clear()
    answer = Answer()
    prepared = serving.prepare_completion(protocol.CompletionRequest(prompt="long",
                                                                     max_tokens=500))
    job = protocol.to_job(prepared, answer.sink, "test")
    serving.submit(job)
    assert engine_a.stepping.wait(30)
    serving.cancel(job)
    engine_a.gate.set()
    assert answer.result().startswith("A:long")
    fin = answer.items[-1]
    assert isinstance(fin, Finish) and fin.reason == "cancelled"
    assert fin.completion_tokens < 500


# ------------------------------------------------------------------ response policy
def _prepared(serving: Serving) -> protocol.Prepared:
    req = protocol.ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}]})
    return serving.prepare_chat(req)


def test_a_cancelled_request_finishes_with_stop_on_every_renderer(serving: Serving) -> None:
    """OpenAI's finish reasons have no "cancelled": a cancelled request reports "stop",
    whole or streamed, over HTTP and MQTT alike (both render with these functions)."""
    p = _prepared(serving)
    fin = Finish("cancelled", 3, 2)
    assert protocol.finish_reason("cancelled") == "stop"
    whole = protocol.render_completion(p, "ab", fin, chat=True)
    assert whole["choices"][0]["finish_reason"] == "stop"
    text = protocol.render_completion(p, "ab", fin, chat=False)
    assert text["choices"][0]["finish_reason"] == "stop"
    last = protocol.final_chunks(p, fin, [], chat=True)[-1 - p.include_usage]
    assert last["choices"][0]["finish_reason"] == "stop"


def test_error_type_follows_the_status() -> None:
    assert protocol.job_error_body(JobError(408, "timeout", "late"))["error"]["type"] == \
        "invalid_request_error"
    body = protocol.job_error_body(JobError(500, "engine_error", "boom"))
    assert body["error"]["type"] == "server_error"
    assert body["error"]["code"] == "engine_error"


# ------------------------------------------------------------------ fields that were ignored
def test_echo_puts_the_prompt_before_the_completion(serving: Serving) -> None:
    p = serving.prepare_completion(protocol.CompletionRequest(prompt="Once", echo=True))
    whole = protocol.render_completion(p, " upon", Finish("stop", 4, 1), chat=False)
    assert whole["choices"][0]["text"] == "Once upon"
    streamed = protocol.first_chunks(p, chat=False)
    assert [c["choices"][0]["text"] for c in streamed] == ["Once"]
    plain = serving.prepare_completion(protocol.CompletionRequest(prompt="Once"))
    assert protocol.render_completion(plain, " upon", Finish("stop", 4, 1),
                                      chat=False)["choices"][0]["text"] == " upon"
    assert protocol.first_chunks(plain, chat=False) == []


def test_an_earlier_tool_call_reaches_the_model(serving: Serving) -> None:
    """An assistant message that called a tool is shown to the model as the call it made
    (in the envelope the daemon asks for), not as an empty message."""
    req = protocol.ChatCompletionRequest.model_validate({"messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "-3 C"}], "max_tokens": 1})
    answer = Answer()
    serving.submit(protocol.to_job(serving.prepare_chat(req), answer.sink, "test"))
    seen = answer.result()
    assert isinstance(seen, str)
    assert '{"tool_calls": [{"name": "weather", "arguments": {"city": "Oslo"}}]}' in seen
