"""What the scheduler and the serving interface see of an engine, without a model.

In-process tests of failure paths take milliseconds with it: a step can be held on a gate,
a sequence lost or a step failed on demand, and each engine has a tokenizer of its own.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence as SequenceT
from typing import Any

import numpy as np

from edgeagent.engine import Delta, Finish, Sampling, Sequence, StopMatcher
from edgeagent.planner import Plan
from edgeagent.prefix_cache import PrefixCache
from edgeagent.scheduler import Item, JobError

#: A guidance the fake engine drops without a Finish, as the engine once did.
LOSE = ("lose", "")
#: A guidance that makes the step holding it raise, as a failing onnxruntime-genai run.
FAIL = ("fail", "")


def fake_plan(max_batch: int = 4, context_length: int = 1024,
              max_prompt_tokens: int = 512) -> Plan:
    """A plan without a model or a probe: no memory to account for."""
    return Plan(threads=1, context_length=context_length, max_batch=max_batch,
                provider="cpu", max_prompt_tokens=max_prompt_tokens,
                available_bytes=2**30, weights_bytes=0, kv_bytes_per_token=0, kv_bytes=0,
                prefill_chunk=256, logits_bytes=0, attention_bytes=0, headroom_bytes=0,
                total_bytes=0)


class FakeEngine:
    """Every step gives each held sequence a token until its max_tokens, as the engine
    does. Its tokenizer is its own: token ids are ``base`` + the code point, so tokens made
    by another engine's tokenizer read as nonsense here; the first token's text is
    ``"{name}:{the prompt as this engine reads it}"``, the others ``"x"``.

    A step waits on ``gate`` (set ``stepping`` first); a cancel ends with
    Finish("cancelled") at the next step; a sequence with the LOSE guidance is dropped
    without a Finish; a step holding one with the FAIL guidance raises. ``messages`` are
    the last ones its chat template got.
    """

    def __init__(self, the_plan: Plan | None = None, name: str = "fake", base: int = 0
                 ) -> None:
        self.plan = the_plan or fake_plan()
        self.name = name
        self.base = base
        self.capacity = max(1, self.plan.max_batch)
        self.prefix_cache = PrefixCache(0, 0)  # off: the fake has no KV to keep
        self.held: list[Sequence] = []
        self.gate = threading.Event()
        self.gate.set()
        self.stepping = threading.Event()
        self.messages: list[dict[str, Any]] = []

    @property
    def active(self) -> int:
        return len(self.held)

    # ------------------------------------------------------------------ text
    def encode(self, text: str) -> np.ndarray:
        return np.asarray([self.base + ord(c) for c in text], dtype=np.int32)

    def chat_tokens(self, messages: SequenceT[dict[str, Any]],
                    tools: SequenceT[dict[str, Any]] | None = None) -> np.ndarray:
        self.messages = list(messages)
        return self.encode("".join("".join(m["content"]) for m in messages))

    def read(self, tokens: np.ndarray) -> str:
        """``tokens`` as this engine's tokenizer reads them."""
        return "".join(chr(t - self.base) if 0 <= t - self.base < 0x110000 else "?"
                       for t in np.asarray(tokens).tolist())

    def check_guidance(self, guidance: tuple[str, str], sampling: Sampling) -> None:
        """Every grammar is accepted (the real one compiles it)."""

    # ------------------------------------------------------------ generation
    def start(self, prompt: np.ndarray, sampling: Sampling,
              guidance: tuple[str, str] | None = None) -> Sequence:
        seq = Sequence(np.asarray(prompt), sampling, guidance, max(1, sampling.max_tokens),
                       None, StopMatcher(()), np.random.default_rng(0))
        self.held.append(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        seq.cancel_requested = True

    def holds(self, seq: Sequence) -> bool:
        return seq in self.held

    def prepare(self) -> bool:
        return False  # nothing to make ahead: no KV cache

    def step(self) -> list[tuple[Sequence, Delta | Finish]]:
        self.stepping.set()
        if not self.gate.wait(60):
            raise TimeoutError("the test never released the step")
        if any(seq.guidance == FAIL for seq in self.held):
            self.held.clear()  # the batch is gone with its generator
            raise RuntimeError("the fake engine failed a step")
        out: list[tuple[Sequence, Delta | Finish]] = []
        for seq in list(self.held):
            if seq.guidance == LOSE:
                self.held.remove(seq)
            elif seq.cancel_requested:
                self.held.remove(seq)
                out.append((seq, Finish("cancelled", len(seq.prompt), len(seq.produced))))
            else:
                out.extend(self._token(seq))
        return out

    def _token(self, seq: Sequence) -> list[tuple[Sequence, Delta | Finish]]:
        text = f"{self.name}:{self.read(seq.prompt)}" if not seq.produced else "x"
        seq.produced.append(self.base + ord("x"))
        out: list[tuple[Sequence, Delta | Finish]] = [(seq, Delta(seq.produced[-1], text))]
        if len(seq.produced) >= seq.max_new:
            self.held.remove(seq)
            out.append((seq, Finish("length", len(seq.prompt), len(seq.produced))))
        return out


class Collector:
    """A job's sink: the items, and an event once the last one (Finish or JobError) has
    come; tests wait on it, never on time."""

    def __init__(self) -> None:
        self.items: list[Item] = []
        self.done = threading.Event()

    def sink(self, item: Item) -> None:
        self.items.append(item)
        if isinstance(item, (Finish, JobError)):
            self.done.set()

    def final(self, timeout: float = 60.0) -> Item:
        assert self.done.wait(timeout), f"no answer within {timeout}s: {self.items}"
        return self.items[-1]

    def text(self) -> str:
        return "".join(i.text for i in self.items if isinstance(i, Delta))
