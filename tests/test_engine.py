"""The engine against a plain onnxruntime-genai loop, on the real default model."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import onnxruntime_genai as og
import pytest

from edgeagent.engine import Delta, Engine, Finish, Sampling, StopMatcher
from edgeagent.planner import ModelMeta, genai_overlay, plan
from edgeagent.probe import probe
from edgeagent.settings import LimitsSettings, RuntimeSettings

pytestmark = pytest.mark.model

MESSAGES = [{"role": "user", "content": "Write a haiku about the sea."}]


@pytest.fixture(scope="module")
def engine(default_model: Path) -> Engine:
    the_plan = plan(probe(), ModelMeta.from_folder(default_model),
                    RuntimeSettings(context_length=1024), LimitsSettings())
    return Engine(default_model, the_plan)


def raw_loop(engine: Engine, tokens: np.ndarray, n: int) -> list[int]:
    """The plain onnxruntime-genai loop with the same plan (threads, max_length)."""
    config = og.Config(str(engine.path))
    config.overlay(json.dumps(genai_overlay(engine.plan)))
    model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(tokens) + n, min_length=len(tokens) + n,
                              do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(tokens)
    out = []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out


def test_chat_template_is_the_models_own(engine: Engine) -> None:
    prompt = engine.chat_prompt(MESSAGES)
    assert prompt.startswith("<|im_start|>system")
    assert "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_greedy_is_token_identical_to_the_raw_loop(engine: Engine) -> None:
    tokens = engine.encode(engine.chat_prompt(MESSAGES))
    ours = [i.token for i in engine.generate(tokens, Sampling(max_tokens=48, ignore_eos=True))
            if isinstance(i, Delta)]
    assert ours == raw_loop(engine, tokens, 48)


def test_finish_reasons_and_usage(engine: Engine) -> None:
    tokens = engine.encode(engine.chat_prompt(MESSAGES))
    items = list(engine.generate(tokens, Sampling(max_tokens=5)))
    fin = items[-1]
    assert isinstance(fin, Finish)
    assert fin.reason == "length"
    assert fin.completion_tokens == 5 == len(items) - 1
    assert fin.prompt_tokens == len(tokens)
    assert engine.active == 0


def test_cancel_stops_within_one_step(engine: Engine) -> None:
    tokens = engine.encode(engine.chat_prompt(MESSAGES))
    cancel = threading.Event()
    deltas = 0
    for item in engine.generate(tokens, Sampling(max_tokens=200, ignore_eos=True), cancel):
        if isinstance(item, Delta):
            deltas += 1
            if deltas == 3:
                cancel.set()
        else:
            assert item.reason == "cancelled"
    assert deltas <= 4
    assert engine.active == 0


def test_min_tokens_and_sampling_parameters(engine: Engine) -> None:
    tokens = engine.encode(engine.chat_prompt([{"role": "user", "content": "Say hi."}]))
    fin = list(engine.generate(tokens, Sampling(max_tokens=40, min_tokens=30, temperature=0.7,
                                                top_p=0.9, top_k=40,
                                                repetition_penalty=1.1)))[-1]
    assert isinstance(fin, Finish)
    assert fin.completion_tokens >= 30


def test_batch_runs_sequences_together(engine: Engine) -> None:
    prompts = [engine.encode(engine.chat_prompt([{"role": "user", "content": q}]))
               for q in ("Name a fruit.", "Name a river.", "Name a city.")]
    seqs = [engine.start(p, Sampling(max_tokens=8, ignore_eos=True)) for p in prompts]
    assert engine.active == 3
    finished = {}
    while engine.active:
        for seq, item in engine.step():
            if isinstance(item, Finish):
                finished[id(seq)] = item
    assert {id(s) for s in seqs} == set(finished)
    assert all(f.completion_tokens == 8 for f in finished.values())


@pytest.mark.parametrize(("pieces", "stops", "expected", "hit"), [
    (["Hello", " wor", "ld"], ["world"], "Hello ", True),
    (["a", "b", "c"], ["x"], "abc", False),
    (["ab", "cSTO", "P tail"], ["STOP"], "abc", True),
    (["The end"], [], "The end", False),
])
def test_stop_matcher(pieces: list[str], stops: list[str], expected: str, hit: bool) -> None:
    m = StopMatcher(stops)
    out, was_hit = "", False
    for p in pieces:
        text, was_hit = m.feed(p)
        out += text
        if was_hit:
            break
    if not was_hit:
        out += m.flush()
    assert (out, was_hit) == (expected, hit)
