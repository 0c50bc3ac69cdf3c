"""The engine: the one module that owns ``oga.Model`` and its tokenizer (onnxruntime-genai
through its C API, with the GIL released while the model runs: edgeagent/oga.py).

It formats chats with the model's own chat template, batches sequences on
``oga.Generator`` and samples token by token. The scheduler drives it from one thread;
transports never touch it.

Batching is static within a batch (docs/engine-notes.md): the sequences pending together
start together, up to ``capacity``. A sequence that arrives while batches run does not wait
for them: it starts a batch of its own at once, which takes the next step; then the batches
take one step each in turn (round robin), so its prefill and first token wait for one
batch's step, not for the others to end. A batch is one
``oga.Generator`` whose rows are the prompts, left-padded with the pad token. Its search is
greedy; a row that asks for more (temperature, top_p, top_k, seed, repetition, frequency
or presence penalty, min_tokens) has its logits rewritten with NumPy before the step, so each
request keeps its own sampling inside a shared batch; a row that asks for logprobs has its
logits read. A plain row costs nothing: no logits are copied out of the generator for it.
A guided row (a JSON schema, a regex or a Lark grammar: tools, response_format) is such a
row too: its grammar (llguidance, edgeagent/guidance.py) masks the tokens it forbids in the
same logits rewrite, before the row's own sampling, and consumes each token drawn; so it
batches with other rows and takes the prefix cache like any. A prompt longer than
``plan.prefill_chunk`` runs alone, fed one chunk per step: a prefill's memory is bounded
by the chunk, and a cancel lands between chunks. A row that draws with a seed runs alone
too, so that its arithmetic, and so its tokens, do not depend on the rows beside it.

With the prefix cache on (``plan.prefix_cache_bytes``, edgeagent/prefix_cache.py), a
sequence that runs alone gets a generator for the whole context: when it ends, the
generator goes to the cache with its KV, and a later prompt sharing a long prefix with it
runs on it, alone, from the end of that prefix.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from collections.abc import Sequence as SequenceT
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from edgeagent import oga
from edgeagent.guidance import Grammars, mask_logits
from edgeagent.guidance import GuidanceError as GuidanceError
from edgeagent.manifest import read_genai_config
from edgeagent.planner import Plan
from edgeagent.prefix_cache import PrefixCache

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
    #: OpenAI's penalties over the tokens generated so far: a token's logit is lowered by
    #: frequency_penalty times its count, and by presence_penalty once it has appeared.
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    #: None: no logprobs; k: each token's logprob and its k most likely alternatives.
    logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def rewrites_logits(self) -> bool:
        """Whether the engine must rewrite this sequence's logits (EOS aside)."""
        return (not self.greedy or self.repetition_penalty != 1.0
                or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0)


@dataclass(frozen=True)
class TokenLogprob:
    """A token's text, its UTF-8 bytes and its log-probability under the model's own
    distribution at that step (the raw logits: before penalties, temperature or masks).
    A token that is only part of a character decodes to U+FFFD."""

    token: str
    bytes: list[int]
    logprob: float


@dataclass(frozen=True)
class Logprob:
    """The logprob of a token generated, and the ``top`` most likely ones at its step."""

    chosen: TokenLogprob
    top: list[TokenLogprob]


@dataclass
class Delta:
    """Generated tokens: the last one's id, the text they complete (possibly empty), their
    logprobs when asked, and the choice (``index``) they belong to."""

    token: int
    text: str
    logprobs: list[Logprob] = field(default_factory=list)
    index: int = 0


@dataclass
class Finish:
    """The end of a sequence. ``tail`` is text held back for a stop string that never came;
    ``error`` says what failed when ``reason`` is "error"."""

    reason: str  # "stop", "length", "cancelled" or "error"
    prompt_tokens: int
    completion_tokens: int
    tokens: list[int] = field(default_factory=list)
    tail: str = ""
    error: str = ""
    index: int = 0  # the choice it ends
    #: Prompt tokens whose KV came from the prefix cache (not prefilled again).
    cached_tokens: int = 0


class Plain(str):
    """Client text in a chat: tokenized as text, so that a control-token string in it
    (``<|im_end|>``) stays text and cannot close its turn or open a system one."""


#: Given a guided answer's text so far, the tokens it has used and the tokens it has left:
#: the text that ends it now (appended as the Finish's tail), or None to go on.
Closer = Callable[[str, int, int], "str | None"]


