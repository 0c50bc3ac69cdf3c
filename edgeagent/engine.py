"""The engine: the one module that owns ``og.Model`` and its tokenizer.

It formats chats with the model's own chat template, turns sampling parameters into
onnxruntime-genai search options, and generates token by token. The scheduler drives it;
transports never touch it.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from collections.abc import Sequence as SequenceT
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime_genai as og
import structlog

from edgeagent.planner import Plan, genai_overlay

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Sampling:
    """What a request asks of the sampler. ``temperature`` 0 means greedy."""

    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass
class Delta:
    """One generated token: its id and the text it completes (possibly empty)."""

    token: int
    text: str


@dataclass
class Finish:
    """The end of a sequence. ``tail`` is text held back for a stop string that never came."""

    reason: str  # "stop", "length", "cancelled" or "error"
    prompt_tokens: int
    completion_tokens: int
    tokens: list[int] = field(default_factory=list)
    tail: str = ""


class StopMatcher:
    """Holds back text that could still grow into a stop string.

    ``feed`` returns the text that is safe to emit, and whether a stop string was hit
    (the stop string itself is never emitted, as in OpenAI's API).
    """

    def __init__(self, stops: SequenceT[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""
        self._hold = max((len(s) for s in self._stops), default=1) - 1

    def feed(self, text: str) -> tuple[str, bool]:
        if not self._stops:
            return text, False
        self._pending += text
        cut = min((i for s in self._stops if (i := self._pending.find(s)) >= 0), default=-1)
        if cut >= 0:
            out, self._pending = self._pending[:cut], ""
            return out, True
        safe = len(self._pending) - self._hold
        # Emit everything that cannot be the start of a stop string.
        for start in range(max(safe, 0), len(self._pending)):
            tail = self._pending[start:]
            if any(s.startswith(tail) for s in self._stops):
                out, self._pending = self._pending[:start], self._pending[start:]
                return out, False
        out, self._pending = self._pending, ""
        return out, False

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out


@dataclass(eq=False)
class Sequence:
    """One request's turn inside the onnxruntime-genai engine."""

    request: Any
    turn_id: int
    prompt_tokens: int
    sampling: Sampling
    stream: Any
    stops: StopMatcher
    produced: list[int] = field(default_factory=list)
    stopped_by_string: bool = False
    finished: bool = False


Event = tuple[Sequence, "Delta | Finish"]

_TOKEN = int(og.EngineEventFlags.TOKEN)
_FINISHED = int(og.EngineEventFlags.TURN_FINISHED)
_FAILED = int(og.EngineEventFlags.FAILED)
_REASONS = {
    og.FinishReason.EOS: "stop",
    og.FinishReason.STOP_STRING: "stop",
    og.FinishReason.MAX_GENERATED_TOKENS: "length",
    og.FinishReason.MAX_SESSION_TOKENS: "length",
    og.FinishReason.CANCELLED: "cancelled",
    og.FinishReason.FAILED: "error",
}


class Engine:
    """An onnxruntime-genai model loaded under a plan, batching with ``og.Engine``.

    With a CPU model, ``og.Engine`` batches statically: the sequences pending when a batch
    starts run together (up to ``capacity``); later ones wait for the next batch (see
    docs/engine-notes.md). Everything here runs on the scheduler's thread.
    """

    def __init__(self, model_path: Path, plan: Plan) -> None:
        self.path = model_path
        self.plan = plan
        config = og.Config(str(model_path))
        config.overlay(json.dumps(genai_overlay(plan)))
        self.model = og.Model(config)
        self.tokenizer = og.Tokenizer(self.model)
        self.eos_ids: frozenset[int] = frozenset(int(t) for t in self.tokenizer.eos_token_ids)
        self._engine: Any = None  # og.Engine, created on the thread that runs it
        self._capacity = 0
        self._buffer: Any = None
        self._live: dict[int, Sequence] = {}

    # ------------------------------------------------------------------ text
    def chat_prompt(
        self, messages: SequenceT[dict[str, Any]], tools: SequenceT[dict[str, Any]] | None = None
    ) -> str:
        """The model's own chat template, with the generation prompt appended."""
        return str(
            self.tokenizer.apply_chat_template(
                json.dumps(list(messages)),
                tools=json.dumps(list(tools)) if tools else None,
                add_generation_prompt=True,
            )
        )

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text), dtype=np.int32)

    def decode(self, tokens: SequenceT[int] | np.ndarray) -> str:
        return str(self.tokenizer.decode(np.asarray(tokens, dtype=np.int32)))

    # ------------------------------------------------------------ generation
    @property
    def active(self) -> int:
        return len(self._live)

    def _bind(self) -> Any:
        """Create the og.Engine on the calling thread: it must be driven from there only."""
        if self._engine is None:
            self._engine = og.Engine(self.model)
            caps = self._engine.get_capabilities()
            engine_cap = int(caps.configured_max_batch_size) or self.plan.max_batch
            self._capacity = max(1, min(self.plan.max_batch, engine_cap))
            self._buffer = self._engine.create_event_buffer(max(64, self._capacity * 4))
        return self._engine

    @property
    def capacity(self) -> int:
        """Sequences the batch holds; call from the thread that drives the engine."""
        self._bind()
        return self._capacity

    @property
    def capacity_hint(self) -> int:
        """The capacity for other threads (the plan's until the engine is bound)."""
        return self._capacity or self.plan.max_batch

    def start(
        self,
        prompt_tokens: np.ndarray,
        sampling: Sampling,
        guidance: tuple[str, str] | None = None,
    ) -> Sequence:
        """Add a sequence to the running batch; its tokens come out of ``step()``."""
        max_new = max(1, min(sampling.max_tokens, self.plan.context_length - len(prompt_tokens)))
        request = self._bind().create_request()
        opts = og.TurnOptions(request)
        opts.set_max_generated_tokens(max_new)
        opts.set_do_sample(not sampling.greedy)
        if not sampling.greedy:
            opts.set_temperature(sampling.temperature)
            opts.set_top_p(sampling.top_p)
            opts.set_top_k(sampling.top_k)
        if sampling.repetition_penalty != 1.0:
            opts.set_repetition_penalty(sampling.repetition_penalty)
        if sampling.ignore_eos:
            opts.set_min_generated_tokens(max_new)
        elif sampling.min_tokens:
            opts.set_min_generated_tokens(min(max_new, sampling.min_tokens))
        if guidance is not None:
            opts.set_guidance(*guidance)
        try:
            turn = int(request.begin_turn(prompt_tokens, opts))
        except Exception:
            request.close()
            raise
        seq = Sequence(request, turn, len(prompt_tokens), sampling,
                       self.tokenizer.create_stream(), StopMatcher(sampling.stop))
        self._live[id(request)] = seq
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop a sequence; its Finish("cancelled") comes out of the next ``step()``."""
        if not seq.finished:
            seq.request.cancel_turn(seq.turn_id)

    def step(self) -> list[Event]:
        """Run one engine step: a token (or a prefill) for every live sequence."""
        out: list[Event] = []
        if not self._live:
            return out
        for ev in self._engine.run(self._buffer):
            seq = self._live.get(id(ev.request))
            if seq is None or seq.finished:
                continue
            flags = int(ev.flags)
            if flags & _TOKEN and not seq.stopped_by_string:
                token = int(ev.token)
                if token not in self.eos_ids or seq.sampling.ignore_eos:
                    seq.produced.append(token)
                    text, hit = seq.stops.feed(seq.stream.decode(token))
                    out.append((seq, Delta(token, text)))
                    if hit:
                        seq.stopped_by_string = True
                        seq.request.cancel_turn(seq.turn_id)
            if flags & (_FINISHED | _FAILED):
                out.append((seq, self._finish(seq, ev, flags)))
        return out

    def _finish(self, seq: Sequence, ev: Any, flags: int) -> Finish:
        seq.finished = True
        del self._live[id(seq.request)]
        reason = "stop" if seq.stopped_by_string else _REASONS.get(ev.finish_reason, "stop")
        if flags & _FAILED:
            reason = "error"
            log.error("sequence failed in the engine", error_code=str(ev.error_code))
        tail = "" if seq.stopped_by_string else seq.stops.flush()
        seq.request.close()
        return Finish(reason, seq.prompt_tokens, len(seq.produced), seq.produced, tail)

    def generate(
        self,
        prompt_tokens: np.ndarray,
        sampling: Sampling,
        cancel: threading.Event | None = None,
        guidance: tuple[str, str] | None = None,
    ) -> Iterator[Delta | Finish]:
        """One sequence on its own, token by token (``edgeagent ask --local``, the bench)."""
        seq = self.start(prompt_tokens, sampling, guidance)
        while True:
            if cancel is not None and cancel.is_set():
                self.cancel(seq)
            for _, item in self.step():
                yield item
                if isinstance(item, Finish):
                    return
