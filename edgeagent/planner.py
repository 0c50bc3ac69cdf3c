"""The planner: threads, context length, batch and prompt limit for this machine and model.

:func:`plan` is pure (no I/O): it takes the probed :class:`~edgeagent.probe.Hardware`, the
model's :class:`ModelMeta` and the settings, and returns a :class:`Plan` whose every choice
carries its reason, or raises a :class:`PlanError` naming the numbers. The memory budget::

    weights + kv_bytes_per_token * context_length * max_batch + prefill + prefix cache
        + headroom <= available

where *prefill* is what one prefill step needs beyond the KV cache: its logits (a row per
sequence for a model with a pruned LM head, a row per chunk position otherwise) and the
attention scores of one chunk of ``prefill_chunk`` tokens against the whole context; and
*available* is the probe's effective available memory (MemAvailable, bounded by the
cgroup limit less the cgroup's working set), or the total when that is unknown. The KV cache
is counted at its full size up front: onnxruntime-genai's CPU GroupQueryAttention models
share one past/present buffer of ``max_length`` per sequence, allocated when a sequence starts.

The *prefix cache* (:func:`prefix_cache`) is idle batch-1 generators kept for their prompt's
KV cache, each allocated for the whole context: ``kv_bytes_per_token * context_length``
apiece. An explicit ``runtime.prefix_cache_mb`` is set aside before the context and batch
are sized; an automatic one takes whole entries out of what they leave spare. Either way the
full batch at the full context still fits beside a full cache.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgeagent.manifest import (
    GENAI_CONFIG_FILE,
    config_int,
    config_value,
    decoder_geometry,
    logits_last_position_only,
    manifest_kv_bytes,
)
from edgeagent.probe import Hardware, format_cpu_list
from edgeagent.settings import LimitsSettings, RuntimeSettings

MB = 2**20
GB = 2**30

#: Automatic context lengths are multiples of this.
CONTEXT_GRANULARITY = 256

#: Prefill runs in chunks of at most this many prompt tokens (docs/engine-notes.md): a long
#: prompt is fed a chunk per step, so what a prefill needs beyond the KV cache is bounded by
#: the chunk, not by the prompt.
PREFILL_CHUNK = 256
#: A model whose LM head is not pruned returns a float32 vocabulary row for every position
#: of a chunk; its chunk shrinks so that a batch's prefill logits stay within this.
FULL_LOGITS_BUDGET = 32 * 2**20
MIN_PREFILL_CHUNK = 16
LOGITS_BYTES_PER_ELEMENT = 4
#: Attention scores are float32: heads x chunk x context for the sequence being prefilled.
ATTENTION_BYTES_PER_ELEMENT = 4

#: File name endings counted as model weights.
WEIGHT_SUFFIXES = (".onnx", ".onnx.data", ".onnx_data", ".data", ".ort", ".bin")


class PlanError(Exception):
    """A model or a setting that cannot run on this machine; the message names the numbers."""


def _fmt(n: int | float) -> str:
    """Bytes as ``"1.6 GB"``, ``"900 MB"`` or ``"0.4 MB"`` (binary units)."""
    if abs(n) >= GB:
        return f"{n / GB:.1f} GB"
    if abs(n) >= 10 * MB or n == 0:
        return f"{round(n / MB)} MB"
    return f"{n / MB:.1f} MB"


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class ModelMeta:
    """What the planner needs to know about a model."""

    name: str
    num_hidden_layers: int
    num_key_value_heads: int
    head_size: int
    vocab_size: int
    #: The model's own context limit (genai_config ``model.context_length``).
    max_context: int
    weights_bytes: int
    #: Bytes per KV cache element: 4 for this model's float32 CPU cache.
    kv_bytes_per_element: int = 4
    #: Query heads (attention scores during prefill); 0: as many as the KV heads.
    num_attention_heads: int = 0
    #: The model returns logits for the last position only (a pruned LM head).
    last_logits_only: bool = False

    def __post_init__(self) -> None:
        for name in (
            "num_hidden_layers",
            "num_key_value_heads",
            "head_size",
            "vocab_size",
            "max_context",
            "kv_bytes_per_element",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PlanError(
                    f"model {self.name}: {name} must be a positive integer, got {value!r}"
                )
        if self.weights_bytes < 0:
            raise PlanError(f"model {self.name}: weights_bytes must be >= 0")

    @property
    def attention_heads(self) -> int:
        return self.num_attention_heads or self.num_key_value_heads

    @property
    def kv_bytes_per_token(self) -> int:
        """Keys and values of every layer for one token of one sequence."""
        return (
            2
            * self.num_hidden_layers
            * self.num_key_value_heads
            * self.head_size
            * self.kv_bytes_per_element
        )

    @classmethod
    def from_folder(cls, path: Path) -> ModelMeta:
        """Read ``genai_config.json`` (and ``edgeagent-manifest.json`` when present), with
        manifest.py's readers: the one place that knows those files."""
        config_path = path / GENAI_CONFIG_FILE
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise PlanError(
                f"{config_path} does not exist: not an onnxruntime-genai model folder"
            ) from exc
        except (OSError, ValueError) as exc:
            raise PlanError(f"{config_path} cannot be read: {exc}") from exc
        try:
            geometry = decoder_geometry(config)
            vocab_size = config_int(config, "model", "vocab_size")
            max_context = config_int(config, "model", "context_length")
        except ValueError as exc:
            raise PlanError(f"{config_path}: {exc}") from exc
        try:
            kv_bytes = manifest_kv_bytes(path) or 4
        except ValueError as exc:
            raise PlanError(str(exc)) from exc
        model_type = config_value(config, "model", "type")
        return cls(
            name=model_type if isinstance(model_type, str) and model_type else path.name,
            num_hidden_layers=geometry.num_hidden_layers,
            num_key_value_heads=geometry.num_key_value_heads,
            head_size=geometry.head_size,
            vocab_size=vocab_size,
            max_context=max_context,
            weights_bytes=_weights_bytes(path),
            kv_bytes_per_element=kv_bytes,
            num_attention_heads=geometry.num_attention_heads,
            last_logits_only=logits_last_position_only(path, config),
        )


