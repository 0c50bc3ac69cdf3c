"""Grammars for guided rows, applied in the engine's own logits path with llguidance.

A guidance is ``(kind, text)``: ``json_schema`` (a JSON schema, its ``x-guidance`` options
included), ``regex`` or ``lark_grammar``. llguidance compiles it against the model's
vocabulary into an ``LLMatcher``; each guided sequence gets its own copy, which gives the
tokens allowed at each step (a bitmask: the engine sets the others' logits to -inf before
the draw) and consumes each token sampled.

The vocabulary comes from the model folder's ``tokenizer.json`` (its text, parsed by
llguidance's own Rust tokenizers: no transformers at run time). Building it costs ~0.35 s
of CPU, once per engine. Compiling a grammar costs well under a millisecond for the
schemas the protocol makes; each compiled grammar is kept by its text (the most recent
``GRAMMAR_CACHE``) and copied for a sequence, so a repeated schema is compiled once.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import llguidance
import numpy as np

#: Compiled grammars kept (each key is a guidance's kind and text).
GRAMMAR_CACHE = 256

#: llguidance's name for each kind of guidance (onnxruntime-genai's names, kept).
FORMATS: dict[str, llguidance.GrammarFormat] = {
    "json_schema": "json_schema",
    "regex": "regex",
    "lark_grammar": "lark",
}


class GuidanceError(ValueError):
    """llguidance refused a grammar (the message says why)."""


class Grammars:
    """Compiled grammars over one model's vocabulary, shared by threads (the transports'
    admission checks, the scheduler's sequences)."""

    def __init__(self, tokenizer_json: Path, vocab_size: int, eos_ids: Sequence[int]) -> None:
        self._tokenizer = llguidance.LLTokenizer(
            tokenizer_json.read_text(encoding="utf-8"), n_vocab=vocab_size or None,
            eos_token=list(eos_ids))
        self._lock = threading.Lock()
        self._compiled: OrderedDict[tuple[str, str], llguidance.LLMatcher] = OrderedDict()

    def _compiled_matcher(self, kind: str, text: str) -> llguidance.LLMatcher:
        key = (kind, text)
        with self._lock:
            if key in self._compiled:
                self._compiled.move_to_end(key)
                return self._compiled[key]
        fmt = FORMATS.get(kind)
        if fmt is None:
            raise GuidanceError(f"unknown guidance kind {kind!r} (one of {sorted(FORMATS)})")
        try:
            grammar = llguidance.grammar_from(fmt, text)
        except ValueError as exc:
            raise GuidanceError(str(exc)) from exc
        matcher = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GuidanceError(matcher.get_error())
        with self._lock:
            self._compiled[key] = matcher
            if len(self._compiled) > GRAMMAR_CACHE:
                self._compiled.popitem(last=False)
        return matcher

    def check(self, kind: str, text: str) -> None:
        """Raise GuidanceError when llguidance refuses this grammar; compiles it (once)."""
        self._compiled_matcher(kind, text)

    def matcher(self, kind: str, text: str) -> llguidance.LLMatcher:
        """A matcher of its own for one sequence, at the grammar's start."""
        compiled = self._compiled_matcher(kind, text)
        with self._lock:  # a copy is not taken while another thread copies the same one
            return compiled.deep_copy()

    @property
    def compiled(self) -> int:
        """Grammars compiled and kept."""
        return len(self._compiled)


def mask_logits(matcher: llguidance.LLMatcher, row: np.ndarray) -> None:
    """Set the logits of the tokens ``matcher`` forbids next to -inf, in place."""
    bits = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
    allowed = np.unpackbits(bits, bitorder="little")[: row.shape[0]].astype(bool)
    row[: allowed.shape[0]][~allowed] = -np.inf
    row[allowed.shape[0]:] = -np.inf