class Guidance(tuple[str, str]):
    """A grammar, ``(kind, text)`` (edgeagent/guidance.py: json_schema, regex or
    lark_grammar), that may also know when its answer is complete before the grammar says
    so (``closer``): the grammar cannot express "no repeated item" or "close before
    max_tokens", the text can.
    A plain ``(kind, text)`` tuple is a guidance without one."""

    closer: Closer | None

    def __new__(cls, kind: str, grammar: str, closer: Closer | None = None) -> Guidance:
        self = super().__new__(cls, (kind, grammar))
        self.closer = closer
        return self


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


#: Top-p sampling sorts only this many of the most likely tokens (all of them when these
#: do not reach top_p).
TOP_P_CANDIDATES = 1024


def _draw(weights: np.ndarray, rng: np.random.Generator) -> int:
    """An index drawn in proportion to ``weights`` (inverse CDF: cheaper than rng.choice)."""
    cum = np.cumsum(weights)
    return min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), len(cum) - 1)


def sample_token(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """Draw a token from one row of logits with temperature, top_k and top_p."""
    x = logits.astype(np.float64) / max(sampling.temperature, 1e-6)
    x -= x.max()
    vocab = x.shape[0]
    top_k = sampling.top_k if 0 < sampling.top_k < vocab else 0
    if not top_k and sampling.top_p >= 1.0:
        return _draw(np.exp(x), rng)
    total = 1.0 if top_k else float(np.exp(x).sum())
    for width in (top_k or min(TOP_P_CANDIDATES, vocab), vocab):
        cand = np.argpartition(x, vocab - width)[vocab - width:]
        cand = cand[np.argsort(-x[cand], kind="stable")]
        probs = np.exp(x[cand])
        mass = probs / (probs.sum() if top_k else total)
        cum = np.cumsum(mass)
        if top_k or cum[-1] >= sampling.top_p or width == vocab:
            keep = int(np.searchsorted(cum, sampling.top_p * cum[-1])) + 1
            return int(cand[_draw(probs[: min(keep, len(cand))], rng)])
    raise AssertionError("unreachable")  # pragma: no cover


@dataclass(eq=False)
class Sequence:
    """One request's generation: its prompt, sampling, and the tokens produced so far."""

    prompt: np.ndarray
    sampling: Sampling
    guidance: tuple[str, str] | None
    max_new: int
    stream: Any
    stops: StopMatcher
    rng: np.random.Generator
    produced: list[int] = field(default_factory=list)
    written: list[str] = field(default_factory=list)  # the text, kept for a closer only
    cancel_requested: bool = False
    finished: bool = False
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache
    #: The grammar's state (an llguidance.LLMatcher) for a guided sequence, once started.
    matcher: Any = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)

    @property
    def min_new(self) -> int:
        """Tokens to generate before EOS is allowed."""
        if self.sampling.ignore_eos:
            return self.max_new
        return min(self.max_new, self.sampling.min_tokens)


Event = tuple[Sequence, "Delta | Finish"]


@dataclass(eq=False)
class _Batch:
    """One ``oga.Generator`` and the sequences in its rows."""

    generator: oga.Generator
    rows: list[Sequence]
    prompt: np.ndarray  # (rows, padded prompt length), left-padded
    chunk: int
    #: The search blocks EOS itself (min_length): every row has the same min_new.
    native_min: bool = False
    fed: int = 0
    #: Its generator goes to the prefix cache when it ends (one row, the whole context).
    cacheable: bool = False
    #: A token was generated: the last one in the generator has no KV yet.
    generated: bool = False

    @property
    def prefilling(self) -> bool:
        return self.fed < int(self.prompt.shape[1])

    @property
    def done(self) -> bool:
        return all(seq.finished for seq in self.rows)

    def feed(self) -> int:
        """Append the next chunk of the prompt (all of it for a batch of several rows:
        onnxruntime-genai appends once when batch_size > 1); returns the prompt tokens it
        prefilled (padding aside)."""
        if len(self.rows) > 1:
            self.generator.append_tokens(self.prompt)
            self.fed = int(self.prompt.shape[1])
            return sum(seq.prompt_tokens for seq in self.rows)
        start, width = self.fed, int(self.prompt.shape[1])
        end = min(start + self.chunk, width)
        if width - end == 1:
            end -= 1  # a last chunk of one token would take the decode path (prefix_cache.py)
        self.generator.append_tokens(np.ascontiguousarray(self.prompt[:, start:end]))
        self.fed = end
        return end - start

    def cached_tokens(self) -> np.ndarray:
        """The tokens whose KV its (one-row) generator holds."""
        tokens = np.asarray(self.generator.get_sequence(0), dtype=np.int32)
        return tokens[:-1] if self.generated else tokens