def _weights_bytes(path: Path) -> int:
    total = 0
    for entry in path.iterdir():
        if entry.name.endswith(WEIGHT_SUFFIXES) and entry.is_file():
            total += entry.stat().st_size
    return total


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Plan:
    """How the model runs here, and why; the memory account is in bytes."""

    threads: int
    context_length: int
    max_batch: int
    provider: str
    max_prompt_tokens: int
    available_bytes: int
    weights_bytes: int
    kv_bytes_per_token: int
    kv_bytes: int
    #: Prefill chunk (tokens), and what a prefill needs beyond the KV cache: logits rows and
    #: attention scores.
    prefill_chunk: int
    logits_bytes: int
    attention_bytes: int
    headroom_bytes: int
    total_bytes: int
    #: Memory of the prefix cache: whole entries of ``prefix_cache_entry_bytes`` (0: off).
    prefix_cache_bytes: int = 0
    #: Choice -> why: "threads", "context_length", "max_batch", "max_prompt_tokens",
    #: "provider", "prefix_cache", "memory".
    reasons: dict[str, str] = field(default_factory=dict)

    @property
    def spare_bytes(self) -> int:
        return self.available_bytes - self.total_bytes

    @property
    def prefix_cache_entry_bytes(self) -> int:
        """What one cached prompt holds: a batch-1 KV cache for the whole context."""
        return self.kv_bytes_per_token * self.context_length

    @property
    def prefix_cache_entries(self) -> int:
        entry = self.prefix_cache_entry_bytes
        return self.prefix_cache_bytes // entry if entry else 0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["spare_bytes"] = self.spare_bytes
        return out

    def summary(self) -> str:
        """One line for logs and sd_notify STATUS."""
        return (
            f"threads={self.threads} context={self.context_length} batch={self.max_batch} "
            f"max_prompt={self.max_prompt_tokens} kv={_fmt(self.kv_bytes)} "
            f"spare={_fmt(self.spare_bytes)}"
        )

    def describe(self) -> str:
        """What ``edgeagent plan`` prints: each choice with its reason, then the memory."""
        rows = [
            ("threads", str(self.threads)),
            ("context_length", str(self.context_length)),
            ("max_batch", str(self.max_batch)),
            ("max_prompt_tokens", str(self.max_prompt_tokens)),
            ("provider", self.provider),
            ("prefix_cache", f"{self.prefix_cache_entries} prompts"),
        ]
        width = max(len(name) for name, _ in rows)
        vwidth = max(len(value) for _, value in rows)
        lines = [
            f"{name:<{width}}  {value:>{vwidth}}  {self.reasons.get(name, '')}".rstrip()
            for name, value in rows
        ]
        mb = MB
        lines.append(f"memory in MB (available: {self.reasons.get('memory', 'unknown')}):")
        account = [
            ("available", self.available_bytes, ""),
            ("weights", self.weights_bytes, ""),
            (
                "KV cache",
                self.kv_bytes,
                f"{self.kv_bytes_per_token} B/token x {self.context_length} tokens "
                f"x batch {self.max_batch}",
            ),
            (
                "logits",
                self.logits_bytes,
                f"prefill chunks of {self.prefill_chunk} tokens, batch {self.max_batch}",
            ),
            (
                "attention",
                self.attention_bytes,
                f"prefill scores: a {self.prefill_chunk}-token chunk x {self.context_length} "
                "tokens",
            ),
            (
                "prefix cache",
                self.prefix_cache_bytes,
                f"{self.prefix_cache_entries} x {self.kv_bytes_per_token} B/token x "
                f"{self.context_length} tokens",
            ),
            ("headroom", self.headroom_bytes, "runtime.memory_headroom_mb"),
            ("total", self.total_bytes,
             "weights + KV cache + prefill + prefix cache + headroom"),
            ("spare", self.spare_bytes, ""),
        ]
        for label, value, note in account:
            text = f"  {label:<12} {value / mb:>10.1f}"
            lines.append(f"{text}  {note}" if note else text)
        return "\n".join(lines)


