"""frequency_penalty / presence_penalty, logprobs / top_logprobs, and n > 1, through the
official ``openai`` client against the daemon as a subprocess (the real model)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from edgeagent.testing.broker import Broker, requester
from edgeagent.testing.daemon import DaemonProc, uds_client
from tests.conftest import shared_daemon

pytestmark = pytest.mark.model

CAPACITY = 4
USER = [{"role": "user", "content": "What is the capital of France?"}]
REPEAT = [{"role": "user", "content": "List the word apple over and over."}]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, default_model: Path
           ) -> Iterator[DaemonProc]:
    yield from shared_daemon(tmp_path_factory, default_model,
                             f"[runtime]\ncontext_length = 1024\nmax_batch = {CAPACITY}\n"
                             "[limits]\nmax_queue = 8\n", "sampling")


@pytest.fixture
def oai(daemon: DaemonProc) -> Iterator[openai.OpenAI]:
    with uds_client(daemon.socket_path) as http:
        yield openai.OpenAI(base_url="http://localhost/v1", api_key="unused",
                            http_client=http, max_retries=0)


# ------------------------------------------------------------------ logprobs
def test_chat_logprobs_shape_and_top_count(oai: openai.OpenAI) -> None:
    plain = oai.chat.completions.create(model="edgeagent", messages=USER,  # type: ignore[arg-type]
                                        max_tokens=10, temperature=0)
    resp = oai.chat.completions.create(model="edgeagent", messages=USER,  # type: ignore[arg-type]
                                       max_tokens=10, temperature=0, logprobs=True,
                                       top_logprobs=3)
    choice = resp.choices[0]
    # Reading logprobs does not change what is generated.
    assert choice.message.content == plain.choices[0].message.content
    assert plain.choices[0].logprobs is None
    assert choice.logprobs is not None and choice.logprobs.content is not None
    entries = choice.logprobs.content
    assert resp.usage is not None and len(entries) == resp.usage.completion_tokens
    assert "".join(e.token for e in entries) == choice.message.content
    for e in entries:
        assert e.bytes == list(e.token.encode("utf-8"))
        assert e.logprob <= 0.0
        assert len(e.top_logprobs) == 3
        tops = [t.logprob for t in e.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        # Greedy: the token generated is the most likely one.
        assert e.top_logprobs[0].token == e.token
        assert math.isclose(e.top_logprobs[0].logprob, e.logprob)


def test_chat_logprobs_without_top_and_streamed(oai: openai.OpenAI) -> None:
    whole = oai.chat.completions.create(model="edgeagent", messages=USER,  # type: ignore[arg-type]
                                        max_tokens=8, temperature=0, logprobs=True)
    assert whole.choices[0].logprobs is not None
    entries = whole.choices[0].logprobs.content or []
    assert entries and all(e.top_logprobs == [] for e in entries)
    stream = oai.chat.completions.create(model="edgeagent", messages=USER,  # type: ignore[arg-type]
                                         max_tokens=8, temperature=0, logprobs=True,
                                         stream=True)
    streamed = []
    for chunk in stream:
        for c in chunk.choices:
            if c.delta.content:
                assert c.logprobs is not None and c.logprobs.content
            if c.logprobs is not None and c.logprobs.content:
                streamed.extend(c.logprobs.content)
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]


def test_completions_logprobs_in_the_legacy_shape(oai: openai.OpenAI) -> None:
    prompt = "The capital of France is"
    resp = oai.completions.create(model="edgeagent", prompt=prompt, max_tokens=6,
                                  temperature=0, logprobs=2)
    choice = resp.choices[0]
    lp = choice.logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    assert lp.text_offset is not None
    assert resp.usage is not None and len(lp.tokens) == resp.usage.completion_tokens
    assert "".join(lp.tokens) == choice.text
    assert all(v <= 0.0 for v in lp.token_logprobs)
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs)
    assert all(top[tok] == v for top, tok, v in zip(lp.top_logprobs, lp.tokens,
                                                    lp.token_logprobs, strict=True))
    offsets = [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert lp.text_offset == offsets
    echoed = oai.completions.create(model="edgeagent", prompt=prompt, max_tokens=6,
                                    temperature=0, logprobs=0, echo=True)
    lp0 = echoed.choices[0].logprobs
    assert lp0 is not None and lp0.text_offset is not None and lp0.top_logprobs is not None
    assert lp0.text_offset[0] == len(prompt)  # offsets are into the text returned
    assert all(top == {} for top in lp0.top_logprobs)


def test_logprobs_out_of_range_are_refused(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model="edgeagent", messages=USER,  # type: ignore[arg-type]
                                    max_tokens=4, logprobs=True, top_logprobs=21)
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model="edgeagent", prompt="Hi", max_tokens=4, logprobs=6)


# ------------------------------------------------------------------ penalties
def _repeat(oai: openai.OpenAI, **kw: float) -> str:
    resp = oai.chat.completions.create(model="edgeagent", messages=REPEAT,  # type: ignore[arg-type]
                                       max_tokens=40, temperature=0, **kw)
    return resp.choices[0].message.content or ""


def test_penalties_change_a_repetitive_answer_deterministically(oai: openai.OpenAI) -> None:
    plain = _repeat(oai)
    assert plain.lower().count("apple") >= 10  # the prompt makes the model repeat itself
    for kw in ({"frequency_penalty": 1.5}, {"presence_penalty": 2.0}):
        penalized = _repeat(oai, **kw)
        assert penalized != plain
        assert penalized.lower().count("apple") < plain.lower().count("apple")
        assert _repeat(oai, **kw) == penalized  # greedy: the same every time
    # A negative penalty encourages repetition: allowed, as OpenAI (-2 to 2).
    assert _repeat(oai, frequency_penalty=-0.5) != _repeat(oai, frequency_penalty=1.5)
    assert _repeat(oai, frequency_penalty=0, presence_penalty=0) == plain


# ------------------------------------------------------------------ n
def test_n_choices_differ_and_repeat_with_a_seed(oai: openai.OpenAI) -> None:
    def ask() -> list[str]:
        resp = oai.chat.completions.create(
            model="edgeagent", messages=[{"role": "user", "content": "Tell me a short story."}],
            max_tokens=16, temperature=1.0, seed=7, n=3)
        assert [c.index for c in resp.choices] == [0, 1, 2]
        assert all(c.finish_reason in ("stop", "length") for c in resp.choices)
        assert resp.usage is not None and resp.usage.completion_tokens > 16
        return [c.message.content or "" for c in resp.choices]

    first = ask()
    assert all(first) and len(set(first)) > 1
    assert ask() == first  # each row's seed is derived from the request's


def test_n_streamed_chunks_carry_their_index(oai: openai.OpenAI) -> None:
    kw = {"model": "edgeagent", "messages": USER, "max_tokens": 12, "temperature": 0.8,
          "seed": 3, "n": 2}
    whole = oai.chat.completions.create(**kw)  # type: ignore[call-overload]
    texts = {0: "", 1: ""}
    finished = set()
    usage = None
    for chunk in oai.chat.completions.create(**kw, stream=True,  # type: ignore[call-overload]
                                             stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1}
    assert [texts[0], texts[1]] == [c.message.content for c in whole.choices]
    assert usage is not None and whole.usage is not None
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_n_with_logprobs_and_completions(oai: openai.OpenAI) -> None:
    resp = oai.completions.create(model="edgeagent", prompt="Once upon a time", max_tokens=5,
                                  temperature=0, n=2, logprobs=1)
    assert [c.index for c in resp.choices] == [0, 1]
    assert resp.choices[0].text == resp.choices[1].text  # greedy rows agree
    for c in resp.choices:
        assert c.logprobs is not None and "".join(c.logprobs.tokens or []) == c.text


def test_n_with_a_json_format_runs_each_choice_guided(oai: openai.OpenAI) -> None:
    resp = oai.chat.completions.create(
        model="edgeagent", n=2, max_tokens=40, temperature=0.7, seed=1,
        messages=[{"role": "user", "content": "Give a JSON object with a name."}],
        response_format={"type": "json_object"})
    assert len(resp.choices) == 2
    for c in resp.choices:
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.message.content or ""), dict)


def test_n_above_the_batch_capacity_is_refused(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model="edgeagent", messages=USER,  # type: ignore[arg-type]
                                    max_tokens=4, n=CAPACITY + 1)
    assert err.value.body["param"] == "n"  # type: ignore[index]


# ------------------------------------------------------------------ over MQTT
def test_mqtt_answers_n_choices_with_logprobs(start_daemon: Any, broker: Broker) -> None:
    d = start_daemon(extra_toml=f'[runtime]\nmax_batch = {CAPACITY}\n'
                                f'[mqtt]\nurl = "{broker.url}"\n', name="m")
    d.wait_ready()
    topic = "edgeagent/test-m/request"
    body = {"messages": USER, "max_tokens": 6, "temperature": 0.8, "seed": 5, "n": 2,
            "logprobs": True, "top_logprobs": 2}
    with requester(broker) as r:
        r.request(topic, body)
        _, doc, _ = r.get()
        assert [c["index"] for c in doc["choices"]] == [0, 1], doc
        for c in doc["choices"]:
            entries = c["logprobs"]["content"]
            assert "".join(e["token"] for e in entries) == c["message"]["content"]
            assert all(len(e["top_logprobs"]) == 2 for e in entries)
        r.request(topic, {**body, "stream": True}, correlation=b"c2")
        texts = {0: "", 1: ""}
        ends = set()
        while True:  # the usage comes with the last choice's last chunk
            _, chunk, _ = r.get()
            for c in chunk["choices"]:
                texts[c["index"]] += c["delta"].get("content") or ""
                if c["finish_reason"]:
                    ends.add(c["index"])
            if "usage" in chunk:
                break
        assert ends == {0, 1}
        assert [texts[0], texts[1]] == [c["message"]["content"] for c in doc["choices"]]
        assert chunk["usage"] == doc["usage"]