def genai_overlay(plan: Plan) -> dict[str, Any]:
    """The plan as an onnxruntime-genai config overlay (``oga.Model``'s): threads and
    the sequence length its KV cache is allocated for.

    Idle intra-op threads sleep instead of spinning: a spinning pool burns a core between
    operators, which doubled the CPU per token at 2 threads, and on a gateway shared with
    other work it took the core the next operator needed (docs/engine-notes.md)."""
    return {
        "model": {
            "decoder": {"session_options": {"intra_op_num_threads": plan.threads,
                                            "session.intra_op.allow_spinning": "0"}},
        },
        "search": {"max_length": plan.context_length},
    }


class Engine:
    """An onnxruntime-genai model loaded under a plan, batching on ``oga.Generator``.

    Everything but the text helpers and ``check_guidance`` (the transports' admission
    check) runs on the scheduler's thread.
    """

    def __init__(self, model_path: Path, plan: Plan) -> None:
        self.path = model_path
        self.plan = plan
        self.model = oga.Model(model_path, genai_overlay(plan))
        self.tokenizer = oga.Tokenizer(self.model)
        self.eos_ids: frozenset[int] = frozenset(int(t) for t in self.tokenizer.eos_token_ids)
        self._eos = np.asarray(sorted(self.eos_ids), dtype=np.int64)
        genai = read_genai_config(model_path)["model"]
        pad = genai.get("pad_token_id")
        self.pad_id = int(pad) if isinstance(pad, int) else min(self.eos_ids, default=0)
        self.vocab_size = int(genai.get("vocab_size") or 0)
        self._control = _control_pattern(model_path)
        self._pending: list[Sequence] = []
        self._batches: list[_Batch] = []  # running, stepped in turn
        self.prefix_cache = PrefixCache(plan.prefix_cache_bytes, plan.prefix_cache_entry_bytes)
        #: Prompt tokens run through the model (a cached prefix is not counted again).
        self.prefilled_tokens = 0
        self._token_texts: dict[int, str] = {}  # bounded by the vocabulary
        # The grammars' view of the vocabulary (~0.35 s of CPU): built here, at load, not
        # inside the first guided request.
        self.grammars = Grammars(model_path / "tokenizer.json", self.vocab_size,
                                 sorted(self.eos_ids))
        self.check_guidance(("json_schema", '{"type": "object"}'), Sampling())

    # ------------------------------------------------------------------ text
    def chat_prompt(self, messages: SequenceT[dict[str, Any]]) -> str:
        """The model's own chat template, with the generation prompt appended. (Tools reach
        the model as a system note, protocol.py, not through the template.)"""
        return str(
            self.tokenizer.apply_chat_template(
                json.dumps(list(messages)), add_generation_prompt=True
            )
        )

    def chat_tokens(self, messages: SequenceT[dict[str, Any]]) -> np.ndarray:
        """The chat prompt's tokens, client text kept as text.

        A message's content is a string or a list of strings; :class:`Plain` ones are client
        text. The template is rendered with a placeholder for each, its own text is
        tokenized as usual (control tokens included) and each Plain text with
        :meth:`encode_plain`, so that no client text turns into a control token.
        """
        nonce = uuid.uuid4().hex  # unguessable: a client cannot forge a placeholder
        plain: list[str] = []

        def mark(part: str) -> str:
            if not isinstance(part, Plain):
                return part
            plain.append(part)
            return f"\ue000{nonce}:{len(plain) - 1}\ue001"

        rendered = [{**m, "content": "".join(mark(part) for part in _parts(m.get("content")))}
                    for m in messages]
        pieces = re.split(f"\ue000{nonce}:(\\d+)\ue001", self.chat_prompt(rendered))
        ids: list[int] = []
        for i, piece in enumerate(pieces):  # template, index of a Plain, template, ...
            ids.extend(self.encode_plain(plain[int(piece)]) if i % 2 else self.encode(piece))
        return np.asarray(ids, dtype=np.int32)

    def encode(self, text: str) -> np.ndarray:
        """Tokens of ``text``; control-token strings in it become control tokens."""
        if not text:
            return np.zeros(0, dtype=np.int32)
        return np.asarray(self.tokenizer.encode(text), dtype=np.int32)

    def encode_plain(self, text: str) -> list[int]:
        """Tokens of ``text`` as text: the tokenizer matches a control token only as a whole
        string within one call, so each one in ``text`` is encoded in two calls (its first
        character, then the rest)."""
        if self._control is None:
            return [int(t) for t in self.encode(text)]
        ids: list[int] = []
        pos = 0
        for match in self._control.finditer(text):
            ids.extend(int(t) for t in self.encode(text[pos:match.start()]))
            ids.extend(int(t) for t in self.encode(match.group()[0]))
            ids.extend(self.encode_plain(match.group()[1:]))
            pos = match.end()
        ids.extend(int(t) for t in self.encode(text[pos:]))
        return ids

    # ------------------------------------------------------------ guidance
    def check_guidance(self, guidance: tuple[str, str], sampling: Sampling) -> None:
        """Raise GuidanceError when llguidance refuses this grammar: the admission check, on
        the caller's thread. The grammar is compiled once per text (edgeagent/guidance.py)
        and the sequences that run under it take copies. ``sampling`` is the engine's own
        under a grammar as without one (the mask comes first): nothing in it is refused."""
        del sampling
        self.grammars.check(guidance[0], guidance[1])

    # ------------------------------------------------------------ generation
    @property
    def capacity(self) -> int:
        """Sequences a batch holds."""
        return max(1, self.plan.max_batch)

    @property
    def active(self) -> int:
        """Sequences started and not finished: pending, or in a running batch."""
        running = sum(not seq.finished for batch in self._batches for seq in batch.rows)
        return len(self._pending) + running

    def start(
        self,
        prompt_tokens: np.ndarray,
        sampling: Sampling,
        guidance: tuple[str, str] | None = None,
    ) -> Sequence:
        """Queue a sequence; it starts at the next ``step()``, where its tokens come out."""
        prompt = np.asarray(prompt_tokens, dtype=np.int32).reshape(-1)
        room = self.plan.context_length - len(prompt)
        if len(prompt) == 0 or room < 1:
            raise ValueError(
                f"a prompt of {len(prompt)} tokens does not fit the context length "
                f"{self.plan.context_length}"
            )
        seq = Sequence(prompt, sampling, guidance, max(1, min(sampling.max_tokens, room)),
                       self.tokenizer.create_stream(), StopMatcher(sampling.stop),
                       np.random.default_rng(None if sampling.seed is None
                                             else sampling.seed % 2**64))
        self._pending.append(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop a sequence; its Finish("cancelled") comes out of the next ``step()``."""
        seq.cancel_requested = True

    def holds(self, seq: Sequence) -> bool:
        """Whether ``seq`` is pending or in a running batch (its Finish still to come)."""
        in_batch = any(seq in batch.rows for batch in self._batches)
        return not seq.finished and (in_batch or seq in self._pending)

    def step(self) -> list[Event]:
        """One step of one running batch: a prefill chunk, or a token for each of its live
        sequences. The batches take turns (round robin); the sequences pending start first,
        as batches of their own, and a new batch takes the next turn: a newcomer waits for
        one batch's step, not for a step of every batch, before its prefill.

        A sequence whose grammar llguidance refuses, and a batch that cannot be formed or
        stepped (a failing run), finish their own sequences with "error"; the others are
        untouched.
        """
        out: list[Event] = []
        self._reap_cancelled(out)
        for seq in [s for s in self._pending if s.matcher is None]:
            if seq.guidance is None:
                continue
            try:
                seq.matcher = self.grammars.matcher(seq.guidance[0], seq.guidance[1])
            except Exception as exc:
                self._pending.remove(seq)
                out.extend(self._fail([seq], "the grammar was refused", exc))
        fresh: list[_Batch] = []
        while self._pending:
            rows = self._next_rows()
            for seq in rows:
                self._pending.remove(seq)
            try:
                fresh.append(self._form_batch(rows))
            except Exception as exc:
                out.extend(self._fail(rows, "could not start a batch", exc))
        self._batches[:0] = fresh  # the next turns: a newcomer's prefill comes first
        if not self._batches:
            return out
        batch = self._batches.pop(0)
        self._batches.append(batch)  # its next turn after every other batch's
        try:
            self._step_batch(batch, out)
        except Exception as exc:
            self._batches.remove(batch)  # frees the generator and its KV cache
            out.extend(self._fail(batch.rows, "a batch step failed", exc))
            return out
        if batch.done or batch.generator.is_done():
            out.extend((seq, self._finish(seq, "stop"))
                       for seq in batch.rows if not seq.finished)
            self._retire(batch)
        return out

    def _retire(self, batch: _Batch) -> None:
        """Drop a batch whose rows have all finished; a cacheable generator goes to the
        prefix cache with the KV of its prompt and answer."""
        self._batches.remove(batch)
        if batch.cacheable:
            self.prefix_cache.put(batch.cached_tokens(), batch.generator, self._spare_room())

    def prepare(self) -> bool:
        """Make one spare generator for the prefix cache when fewer are kept than the free
        sequence slots; the scheduler calls it while nothing waits. Returns whether it made
        one. Making one faults in its KV cache's memory (70 ms alone, 250 ms beside running
        batches, measured): done here, no request waits for it."""
        if (not self.prefix_cache.enabled or self._pending or self._batches
                or self.prefix_cache.spares >= self._spare_room()):
            return False
        self.prefix_cache.add_spare(self._full_context_generator())
        return True

    def _full_context_generator(self) -> oga.Generator:
        """A one-row generator for the whole context: its search options suit any prompt
        (greedy, no min_length; EOS is masked by the logits rewrite instead)."""
        params = oga.GeneratorParams(self.model)
        params.set_search_options(max_length=self.plan.context_length, batch_size=1,
                                  do_sample=False)
        return oga.Generator(self.model, params)

    def _spare_room(self) -> int:
        """Sequences of ``capacity`` that hold no KV cache now: the budget of the prefix
        cache's spare generators."""
        return self.capacity - len(self._pending) - sum(len(b.rows) for b in self._batches)

    def _step_batch(self, batch: _Batch, out: list[Event]) -> None:
        """Feed a prefill chunk or generate a token; events go to ``out`` as they come, so
        none is lost if a later row fails."""
        if batch.prefilling:
            self.prefilled_tokens += batch.feed()
            if batch.prefilling:
                return  # the next chunk comes with the next step
        dists = self._rewrite_logits(batch)
        batch.generator.generate_next_token()
        batch.generated = True
        tokens = batch.generator.get_next_tokens()
        for row, seq in enumerate(batch.rows):
            if not seq.finished:
                out.extend(self._accept(seq, int(tokens[row]), dists.get(row)))

    def _fail(self, rows: list[Sequence], what: str, exc: Exception) -> list[Event]:
        log.error(what, error=str(exc), sequences=len(rows))
        return [(seq, self._finish(seq, "error", error=f"{what}: {exc}"))
                for seq in rows if not seq.finished]

    def _reap_cancelled(self, out: list[Event]) -> None:
        for seq in [s for s in self._pending if s.cancel_requested]:
            self._pending.remove(seq)
            out.append((seq, self._finish(seq, "cancelled")))
        for batch in list(self._batches):
            for seq in batch.rows:
                if seq.cancel_requested and not seq.finished:
                    out.append((seq, self._finish(seq, "cancelled")))
            if batch.done:
                self._retire(batch)

    def _runs_alone(self, seq: Sequence) -> bool:
        """Longer than a prefill chunk, starting with a cached prompt, or drawing with a
        seed. A seed promises the same tokens whatever else runs, and the logits of a row
        may depend on the rows beside it: on some CPUs onnxruntime's 4-bit MatMulNBits
        rounds a one-row product differently from the same row in a larger one (an AVX2
        EPYC: 5e-7, enough to change a draw a few tokens later; docs/engine-notes.md)."""
        return (len(seq.prompt) > self.plan.prefill_chunk or self.prefix_cache.hits(seq.prompt)
                or (seq.sampling.seed is not None and not seq.sampling.greedy))

    def _next_rows(self) -> list[Sequence]:
        """The oldest pending sequence, and those that can share its batch."""
        first = self._pending[0]
        rows = [first]
        width, longest = len(first.prompt), first.max_new
        if not self._runs_alone(first):
            for seq in self._pending[1:]:
                if len(rows) >= self.capacity:
                    break
                w, n = max(width, len(seq.prompt)), max(longest, seq.max_new)
                if not self._runs_alone(seq) and w + n <= self.plan.context_length:
                    rows.append(seq)
                    width, longest = w, n
        return rows

    def _form_batch(self, rows: list[Sequence]) -> _Batch:
        """A generator for ``rows``, their prompts left-padded to the longest."""
        if len(rows) == 1 and self.prefix_cache.enabled:
            return self._cacheable_batch(rows[0])
        self.prefix_cache.trim_spares(self._spare_room() - len(rows))  # within the plan
        width = max(len(seq.prompt) for seq in rows)
        longest = max(seq.max_new for seq in rows)
        prompt = np.full((len(rows), width), self.pad_id, dtype=np.int32)
        for i, seq in enumerate(rows):
            prompt[i, width - len(seq.prompt):] = seq.prompt
        options: dict[str, Any] = {
            "max_length": width + longest,
            "batch_size": len(rows),
            "do_sample": False,
        }
        min_new = {seq.min_new for seq in rows}
        native_min = len(min_new) == 1  # rows agree: the search blocks EOS, no rewrite
        if native_min and (least := min_new.pop()) > 0:
            options["min_length"] = width + least
        params = oga.GeneratorParams(self.model)
        params.set_search_options(**options)
        generator = oga.Generator(self.model, params)
        return _Batch(generator, rows, prompt, self.plan.prefill_chunk, native_min)

    def _cacheable_batch(self, seq: Sequence) -> _Batch:
        """A one-row batch on a cached generator sharing a prefix with ``seq``'s prompt
        (rewound to it: only the rest is prefilled), on an emptied one, or on a new one for
        the whole context."""
        hit = self.prefix_cache.take(seq.prompt)
        if hit is not None:
            generator, seq.cached_tokens = hit.generator, hit.reused
        elif (generator := self.prefix_cache.blank()) is None:
            generator = self._full_context_generator()
        return _Batch(generator, [seq], seq.prompt[None, :], self.plan.prefill_chunk,
                      fed=seq.cached_tokens, cacheable=True)

    def _rewrite_logits(self, batch: _Batch) -> dict[int, np.ndarray]:
        """Apply each row's own sampling: penalties, EOS and grammar masks, then the draw.
        Returns the log-softmax of the raw logits of the rows that asked for logprobs, by
        row.

        Logits leave the generator only when a row needs them: a batch of plain rows
        steps exactly as before."""
        rewrite = [
            i for i, seq in enumerate(batch.rows) if not seq.finished and (
                seq.sampling.rewrites_logits or seq.matcher is not None
                or (not batch.native_min and len(seq.produced) < seq.min_new))]
        read = [i for i, seq in enumerate(batch.rows)
                if not seq.finished and seq.sampling.logprobs is not None]
        if not rewrite and not read:
            return {}
        logits = np.array(batch.generator.get_logits(), dtype=np.float32)
        dists = {i: _log_softmax(logits[i, -1]) for i in read}
        for i in rewrite:
            logits[i, -1] = self._rewrite(batch.rows[i], logits[i, -1])
        if rewrite:
            batch.generator.set_logits(logits)
        return dists

    def _rewrite(self, seq: Sequence, row: np.ndarray) -> np.ndarray:
        sampling = seq.sampling
        if sampling.repetition_penalty != 1.0:
            seen = np.unique(np.concatenate([seq.prompt, np.asarray(seq.produced, np.int32)]))
            values = row[seen]
            penalty = sampling.repetition_penalty
            row[seen] = np.where(values > 0, values / penalty, values * penalty)
        if (sampling.frequency_penalty or sampling.presence_penalty) and seq.produced:
            ids, counts = np.unique(np.asarray(seq.produced, np.int64), return_counts=True)
            row[ids] -= sampling.frequency_penalty * counts + sampling.presence_penalty
        if len(seq.produced) < seq.min_new:
            row[self._eos] = -np.inf
        if seq.matcher is not None:
            mask_logits(seq.matcher, row)
            if not np.isfinite(row).any():  # only EOS ends the grammar: it wins over min_tokens
                row[self._eos] = 0.0
        if sampling.greedy:
            return row  # the generator's greedy search takes the argmax
        token = sample_token(row, sampling, seq.rng)
        forced = np.full_like(row, -np.inf)
        forced[token] = 0.0
        return forced

    def _accept(self, seq: Sequence, token: int, dist: np.ndarray | None = None
                ) -> list[Event]:
        if token in self.eos_ids and len(seq.produced) >= seq.min_new:
            return [(seq, self._finish(seq, "stop"))]
        seq.produced.append(token)
        text, hit = seq.stops.feed(seq.stream.decode(token))
        logprobs = [] if dist is None else [self._logprob(dist, token, seq.sampling.logprobs)]
        out: list[Event] = [(seq, Delta(token, text, logprobs))]
        matcher = seq.matcher
        if matcher is not None and not matcher.consume_token(token):
            out.append((seq, self._finish(
                seq, "error", error=f"the grammar refused a token: {matcher.get_error()}")))
        elif hit:
            out.append((seq, self._finish(seq, "stop", stopped_by_string=True)))
        elif (closing := self._closing(seq, text)) is not None:
            out.append((seq, self._finish(seq, "stop", closing=closing)))
        elif matcher is not None and matcher.is_stopped():
            # The grammar allows nothing but EOS: the answer is whole, no step for it.
            out.append((seq, self._finish(seq, "stop")))
        elif len(seq.produced) >= seq.max_new:
            out.append((seq, self._finish(seq, "length")))
        return out

    def _closing(self, seq: Sequence, text: str) -> str | None:
        """The text that ends ``seq`` now, when its guidance has a closer that says so
        (checked before max_tokens: an answer that closes on its last token is whole)."""
        closer = seq.guidance.closer if isinstance(seq.guidance, Guidance) else None
        if closer is None:
            return None
        seq.written.append(text)
        used = len(seq.produced)
        return closer("".join(seq.written), used, seq.max_new - used)

    def _logprob(self, dist: np.ndarray, token: int, top: int | None) -> Logprob:
        """``token``'s logprob in ``dist`` and the ``top`` most likely tokens'."""
        k = min(top or 0, len(dist))
        best = np.argpartition(-dist, k)[:k] if k else np.zeros(0, dtype=np.int64)
        best = best[np.argsort(-dist[best], kind="stable")]
        return Logprob(self._token_logprob(dist, token),
                       [self._token_logprob(dist, int(t)) for t in best])

    def _token_logprob(self, dist: np.ndarray, token: int) -> TokenLogprob:
        text = self.token_text(token)
        return TokenLogprob(text, list(text.encode("utf-8")), float(dist[token]))

    def token_text(self, token: int) -> str:
        """One token's text on its own (cached: logprobs name the same tokens often)."""
        text = self._token_texts.get(token)
        if text is None:
            text = self._token_texts[token] = str(
                self.tokenizer.decode(np.asarray([token], dtype=np.int32)))
        return text

    def _finish(self, seq: Sequence, reason: str, stopped_by_string: bool = False,
                error: str = "", closing: str = "") -> Finish:
        seq.finished = True
        tail = "" if stopped_by_string or reason == "cancelled" else seq.stops.flush()
        tail += closing
        return Finish(reason, seq.prompt_tokens, len(seq.produced), seq.produced, tail, error,
                      cached_tokens=seq.cached_tokens)

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


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """The log-probabilities of one row of logits (float64: the small ones stay exact)."""
    x = logits.astype(np.float64)
    x -= x.max()
    out: np.ndarray = x - np.log(np.exp(x).sum())
    return out


def _parts(content: Any) -> list[str]:
    """A chat content as its parts: a string, a list of strings, or nothing."""
    if content is None:
        return []
    return list(content) if isinstance(content, list) else [content]


def _control_pattern(model_path: Path) -> re.Pattern[str] | None:
    """A pattern of the tokenizer's added tokens (``<|im_end|>``...), which its encoder
    matches as whole strings; None when the model folder lists none."""
    try:
        added = json.loads((model_path / "tokenizer.json").read_text())["added_tokens"]
        strings = {str(t["content"]) for t in added if t.get("content")}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not strings:
        return None
    # Longest first: the alternation takes the first that matches.
    return re.compile("|".join(re.escape(t) for t in sorted(strings, key=len, reverse=True)))