# --------------------------------------------------------------------------- planning


def choose_threads(hw: Hardware, runtime: RuntimeSettings) -> tuple[int, str]:
    allowed = len(hw.affinity) if hw.affinity else None
    quota = hw.cpu_quota_threads
    facts: list[str] = []
    if hw.physical_cores is not None:
        facts.append(
            f"{hw.physical_cores} physical cores"
            if hw.topology_known
            else f"{hw.physical_cores} CPUs (core topology unknown)"
        )
    elif hw.logical_cpus is not None:
        facts.append(f"{hw.logical_cpus} logical CPUs")
    else:
        facts.append("CPU count unknown")
    if hw.affinity:
        on_cores = (
            f" on {hw.affinity_cores} cores"
            if hw.affinity_cores is not None and hw.topology_known
            else ""
        )
        facts.append(f"affinity {format_cpu_list(hw.affinity)} ({allowed} CPUs{on_cores})")
    else:
        facts.append("affinity unknown")
    facts.append(
        f"CPU quota {hw.cpu_quota_cores:g} cores" if hw.cpu_quota_cores is not None
        else "no CPU quota"
    )
    context = ", ".join(facts)

    if runtime.threads != "auto":
        threads = runtime.threads
        if threads < 1:
            raise PlanError(f"runtime.threads={threads} must be at least 1 (or \"auto\")")
        limit_candidates = [
            v for v in (allowed or hw.logical_cpus, quota) if v is not None
        ]
        limit = min(limit_candidates) if limit_candidates else None
        # More threads than CPUs only compete for them: 10,000 of them once left a gateway
        # unresponsive (load ~7,000). Refused before any thread exists.
        if limit is not None and threads > limit:
            raise PlanError(
                f"runtime.threads={threads} is more than the {limit} CPUs this process may use "
                f"({context}); set runtime.threads to at most {limit} or \"auto\""
            )
        return threads, f"runtime.threads ({context})"

    physical = hw.physical_cores if hw.physical_cores is not None else hw.logical_cpus
    candidates = [v for v in (physical, allowed, hw.affinity_cores, quota) if v is not None]
    threads = max(1, min(candidates)) if candidates else 1
    return threads, f"auto: {context}"


def prefill_chunk(meta: ModelMeta, batch: int) -> int:
    """Prompt tokens a prefill step feeds: PREFILL_CHUNK, less for a model returning a
    logits row per position, so that ``batch`` sequences' rows fit FULL_LOGITS_BUDGET."""
    if meta.last_logits_only:
        return PREFILL_CHUNK
    rows = FULL_LOGITS_BUDGET // (meta.vocab_size * LOGITS_BYTES_PER_ELEMENT * batch)
    return max(MIN_PREFILL_CHUNK, min(PREFILL_CHUNK, rows))


