"""The prompt (prefix) cache: idle batch-1 generators kept for the KV cache they hold.

onnxruntime-genai 0.18 keeps a generator's KV cache between ``append_tokens`` calls and
``rewind_to(n)`` truncates it to its first ``n`` tokens (batch_size 1 only: a batch can
only rewind to 0). So a finished sequence's generator still holds the KV of its prompt and
answer; a later prompt that starts with the same tokens (a system prompt, tool definitions,
a chat's earlier turns) takes it, rewinds to the common length and appends only the rest.

Entries are keyed by their token ids; a prompt takes the entry sharing its longest prefix,
if that is at least ``MIN_PREFIX_TOKENS`` long. A taken entry leaves the cache (its
generator runs the new sequence) and comes back when that sequence ends, holding the new
tokens. Every entry costs the same: a generator allocates its KV cache for its whole
``max_length`` when it is created (measured: +180 MB of RSS at 4096 tokens for
SmolLM2-135M, before any token), and cached generators are made for the full context so
that any request fits. So the byte budget is a number of entries, and the least recently
used one goes first. Creating such a generator costs ~50 ms of CPU (the allocation is
zero-filled), so a prompt that matches nothing, with the cache full, takes the least recently
used generator rewound to 0 (it would be evicted when the new one comes back anyway) rather
than a new one.

Nor is a generator pushed out of the cache freed while the plan's KV budget has room for it:
it stays, emptied, as a spare for the next prompt that matches nothing. Freed, its memory
goes back to the system, and the next generator faults fresh memory in on the scheduler's
thread: 70 ms alone, 250 ms beside running batches, a stall of every running request
(measured with 4 clients arriving at random; docs/engine-notes.md). The engine says how
many spares its budget holds (``spare_room``: the sequences of ``max_batch`` not running),
and makes them (``Engine.prepare``) when the model is loaded and again while idle, after a
batch of several rows took their room: no request waits for a new generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: A shorter match is not worth its entry: taking it would replace a long cached prompt
#: (another client's system prompt) with this one for the saving of a few tokens.
MIN_PREFIX_TOKENS = 32
#: Prompt tokens always fed again, however much is cached. Appending one token alone takes
#: onnxruntime's decode path (MatMulNBits with one row), whose logits differ from the
#: prompt path's by up to ~0.8 here; from two tokens on, a rewound generator's logits are
#: bit-identical to a fresh prefill's, so an answer does not depend on the cache.
REFEED_TOKENS = 2


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


@dataclass(eq=False)
class _Entry:
    tokens: np.ndarray  # the tokens whose KV the generator holds, in order
    generator: Any


@dataclass(frozen=True)
class Hit:
    """A cached generator for a prompt, rewound to the ``reused`` tokens it shares."""

    generator: Any
    reused: int


class PrefixCache:
    """At most ``budget_bytes // entry_bytes`` idle generators, least recently used first."""

    def __init__(self, budget_bytes: int, entry_bytes: int) -> None:
        self.entry_bytes = entry_bytes
        self.capacity = budget_bytes // entry_bytes if entry_bytes > 0 else 0
        self._entries: list[_Entry] = []  # oldest first
        self._spares: list[Any] = []  # emptied generators, kept for prompts matching nothing

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    @property
    def entries(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        """Memory the cached prompts hold."""
        return len(self._entries) * self.entry_bytes

    @property
    def spares(self) -> int:
        """Emptied generators kept (their memory is the running sequences' budget)."""
        return len(self._spares)

    def _best(self, prompt: np.ndarray) -> tuple[_Entry | None, int]:
        """The entry sharing the longest prefix with ``prompt``, and how many tokens it
        can reuse: all but the prompt's last REFEED_TOKENS at most."""
        best: _Entry | None = None
        reused = 0
        for entry in self._entries:
            n = min(common_prefix(entry.tokens, prompt), len(prompt) - REFEED_TOKENS)
            if n > reused:
                best, reused = entry, n
        return (best, reused) if reused >= MIN_PREFIX_TOKENS else (None, 0)

    def hits(self, prompt: np.ndarray) -> bool:
        """Whether ``prompt`` would take a cached generator."""
        return self._best(prompt)[0] is not None

    def take(self, prompt: np.ndarray) -> Hit | None:
        """The best cached generator for ``prompt``, out of the cache and rewound to the
        tokens it shares; None when no entry shares MIN_PREFIX_TOKENS."""
        entry, reused = self._best(prompt)
        if entry is None:
            return None
        self._entries.remove(entry)
        entry.generator.rewind_to(reused)
        return Hit(entry.generator, reused)

    def blank(self) -> Any | None:
        """An emptied generator for a prompt that matched nothing: a spare, or with the cache
        full its least recently used entry (rewound to 0); None: make a new one."""
        if self._spares:
            return self._spares.pop()
        if not self.enabled or len(self._entries) < self.capacity:
            return None
        entry = self._entries.pop(0)
        entry.generator.rewind_to(0)
        return entry.generator

    def put(self, tokens: np.ndarray, generator: Any, spare_room: int) -> None:
        """Keep ``generator``, whose KV cache holds ``tokens``. The least recently used
        entries beyond the capacity, and a generator holding too few tokens to be worth an
        entry, stay as spares while fewer than ``spare_room`` are kept; the rest are freed
        (their KV cache with them)."""
        if not self.enabled:
            return
        if len(tokens) < MIN_PREFIX_TOKENS:
            self._keep_spare(generator, spare_room)
            return
        self._entries.append(_Entry(np.asarray(tokens, dtype=np.int32), generator))
        while len(self._entries) > self.capacity:
            self._keep_spare(self._entries.pop(0).generator, spare_room)

    def add_spare(self, generator: Any) -> None:
        """Keep a new, empty generator as a spare."""
        self._spares.append(generator)

    def _keep_spare(self, generator: Any, spare_room: int) -> None:
        if len(self._spares) < spare_room:
            generator.rewind_to(0)
            self._spares.append(generator)

    def trim_spares(self, spare_room: int) -> None:
        """Free the spares beyond ``spare_room`` (a batch of its own is about to run)."""
        del self._spares[max(0, spare_room):]

    def clear(self) -> None:
        self._entries.clear()
        self._spares.clear()
