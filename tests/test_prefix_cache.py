"""The prompt (prefix) cache: its plan, and the real model in process answering the same
with and without it while prefilling only the new tokens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgeagent.engine import Delta, Engine, Finish, Guidance, Sampling
from edgeagent.planner import GB, MB, ModelMeta, PlanError, plan
from edgeagent.prefix_cache import common_prefix
from edgeagent.probe import Hardware, probe
from edgeagent.settings import LimitsSettings, RuntimeSettings
from edgeagent.testing.prompts import system_prompt as shared_prompt

SMOL = ModelMeta(name="smollm2-135m", num_hidden_layers=30, num_key_value_heads=3,
                 head_size=64, vocab_size=49152, max_context=8192, weights_bytes=86 * MB,
                 num_attention_heads=9, last_logits_only=True)
CONTEXT = 2048
ENTRY = SMOL.kv_bytes_per_token * CONTEXT  # one cached prompt: a full-context KV cache
#: A small guided answer: a sensor's name and level.
TURBINE_SCHEMA = {"type": "object", "properties": {
    "sensor": {"type": "string", "maxLength": 24},
    "level": {"type": "integer", "minimum": 0, "maximum": 999}},
    "required": ["sensor", "level"], "additionalProperties": False}


def box(available: int) -> Hardware:
    return Hardware(mem_total_bytes=16 * GB, mem_available_bytes=available, logical_cpus=2,
                    physical_cores=2, topology_known=True, affinity=(0, 1))


# ----------------------------------------------------------------------------- the plan

def test_auto_cache_takes_whole_entries_beside_the_full_batch_at_full_context() -> None:
    p = plan(box(8 * GB), SMOL, RuntimeSettings(context_length=CONTEXT), LimitsSettings())
    assert p.prefix_cache_entries == p.max_batch == 4
    assert p.prefix_cache_bytes == 4 * ENTRY
    assert p.kv_bytes == SMOL.kv_bytes_per_token * CONTEXT * p.max_batch  # not shrunk
    assert p.total_bytes <= p.available_bytes
    assert "prefix cache" in p.describe() and "auto: 4 x" in p.reasons["prefix_cache"]


def test_auto_cache_is_off_when_half_the_spare_memory_holds_no_entry() -> None:
    # Just enough for one sequence at 2048 tokens: nothing spare for a cached prompt.
    tight = plan(box(86 * MB + 256 * MB + 150 * MB), SMOL,
                 RuntimeSettings(context_length=CONTEXT), LimitsSettings())
    assert tight.max_batch >= 1 and tight.prefix_cache_bytes == 0
    assert tight.reasons["prefix_cache"].startswith("auto: off")
    assert tight.total_bytes <= tight.available_bytes


def test_an_explicit_cache_is_reserved_before_the_batch_is_sized() -> None:
    runtime = {"context_length": CONTEXT}
    hw = box(86 * MB + 256 * MB + 650 * MB)
    without = plan(hw, SMOL, RuntimeSettings(**runtime, prefix_cache_mb=0), LimitsSettings())
    with_cache = plan(hw, SMOL, RuntimeSettings(**runtime, prefix_cache_mb=400),
                      LimitsSettings())
    assert without.prefix_cache_bytes == 0
    assert with_cache.prefix_cache_entries == 400 * MB // ENTRY == 4
    assert with_cache.max_batch < without.max_batch  # the batch shrank to make room
    assert with_cache.context_length == CONTEXT  # a full-context prompt still fits
    assert with_cache.total_bytes <= with_cache.available_bytes


def test_an_explicit_cache_below_one_entry_is_refused_with_its_numbers() -> None:
    with pytest.raises(PlanError) as err:
        plan(box(8 * GB), SMOL, RuntimeSettings(context_length=CONTEXT, prefix_cache_mb=50),
             LimitsSettings())
    assert "runtime.prefix_cache_mb=50 holds no prompt" in str(err.value)
    assert "2048-token KV cache, 90 MB" in str(err.value)


def test_an_explicit_cache_larger_than_memory_is_named_in_the_refusal() -> None:
    with pytest.raises(PlanError) as err:
        plan(box(8 * GB), SMOL, RuntimeSettings(prefix_cache_mb=10**6), LimitsSettings())
    assert "976.6 GB of prefix cache (runtime.prefix_cache_mb)" in str(err.value)
    assert "lower runtime.prefix_cache_mb" in str(err.value)


# ------------------------------------------------------------------- the real model

def engine_with(default_model: Path, cache_mb: int) -> Engine:
    runtime = RuntimeSettings(context_length=CONTEXT, max_batch=2, prefix_cache_mb=cache_mb)
    return Engine(default_model, plan(probe(), ModelMeta.from_folder(default_model), runtime,
                                      LimitsSettings()))


@pytest.fixture(scope="module")
def cached(default_model: Path) -> Engine:
    return engine_with(default_model, 2 * (ENTRY // MB + 1))  # two entries


@pytest.fixture(scope="module")
def uncached(default_model: Path) -> Engine:
    return engine_with(default_model, 0)


def system_prompt(topic: str, sensors: int = 40) -> str:
    return shared_prompt(topic, sensors)


def run(engine: Engine, prompt: np.ndarray, max_tokens: int = 24) -> tuple[list[int], Finish,
                                                                           int]:
    """Greedy tokens, the Finish and the prompt tokens the engine prefilled for them."""
    before = engine.prefilled_tokens
    items = list(engine.generate(prompt, Sampling(max_tokens=max_tokens)))
    fin = items[-1]
    assert isinstance(fin, Finish) and fin.reason in ("stop", "length"), fin
    return [i.token for i in items if isinstance(i, Delta)], fin, engine.prefilled_tokens - before


#: Logprob gap under which two tokens are a near-tie (nats).
NEAR_TIE = 0.25


def assert_same_answer(tokens: list[int], uncached: Engine, prompt: np.ndarray) -> None:
    """``tokens`` (from the cache) are the greedy answer of a cold prefill, but for a
    near-tie: the answer's earlier turns were fed back one token at a time when they were
    generated (onnxruntime's decode path) and are prefilled as a prompt when cold, which
    rounds differently (docs/engine-notes.md, "Prefix cache"). At the first token that
    differs, the cached one must be the cold run's second choice within ``NEAR_TIE``."""
    items = list(uncached.generate(prompt, Sampling(max_tokens=len(tokens), logprobs=2)))
    cold = [i for i in items if isinstance(i, Delta)]
    for step, (ours, theirs) in enumerate(zip(tokens, cold, strict=False)):
        if ours == theirs.token:
            continue
        top = {t.token: t.logprob for t in theirs.logprobs[0].top}
        text = uncached.tokenizer.decode(np.asarray([ours], dtype=np.int32))
        assert text in top, (step, text, top)
        assert max(top.values()) - top[text] < NEAR_TIE, (step, text, top)
        return
    assert len(tokens) == len(cold)


def chat(engine: Engine, system: str, *turns: Any) -> np.ndarray:
    messages = [{"role": "system", "content": system}]
    for i, text in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return engine.chat_tokens(messages)


def test_a_repeated_system_prompt_prefills_only_the_new_tokens(
        cached: Engine, uncached: Engine) -> None:
    system = system_prompt("boiler")
    first = chat(cached, system, "Which sensors alarm above 70 C?")
    second = chat(cached, system, "Summarize line 3 in one sentence.")
    assert len(first) > 900
    shared = common_prefix(first, second)
    run(cached, first)
    tokens, fin, prefilled = run(cached, second)
    assert prefilled == len(second) - shared  # the system prompt came from the cache
    assert fin.cached_tokens == shared
    plain, _, prefilled_plain = run(uncached, second)
    assert tokens == plain  # the same greedy answer
    assert prefilled_plain == len(second)  # without the cache, the whole prompt again


def test_a_chat_turn_costs_its_new_tokens_only(cached: Engine, uncached: Engine) -> None:
    system = system_prompt("chiller", sensors=8)
    turns: list[str] = []
    previous = 0  # the tokens the last turn left in the cache: its prompt and answer
    for i in range(10):
        turns.append(f"What is the alarm level of sensor chiller-{i}?")
        prompt = chat(cached, system, *turns)
        tokens, fin, prefilled = run(cached, prompt, max_tokens=16)
        if previous:
            # The new turn's own tokens, and at most the last answer token (generated but
            # never fed back, so it has no KV yet).
            assert prefilled <= len(prompt) - previous + 1, (prefilled, len(prompt), previous)
        assert_same_answer(tokens, uncached, prompt)
        previous = len(prompt) + fin.completion_tokens
        turns.append(cached.tokenizer.decode(np.asarray(tokens, dtype=np.int32)))


def test_the_least_recently_used_prompt_goes_first(cached: Engine, uncached: Engine) -> None:
    assert cached.prefix_cache.capacity == 2
    prompts = {topic: chat(cached, system_prompt(topic, sensors=8), "Any alarms?")
               for topic in ("pump", "valve", "fan")}
    answers = {topic: run(cached, prompts[topic])[0] for topic in ("pump", "valve")}
    # The cache is full: the fan's prompt runs on the pump's generator, emptied.
    answers["fan"] = run(cached, prompts["fan"])[0]
    assert cached.prefix_cache.entries == 2
    assert cached.prefix_cache.bytes == 2 * cached.plan.prefix_cache_entry_bytes
    assert run(cached, prompts["fan"])[1].cached_tokens > 200
    assert run(cached, prompts["pump"])[1].cached_tokens == 0  # evicted
    assert answers == {topic: run(uncached, prompt)[0] for topic, prompt in prompts.items()}


def test_generators_are_made_while_idle_and_kept_within_the_plan(default_model: Path) -> None:
    """Making a full-context generator faults in its KV cache (70-250 ms, holding up every
    request of that step), so the engine makes them while idle, one per free sequence slot,
    and keeps the ones the cache pushes out as spares: prompts matching nothing then run
    on them and no generator is made or freed while serving. A batch of several rows,
    whose memory is its own, frees the spares its rows need from the plan."""
    engine = engine_with(default_model, 2 * (ENTRY // MB + 1))
    cache = engine.prefix_cache
    made = 0
    while engine.prepare():
        made += 1
    assert made == cache.spares == engine.capacity == 2  # max_batch slots, none running
    prompts = [chat(engine, system_prompt(topic, sensors=8), "Any alarms?")
               for topic in ("pump", "valve", "fan")]
    for prompt in prompts:  # three prompts for two entries: the pump's is pushed out
        seq = engine.start(prompt, Sampling(max_tokens=4))
        engine.step()
        assert cache.spares == 1  # the sequence took a spare, not a cached prompt
        while not seq.finished:
            engine.step()
        engine.prepare()  # idle again: back to two spares while the cache fills
    assert (cache.entries, cache.spares) == (2, 2)
    assert not engine.prepare()  # nothing to make: the pushed-out generator is a spare
    assert run(engine, prompts[2])[1].cached_tokens > 200
    assert run(engine, prompts[0])[1].cached_tokens == 0  # pushed out
    # Two rows started together share a batch of their own: the plan's two sequences.
    rows = [engine.start(chat(engine, "Be brief.", q), Sampling(max_tokens=4))
            for q in ("Name a river.", "Name a colour.")]
    engine.step()
    assert cache.spares == 0
    while not all(seq.finished for seq in rows):
        engine.step()
    assert engine.prepare() and engine.prepare() and not engine.prepare()


def test_metrics_and_health_report_hits_tokens_saved_and_bytes_held(
        start_daemon: Any) -> None:
    d = start_daemon(extra_toml=f"[runtime]\ncontext_length = {CONTEXT}\n")
    d.wait_ready()
    system = system_prompt("compressor", sensors=12)
    with d.client() as http:
        for question in ("Any alarms?", "Which line is sensor compressor-3 on?"):
            r = http.post("/v1/chat/completions", json={
                "messages": [{"role": "system", "content": system},
                             {"role": "user", "content": question}], "max_tokens": 4})
            assert r.status_code == 200, r.text
        # A guided request (response_format) on the same system prompt: a hit too.
        r = http.post("/v1/chat/completions", json={
            "messages": [{"role": "system", "content": system},
                         {"role": "user", "content": "Sensor compressor-3's level, as JSON."}],
            "response_format": {"type": "json_schema", "json_schema": {
                "name": "level", "schema": TURBINE_SCHEMA}},
            "max_tokens": 48})
        assert r.status_code == 200, r.text
        answer = json.loads(r.json()["choices"][0]["message"]["content"])
        jsonschema.validate(answer, TURBINE_SCHEMA)
        families = {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}
        serving = http.get("/health").json()["serving"]

    def value(name: str) -> float:
        return float(families[name].samples[0].value)

    assert value("edgeagent_prefix_cache_hits") == 2
    assert value("edgeagent_prefix_cache_tokens_saved") > 600  # the system prompt, twice
    assert value("edgeagent_prefix_cache_entries") == 1
    assert value("edgeagent_prefix_cache_bytes") == ENTRY
    assert (serving["prefix_cache_hits"], serving["prefix_cache_bytes"]) == (2, ENTRY)


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def test_with_the_cache_full_a_long_prompt_stays_within_the_plan(start_daemon: Any) -> None:
    """Peak RSS over idle, with two cached prompts then a 1,750-token one, is no more than
    the plan's KV cache, prefill memory and prefix cache (+ 48 MB for onnxruntime's arenas
    and the tokenizer's first use): the cache holds no more than its budget beside it."""
    d = start_daemon(extra_toml=f"[runtime]\ncontext_length = {CONTEXT}\nmax_batch = 1\n"
                                f"prefix_cache_mb = {2 * (ENTRY // MB + 1)}\n")
    d.wait_ready()
    pid = d.proc.pid
    idle = _status_kb(pid, "VmRSS") * 1024
    with d.client() as http:
        p = http.get("/health").json()["plan"]
        for topic in ("pump", "valve", "fan", "long"):  # three prompts for two entries
            content = "word " * 1450 if topic == "long" else "Any alarms?"
            r = http.post("/v1/chat/completions", json={
                "messages": [{"role": "system", "content": system_prompt(topic, sensors=8)},
                             {"role": "user", "content": content}], "max_tokens": 4})
            assert r.status_code == 200, r.text
        serving = http.get("/health").json()["serving"]
    peak = _status_kb(pid, "VmHWM") * 1024
    assert p["prefix_cache_bytes"] == 2 * ENTRY
    assert (serving["prefix_cache_entries"], serving["prefix_cache_bytes"]) == (2, 2 * ENTRY)
    budget = p["kv_bytes"] + p["logits_bytes"] + p["attention_bytes"] + p["prefix_cache_bytes"]
    print(f"peak over idle {(peak - idle) / MB:.0f} MB, plan {budget / MB:.0f} MB")
    assert peak - idle <= budget + 48 * MB


def test_a_guided_request_takes_the_system_prompt_an_unguided_one_left(
        cached: Engine) -> None:
    """A guided row runs like any row: on the cached generator of an earlier unguided
    answer with the same system prompt, prefilling only its own tokens, and its answer is
    still JSON under its schema."""
    system = system_prompt("turbine", sensors=20)
    run(cached, chat(cached, system, "Any alarms?"))
    prompt = chat(cached, system, "Give sensor turbine-3's name and alarm level as JSON.")
    guidance = Guidance("json_schema", json.dumps(
        {**TURBINE_SCHEMA, "x-guidance": {"whitespace_flexible": False}}))
    cached.check_guidance(guidance, Sampling())
    before = cached.prefilled_tokens
    items = list(cached.generate(prompt, Sampling(max_tokens=64), guidance=guidance))
    fin = items[-1]
    assert isinstance(fin, Finish) and fin.reason == "stop", fin
    assert fin.cached_tokens > 300  # the system prompt came from the cache
    assert cached.prefilled_tokens - before == len(prompt) - fin.cached_tokens
    text = "".join(i.text for i in items if isinstance(i, Delta)) + fin.tail
    jsonschema.validate(json.loads(text), TURBINE_SCHEMA)


def test_a_guided_row_batches_and_leaves_its_neighbour_untouched(uncached: Engine) -> None:
    """Short prompts batch whether guided or not: the guided row's mask is its own (its
    answer is JSON under its schema), and the row beside it answers as beside a plain row."""
    a = chat(uncached, "You answer in JSON.", "Give sensor pump-1's name and level.")
    b = chat(uncached, "You are terse.", "Name a pump part.")
    guidance = Guidance("json_schema", json.dumps(
        {**TURBINE_SCHEMA, "x-guidance": {"whitespace_flexible": False}}))

    def together(first: Guidance | None) -> tuple[str, list[int]]:
        seqs = [uncached.start(a, Sampling(max_tokens=48), first),
                uncached.start(b, Sampling(max_tokens=16))]
        text: dict[int, str] = {0: "", 1: ""}
        tokens: list[int] = []
        done: set[int] = set()
        steps = 0
        while len(done) < 2:
            events = uncached.step()
            if steps == 0:
                assert [len(batch.rows) for batch in uncached._batches] == [2]
            steps += 1
            for seq, item in events:
                i = seqs.index(seq)
                if isinstance(item, Delta):
                    text[i] += item.text
                    if i == 1:
                        tokens.append(item.token)
                else:
                    assert item.reason in ("stop", "length"), item
                    text[i] += item.tail
                    done.add(i)
        return text[0], tokens

    guided, beside_guided = together(guidance)
    jsonschema.validate(json.loads(guided), TURBINE_SCHEMA)
    _, beside_plain = together(None)
    assert beside_guided == beside_plain
