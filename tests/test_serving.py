"""The serving interface in process, over fake engines (no model, milliseconds).

What transports see of the model: prepare a request against the engine that will run it,
submit, cancel, status; and the response policy both transports render with.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any, cast

import numpy as np
import pytest

from edgeagent import protocol
from edgeagent.engine import Delta, Engine, Finish, Sampling, Sequence, StopMatcher
from edgeagent.planner import Plan
from edgeagent.scheduler import AdmissionError, Item, JobError, Scheduler
from edgeagent.serving import Serving
from edgeagent.settings import Settings

PLAN = Plan(threads=1, context_length=1024, max_batch=1, provider="cpu",
            max_prompt_tokens=512, available_bytes=2**30, weights_bytes=0,
            kv_bytes_per_token=0, kv_bytes=0, prefill_chunk=256, logits_bytes=0,
            attention_bytes=0, headroom_bytes=0, total_bytes=0)


class TokenizingEngine:
    """An engine whose tokenizer is its own: token ids start at ``base``, so tokens made by
    another engine's tokenizer decode to nonsense here. A sequence's first token is the
    prompt as this engine reads it, then one "." a step up to max_tokens. Steps wait on
    ``gate``."""

    def __init__(self, name: str, base: int, plan: Plan = PLAN) -> None:
        self.name = name
        self.base = base
        self.plan = plan
        self.capacity = plan.max_batch
        self.held: list[Sequence] = []
        self.gate = threading.Event()
        self.gate.set()
        self.stepping = threading.Event()

    def encode(self, text: str) -> np.ndarray:
        return np.asarray([self.base + ord(c) for c in text], dtype=np.int32)

    def chat_tokens(self, messages: list[dict[str, Any]]) -> np.ndarray:
        return self.encode("".join("".join(m["content"]) for m in messages))

    def check_guidance(self, guidance: tuple[str, str], sampling: Sampling) -> None:
        pass

    def _decode(self, tokens: np.ndarray) -> str:
        return "".join(chr(t - self.base) if 0 <= t - self.base < 0x110000 else "?"
                       for t in tokens.tolist())

    def start(self, prompt: np.ndarray, sampling: Sampling,
              guidance: tuple[str, str] | None = None) -> Sequence:
        seq = Sequence(np.asarray(prompt), sampling, guidance, sampling.max_tokens, None,
                       StopMatcher(()), np.random.default_rng(0))
        self.held.append(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        seq.cancel_requested = True

    def holds(self, seq: Sequence) -> bool:
        return seq in self.held

    def step(self) -> list[tuple[Sequence, Delta | Finish]]:
        self.stepping.set()
        assert self.gate.wait(30), "the test never released the step"
        out: list[tuple[Sequence, Delta | Finish]] = []
        for seq in list(self.held):
            if seq.cancel_requested:
                self.held.remove(seq)
                out.append((seq, Finish("cancelled", len(seq.prompt), len(seq.produced))))
                continue
            first = not seq.produced
            seq.produced.append(1)
            out.append((seq, Delta(1, f"{self.name}:{self._decode(seq.prompt)}" if first
                                   else ".")))
            if len(seq.produced) >= seq.max_new:
                self.held.remove(seq)
                out.append((seq, Finish("length", len(seq.prompt), len(seq.produced))))
        return out


class Answer:
    """A job's sink: its items, and an event once the last has come."""

    def __init__(self) -> None:
        self.items: list[Item] = []
        self.done = threading.Event()

    def sink(self, item: Item) -> None:
        self.items.append(item)
        if isinstance(item, (Finish, JobError)):
            self.done.set()

    def result(self, timeout: float = 30) -> str | JobError:
        assert self.done.wait(timeout), f"no answer within {timeout}s: {self.items}"
        last = self.items[-1]
        if isinstance(last, JobError):
            return last
        return "".join(i.text for i in self.items if isinstance(i, Delta))


@pytest.fixture
def engine_a() -> TokenizingEngine:
    return TokenizingEngine("A", 1000)


@pytest.fixture
def serving(engine_a: TokenizingEngine) -> Iterator[Serving]:
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
        serving: Serving, engine_a: TokenizingEngine) -> None:
    """A model swap while requests wait: those tokenized by the old engine finish on it,
    those prepared after the swap was asked for run on the new one."""
    engine_a.gate.clear()
    running = _send(serving, "one")
    assert engine_a.stepping.wait(30)
    queued = _send(serving, "two")  # waits: one slot, taken
    serving.swap(cast(Engine, TokenizingEngine("B", 5000)), PLAN, None)
    after = _send(serving, "three")
    engine_a.gate.set()
    assert running.result() == "A:one"
    assert queued.result() == "A:two"
    assert after.result() == "B:three"
    assert serving.status()["serving"]["completed"] == 3


def test_a_request_prepared_for_a_replaced_engine_is_refused(serving: Serving) -> None:
    """Prepared, then the model changed under it before it was submitted: 503, retry."""
    stale = serving.prepare_completion(protocol.CompletionRequest(prompt="old"))
    serving.swap(cast(Engine, TokenizingEngine("B", 5000)), PLAN, None)
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


def test_cancel_reaches_the_job(serving: Serving, engine_a: TokenizingEngine) -> None:
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