def _logits_bytes(meta: ModelMeta, batch: int) -> int:
    """Logits of a prefill step: a row per sequence, or per chunk position without pruning."""
    rows = batch if meta.last_logits_only else batch * prefill_chunk(meta, batch)
    return meta.vocab_size * LOGITS_BYTES_PER_ELEMENT * rows


def _attention_per_token(meta: ModelMeta, batch: int) -> int:
    """Attention scores of a prefill step, per context token: a chunk's column of them."""
    return meta.attention_heads * prefill_chunk(meta, batch) * ATTENTION_BYTES_PER_ELEMENT


def _attention_bytes(meta: ModelMeta, batch: int, context: int) -> int:
    """Attention scores of a prefill step: one chunk against everything before it."""
    return _attention_per_token(meta, batch) * context


def _per_token(meta: ModelMeta, batch: int) -> int:
    """Bytes one more context token costs: its KV cache, and its column of prefill scores."""
    return meta.kv_bytes_per_token * batch + _attention_per_token(meta, batch)


def _largest_context(room: int, meta: ModelMeta, batch: int, ceiling: int) -> int:
    """The largest context <= ceiling whose KV cache for ``batch`` fits ``room`` (0: none).

    The ceiling (model limit or cap) is taken as is when it fits; a memory-limited context
    is rounded down to a multiple of CONTEXT_GRANULARITY, so below one step nothing fits.
    """
    room_kv = room - _logits_bytes(meta, batch)
    if room_kv <= 0:
        return 0
    fits = room_kv // _per_token(meta, batch)
    if fits >= ceiling:
        return ceiling
    return (fits // CONTEXT_GRANULARITY) * CONTEXT_GRANULARITY


def _need(meta: ModelMeta, context: int, batch: int) -> int:
    return (meta.kv_bytes_per_token * context * batch + _logits_bytes(meta, batch)
            + _attention_bytes(meta, batch, context))


def _largest_batch(room: int, meta: ModelMeta, context: int, cap: int) -> int:
    """The largest batch <= cap that fits ``room`` at ``context`` tokens (0: none). Only
    batches whose KV cache alone fits are tried, so a huge cap costs no more than a small one."""
    most = min(cap, max(0, room) // (meta.kv_bytes_per_token * context))
    return next((b for b in range(most, 0, -1) if _need(meta, context, b) <= room), 0)


@dataclass(frozen=True)
class MemoryBudget:
    """What the plan may spend: ``available`` bytes in all, of which ``room`` is left for
    the KV cache and prefill once the weights and the headroom are counted."""

    available: int
    #: Where ``available`` comes from (the plan's reasons["memory"]).
    source: str
    headroom: int
    room: int
    #: "after the <weights> of weights and <headroom> headroom out of <available> ...":
    #: the account the error messages and reasons quote.
    after: str
    #: An explicit runtime.prefix_cache_mb, set aside before ``room``.
    cache: int = 0

    @property
    def left(self) -> str:
        return (f"only {_fmt(self.room)} are left {self.after}" if self.room > 0
                else f"nothing is left {self.after}")


def memory_budget(hw: Hardware, meta: ModelMeta, runtime: RuntimeSettings) -> MemoryBudget:
    """The probe's effective available memory (or the total when that is unknown), less
    the weights, ``runtime.memory_headroom_mb`` and an explicit ``runtime.prefix_cache_mb``."""
    headroom = runtime.memory_headroom_mb * MB
    reserved = _explicit_cache(runtime)
    effective = hw.effective_available_bytes
    if effective is not None:
        available = effective
        if hw.cgroup_memory_limit_bytes is not None and (
            hw.mem_available_bytes is None or available < hw.mem_available_bytes
        ):
            in_use = hw.cgroup_memory_limit_bytes - available
            source = (
                f"cgroup limit {_fmt(hw.cgroup_memory_limit_bytes)} less {_fmt(in_use)} in use"
            )
        else:
            source = "MemAvailable"
            if hw.cgroup_memory_limit_bytes is not None:
                source += f"; cgroup limit {_fmt(hw.cgroup_memory_limit_bytes)} not binding"
    elif hw.mem_total_bytes is not None:
        available = hw.mem_total_bytes
        source = "MemTotal: available memory unknown"
    else:
        raise PlanError(
            "cannot plan: neither the available nor the total memory of this machine is known "
            "(/proc/meminfo unreadable)"
        )
    cache = f", {_fmt(reserved)} of prefix cache" if reserved else ""
    after = (
        f"after the {_fmt(meta.weights_bytes)} of weights{cache} and {_fmt(headroom)} headroom "
        f"out of {_fmt(available)} available ({source})"
    )
    return MemoryBudget(available, source, headroom,
                        available - meta.weights_bytes - headroom - reserved, after, reserved)


def _explicit_cache(runtime: RuntimeSettings) -> int:
    """Bytes of an explicit runtime.prefix_cache_mb (0 when automatic or off)."""
    return 0 if runtime.prefix_cache_mb == "auto" else runtime.prefix_cache_mb * MB


def prefix_cache(meta: ModelMeta, runtime: RuntimeSettings, budget: MemoryBudget,
                 context: int, batch: int) -> tuple[int, str]:
    """Bytes of the prefix cache, in whole entries of one full-context KV cache, and why.

    Automatic: up to ``batch`` entries (a cached prompt per client generating at once)
    within half of what the plan leaves spare, so the cache never crowds out the batch or
    the context and leaves memory for the rest of the gateway. Explicit: the reserved size
    (already out of the budget), which must hold at least one entry."""
    entry = meta.kv_bytes_per_token * context
    one = f"one cached prompt holds a {context}-token KV cache, {_fmt(entry)}"
    if runtime.prefix_cache_mb == 0:
        return 0, "runtime.prefix_cache_mb=0: off"
    if runtime.prefix_cache_mb != "auto":
        entries = _explicit_cache(runtime) // entry
        if entries == 0:
            raise PlanError(
                f"runtime.prefix_cache_mb={runtime.prefix_cache_mb} holds no prompt: {one}; "
                "raise it, lower runtime.context_length, or set 0 to turn the cache off"
            )
        return entries * entry, f"runtime.prefix_cache_mb ({entries} x {_fmt(entry)})"
    spare = budget.room - _need(meta, context, batch)
    entries = min(batch, max(0, spare // 2) // entry)
    if entries == 0:
        return 0, f"auto: off: {one}, more than half the {_fmt(max(0, spare))} left spare"
    return entries * entry, (
        f"auto: {entries} x {_fmt(entry)} ({one}; at most max_batch={batch}, within half "
        f"the {_fmt(spare)} left spare)"
    )


def context_ceiling(meta: ModelMeta, runtime: RuntimeSettings) -> tuple[int, str]:
    """The largest automatic context, and why: the model's limit or runtime.auto_context_cap."""
    if meta.max_context <= runtime.auto_context_cap:
        return meta.max_context, f"the model's limit {meta.max_context}"
    return runtime.auto_context_cap, (
        f"runtime.auto_context_cap={runtime.auto_context_cap}, below the model's "
        f"{meta.max_context}"
    )


def _check_explicit(meta: ModelMeta, runtime: RuntimeSettings) -> None:
    """An explicit context or batch that no memory could make work."""
    if runtime.context_length != "auto":
        ctx = runtime.context_length
        if ctx < 2:
            raise PlanError(f"runtime.context_length={ctx} must be at least 2 (or \"auto\")")
        if ctx > meta.max_context:
            raise PlanError(
                f"runtime.context_length={ctx} is above the model's limit of "
                f"{meta.max_context} tokens ({meta.name}); lower runtime.context_length"
            )
    if runtime.max_batch != "auto" and runtime.max_batch < 1:
        raise PlanError(
            f"runtime.max_batch={runtime.max_batch} must be at least 1 (or \"auto\")"
        )


def _no_room(meta: ModelMeta, budget: MemoryBudget, what: str, context: int, batch: int,
             fix: str) -> PlanError:
    need = _need(meta, context, batch)
    return PlanError(
        f"{what} needs {_fmt(need)}: KV cache ({meta.kv_bytes_per_token} B/token x "
        f"{context} tokens x {batch}) and prefill memory "
        f"({_fmt(need - meta.kv_bytes_per_token * context * batch)}), but {budget.left}"
        f"; {fix}"
    )


#: (context length, max_batch, their reasons)
Sizing = tuple[int, int, dict[str, str]]


def _both_explicit(meta: ModelMeta, budget: MemoryBudget, ctx: int, batch: int) -> Sizing:
    if _need(meta, ctx, batch) > budget.room:
        raise _no_room(meta, budget, f"runtime.context_length={ctx} with runtime.max_batch="
                       f"{batch}", ctx, batch, "lower runtime.context_length or runtime.max_batch")
    return ctx, batch, {
        "context_length": f"runtime.context_length (fits with max_batch={batch})",
        "max_batch": "runtime.max_batch (fits in memory)",
    }


def _explicit_context(meta: ModelMeta, budget: MemoryBudget, ctx: int, cap: int) -> Sizing:
    """The largest batch up to runtime.auto_max_batch_cap (``cap``) at ``ctx`` tokens."""
    batch = _largest_batch(budget.room, meta, ctx, cap)
    if batch == 0:
        raise _no_room(meta, budget, f"runtime.context_length={ctx} even with max_batch=1",
                       ctx, 1, "lower runtime.context_length")
    return ctx, batch, {
        "context_length": f"runtime.context_length (fits with max_batch={batch})",
        "max_batch": f"auto: runtime.auto_max_batch_cap={batch}" if batch == cap
        else f"auto: memory-limited to {batch} of runtime.auto_max_batch_cap={cap} at {ctx} "
        f"tokens ({_fmt(budget.room)} are left {budget.after})",
    }


def _explicit_batch(meta: ModelMeta, runtime: RuntimeSettings, budget: MemoryBudget,
                    batch: int) -> Sizing:
    """The largest context up to the ceiling at ``batch`` sequences."""
    ceiling, ceiling_why = context_ceiling(meta, runtime)
    ctx = _largest_context(budget.room, meta, batch, ceiling)
    if ctx == 0:
        smallest = min(ceiling, CONTEXT_GRANULARITY)
        raise _no_room(meta, budget, f"runtime.max_batch={batch} at the smallest context "
                       f"({smallest})", smallest, batch,
                       "lower runtime.max_batch, free memory or lower runtime.memory_headroom_mb")
    return ctx, batch, {
        "max_batch": "runtime.max_batch (fits in memory)",
        "context_length": f"auto: {ceiling_why}" if ctx == ceiling
        else f"auto: memory-limited to {ctx} tokens with max_batch={batch} ({ceiling_why} "
        f"would need {_fmt(_need(meta, ceiling, batch))} of KV cache and logits; "
        f"{_fmt(budget.room)} are left {budget.after})",
    }


def _both_auto(meta: ModelMeta, runtime: RuntimeSettings, budget: MemoryBudget) -> Sizing:
    """The full context (the ceiling) with the largest batch that fits; when not even one
    sequence fits at the full context, one sequence with the largest context that fits."""
    cap = runtime.auto_max_batch_cap
    ceiling, ceiling_why = context_ceiling(meta, runtime)
    if _largest_context(budget.room, meta, 1, ceiling) == ceiling:
        batch = _largest_batch(budget.room, meta, ceiling, cap)
        return ceiling, batch, {
            "context_length": f"auto: {ceiling_why}",
            "max_batch": f"auto: runtime.auto_max_batch_cap={cap}" if batch == cap
            else f"auto: memory-limited to {batch} of runtime.auto_max_batch_cap={cap} (the "
            f"batch shrinks before the context; {_fmt(budget.room)} are left {budget.after})",
        }
    ctx = _largest_context(budget.room, meta, 1, ceiling)
    if ctx == 0:
        smallest = min(ceiling, CONTEXT_GRANULARITY)
        need = _need(meta, smallest, 1)
        total = meta.weights_bytes + need + budget.cache + budget.headroom
        cache = (f"{_fmt(budget.cache)} of prefix cache (runtime.prefix_cache_mb) + "
                 if budget.cache else "")
        raise PlanError(
            f"model {meta.name} does not fit: {_fmt(meta.weights_bytes)} of weights + "
            f"{_fmt(need)} of KV cache and prefill memory for {smallest} tokens + {cache}"
            f"{_fmt(budget.headroom)} headroom = {_fmt(total)}, but only "
            f"{_fmt(budget.available)} are available ({budget.source}); free memory, raise the "
            "cgroup memory limit, lower runtime.memory_headroom_mb"
            f"{', lower runtime.prefix_cache_mb' if budget.cache else ''} or use a smaller model"
        )
    return ctx, 1, {
        "max_batch": f"auto: memory-limited to 1 sequence (cap {cap}; the batch shrinks "
        "before the context)",
        "context_length": f"auto: memory-limited to {ctx} tokens ({ceiling_why} would need "
        f"{_fmt(_need(meta, ceiling, 1))} of KV cache and prefill memory; "
        f"{_fmt(budget.room)} are left {budget.after})",
    }


def context_and_batch(meta: ModelMeta, runtime: RuntimeSettings, budget: MemoryBudget
                      ) -> Sizing:
    """Context length and max_batch within the budget: explicit values are checked, automatic
    ones are as large as fit (the batch shrinks first, down to 1, to keep the context)."""
    _check_explicit(meta, runtime)
    ctx, batch = runtime.context_length, runtime.max_batch
    if ctx != "auto" and batch != "auto":
        return _both_explicit(meta, budget, ctx, batch)
    if ctx != "auto":
        return _explicit_context(meta, budget, ctx, runtime.auto_max_batch_cap)
    if batch != "auto":
        return _explicit_batch(meta, runtime, budget, batch)
    return _both_auto(meta, runtime, budget)


def prompt_limit(limits: LimitsSettings, ctx: int) -> tuple[int, str]:
    """The longest prompt, and why: the context less limits.min_output_tokens (at least half
    the context), or limits.max_prompt_tokens, which must leave room for output."""
    if limits.max_prompt_tokens == "auto":
        max_prompt = max(ctx - limits.min_output_tokens, ctx // 2)
        return max_prompt, (
            f"auto: context {ctx} less limits.min_output_tokens={limits.min_output_tokens}"
            if max_prompt == ctx - limits.min_output_tokens
            else f"auto: half the context {ctx} (limits.min_output_tokens="
            f"{limits.min_output_tokens} would leave less)"
        )
    max_prompt = limits.max_prompt_tokens
    if not 1 <= max_prompt < ctx:
        raise PlanError(
            f"limits.max_prompt_tokens={max_prompt} must be at least 1 and below the context "
            f"length {ctx}, to leave room for output; lower limits.max_prompt_tokens"
        )
    return max_prompt, f"limits.max_prompt_tokens (context {ctx})"


def plan(
    hw: Hardware, meta: ModelMeta, runtime: RuntimeSettings, limits: LimitsSettings
) -> Plan:
    """Size the runtime to this machine; raises PlanError when the settings cannot fit.

    The steps, in order: threads from the CPUs (:func:`choose_threads`); the memory budget
    (:func:`memory_budget`); context and batch (:func:`context_and_batch`): when both are
    automatic, the batch shrinks first (down to 1) to keep the full context
    (min(model limit, runtime.auto_context_cap)), and only then does the context shrink, in
    steps of 256 tokens; the prompt limit (:func:`prompt_limit`). Explicit settings always
    win, but are checked against the model, the memory budget and (threads) the CPUs this
    process may use.
    """
    reasons: dict[str, str] = {}
    threads, reasons["threads"] = choose_threads(hw, runtime)
    budget = memory_budget(hw, meta, runtime)
    ctx, batch, sizing = context_and_batch(meta, runtime, budget)
    reasons.update(sizing)
    max_prompt, reasons["max_prompt_tokens"] = prompt_limit(limits, ctx)
    cache, reasons["prefix_cache"] = prefix_cache(meta, runtime, budget, ctx, batch)
    reasons["provider"] = "runtime.provider"
    reasons["memory"] = budget.source
    kv = meta.kv_bytes_per_token * ctx * batch
    logits = _logits_bytes(meta, batch)
    attention = _attention_bytes(meta, batch, ctx)
    return Plan(
        threads=threads,
        context_length=ctx,
        max_batch=batch,
        provider=runtime.provider,
        max_prompt_tokens=max_prompt,
        available_bytes=budget.available,
        weights_bytes=meta.weights_bytes,
        kv_bytes_per_token=meta.kv_bytes_per_token,
        kv_bytes=kv,
        prefill_chunk=prefill_chunk(meta, batch),
        logits_bytes=logits,
        attention_bytes=attention,
        headroom_bytes=budget.headroom,
        total_bytes=meta.weights_bytes + kv + logits + attention + cache + budget.headroom,
        reasons=reasons,
        prefix_cache_bytes=cache,
    )


__all__ = [
    "CONTEXT_GRANULARITY",
    "PREFILL_CHUNK",
    "MemoryBudget",
    "ModelMeta",
    "Plan",
    "PlanError",
    "choose_threads",
    "context_and_batch",
    "context_ceiling",
    "memory_budget",
    "plan",
    "prefix_cache",
    "prompt_limit",
]
