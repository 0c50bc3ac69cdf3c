"""The planner: pure, against made-up machines and model metadata."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeagent.manifest import (
    DecoderGeometry,
    ModelIntegrityError,
    decoder_geometry,
    read_kv_layout,
)
from edgeagent.planner import (
    CONTEXT_GRANULARITY,
    PREFILL_CHUNK,
    ModelMeta,
    Plan,
    PlanError,
    context_and_batch,
    context_ceiling,
    memory_budget,
    plan,
    prompt_limit,
)
from edgeagent.probe import Hardware
from edgeagent.settings import LimitsSettings, RuntimeSettings

MB = 2**20
GB = 2**30

SMOL = ModelMeta(
    name="smollm2-135m",
    num_hidden_layers=30,
    num_key_value_heads=3,
    head_size=64,
    vocab_size=49152,
    max_context=8192,
    weights_bytes=86 * MB,
    num_attention_heads=9,
    last_logits_only=True,  # built with a pruned LM head
)
PHI = ModelMeta(
    name="phi4-mini",
    num_hidden_layers=32,
    num_key_value_heads=8,
    head_size=128,
    vocab_size=200064,
    max_context=131072,
    weights_bytes=int(2.7 * GB),
    num_attention_heads=24,  # microsoft's ONNX folder returns logits for every position
)


def box(
    available: int = 8 * GB,
    *,
    cores: int = 4,
    logical: int | None = None,
    affinity: tuple[int, ...] | None = None,
    quota: float | None = None,
    cgroup_limit: int | None = None,
    cgroup_usage: int | None = None,
    topology: bool = True,
) -> Hardware:
    logical = logical or cores
    return Hardware(
        mem_total_bytes=max(available, 16 * GB),
        mem_available_bytes=available,
        cgroup_version=2 if cgroup_limit is not None else None,
        cgroup_memory_limit_bytes=cgroup_limit,
        cgroup_memory_usage_bytes=cgroup_usage,
        logical_cpus=logical,
        physical_cores=cores,
        topology_known=topology,
        affinity=affinity if affinity is not None else tuple(range(logical)),
        cpu_quota_cores=quota,
    )


def rt(**kw: Any) -> RuntimeSettings:
    return RuntimeSettings(**kw)


def lim(**kw: Any) -> LimitsSettings:
    return LimitsSettings(**kw)


def fits(p: Plan) -> bool:
    return p.total_bytes <= p.available_bytes


# --------------------------------------------------------------------------- model meta


def test_kv_bytes_per_token() -> None:
    assert SMOL.kv_bytes_per_token == 2 * 30 * 3 * 64 * 4 == 46080
    assert PHI.kv_bytes_per_token == 2 * 32 * 8 * 128 * 4


def write_model(folder: Path, config: Any, **files: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "genai_config.json").write_text(
        config if isinstance(config, str) else json.dumps(config)
    )
    for name, data in files.items():
        (folder / name.replace("__", ".")).write_bytes(data)
    return folder


GENAI: dict[str, Any] = {
    "model": {
        "type": "llama",
        "context_length": 8192,
        "vocab_size": 49152,
        "decoder": {
            "num_hidden_layers": 30,
            "num_key_value_heads": 3,
            "num_attention_heads": 9,
            "head_size": 64,
            "hidden_size": 576,
        },
    },
    "search": {"max_length": 8192},
}


def test_from_folder(tmp_path: Path) -> None:
    folder = write_model(
        tmp_path / "m", GENAI,
        model__onnx=b"x" * 1000, model__onnx__data=b"y" * 5000, tokenizer__json=b"{}" * 100,
    )
    meta = ModelMeta.from_folder(folder)
    assert meta == ModelMeta("llama", 30, 3, 64, 49152, 8192, 6000, 4, num_attention_heads=9)
    assert not meta.last_logits_only  # unknown (no readable onnx graph): assume every row


def test_from_folder_manifest_kv_layout(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "smol", GENAI)
    (folder / "edgeagent-manifest.json").write_text(
        json.dumps({"files": {}, "kv_layout": {"bytes_per_element": 2}})
    )
    meta = ModelMeta.from_folder(folder)
    assert meta.kv_bytes_per_element == 2
    assert meta.kv_bytes_per_token == 23040


def test_from_folder_head_size_from_hidden(tmp_path: Path) -> None:
    config = json.loads(json.dumps(GENAI))
    del config["model"]["decoder"]["head_size"]
    del config["model"]["type"]
    meta = ModelMeta.from_folder(write_model(tmp_path / "folder-name", config))
    assert meta.head_size == 64
    assert meta.name == "folder-name"


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (None, "does not exist"),
        ("{not json", "cannot be read"),
        ({"model": {"decoder": {}}}, "num_hidden_layers"),
        ({**GENAI, "model": {**GENAI["model"], "context_length": "big"}}, "context_length"),
    ],
)
def test_from_folder_errors(tmp_path: Path, config: Any, match: str) -> None:
    folder = tmp_path / "m"
    if config is None:
        folder.mkdir()
    else:
        write_model(folder, config)
    with pytest.raises(PlanError, match=match):
        ModelMeta.from_folder(folder)


def test_one_reader_of_the_decoder_geometry(tmp_path: Path) -> None:
    """The planner and the manifest read the same geometry, fallbacks included."""
    config = json.loads(json.dumps(GENAI))
    del config["model"]["decoder"]["head_size"]  # hidden_size / heads
    del config["model"]["decoder"]["num_key_value_heads"]  # as many as the query heads
    assert decoder_geometry(config) == DecoderGeometry(
        num_hidden_layers=30, num_key_value_heads=9, head_size=64, num_attention_heads=9)
    folder = write_model(tmp_path / "m", config)
    assert read_kv_layout(folder)["bytes_per_token"] == ModelMeta.from_folder(
        folder).kv_bytes_per_token == 2 * 30 * 9 * 64 * 4


def test_both_readers_refuse_the_same_geometry(tmp_path: Path) -> None:
    config = json.loads(json.dumps(GENAI))
    config["model"]["decoder"]["num_key_value_heads"] = "3"
    folder = write_model(tmp_path / "m", config)
    why = r"num_key_value_heads must be a positive integer, got '3'"
    with pytest.raises(ModelIntegrityError, match=why):
        read_kv_layout(folder)
    with pytest.raises(PlanError, match=why):
        ModelMeta.from_folder(folder)


# --------------------------------------------------------------------------- threads


def test_threads_all_physical_cores() -> None:
    p = plan(box(cores=2), SMOL, rt(), lim())
    assert p.threads == 2
    assert p.reasons["threads"] == "auto: 2 physical cores, affinity 0-1 (2 CPUs), no CPU quota"


def test_threads_cpu_quota_rounds_up() -> None:
    p = plan(box(cores=4, quota=1.5), SMOL, rt(), lim())
    assert p.threads == 2
    assert "CPU quota 1.5 cores" in p.reasons["threads"]


def test_threads_tiny_quota_is_one() -> None:
    assert plan(box(cores=4, quota=0.2), SMOL, rt(), lim()).threads == 1


def test_threads_affinity_of_eight() -> None:
    p = plan(box(cores=8, affinity=(0, 1)), SMOL, rt(), lim())
    assert p.threads == 2
    assert "affinity 0-1 (2 CPUs)" in p.reasons["threads"]


def test_threads_hyperthreads_use_physical_cores() -> None:
    p = plan(box(cores=4, logical=8), SMOL, rt(), lim())
    assert p.threads == 4


def test_threads_no_topology() -> None:
    p = plan(box(cores=4, topology=False), SMOL, rt(), lim())
    assert p.threads == 4
    assert "core topology unknown" in p.reasons["threads"]


def test_threads_unknown_cpus() -> None:
    hw = Hardware(mem_total_bytes=4 * GB, mem_available_bytes=4 * GB)
    p = plan(hw, SMOL, rt(), lim())
    assert p.threads == 1
    assert "unknown" in p.reasons["threads"]


def test_explicit_threads_win() -> None:
    p = plan(box(cores=4), SMOL, rt(threads=3), lim())
    assert p.threads == 3
    assert p.reasons["threads"].startswith("runtime.threads")


def test_explicit_threads_may_use_every_allowed_cpu() -> None:
    # hyperthreads: 8 logical CPUs on 4 cores is a choice, not an absurdity
    assert plan(box(cores=4, logical=8), SMOL, rt(threads=8), lim()).threads == 8


@pytest.mark.parametrize(("hw", "threads", "allowed", "fact"), [
    (box(cores=2), 8, 2, "affinity 0-1 (2 CPUs)"),
    (box(cores=8, affinity=(0, 1)), 10000, 2, "affinity 0-1 (2 CPUs)"),
    (box(cores=8, quota=1.5), 4, 2, "CPU quota 1.5 cores"),
])
def test_explicit_threads_above_the_cpus_allowed_are_refused(
    hw: Hardware, threads: int, allowed: int, fact: str
) -> None:
    with pytest.raises(PlanError) as err:
        plan(hw, SMOL, rt(threads=threads), lim())
    message = str(err.value)
    assert f"runtime.threads={threads} is more than the {allowed} CPUs" in message
    assert fact in message


def test_explicit_threads_kept_when_the_cpus_are_unknown() -> None:
    hw = Hardware(mem_total_bytes=4 * GB, mem_available_bytes=4 * GB)
    assert plan(hw, SMOL, rt(threads=16), lim()).threads == 16


def test_explicit_threads_zero() -> None:
    with pytest.raises(PlanError, match=r"runtime\.threads=0"):
        plan(box(), SMOL, rt(threads=0), lim())


# --------------------------------------------------------------------------- memory


def test_plenty_of_memory_takes_caps() -> None:
    p = plan(box(8 * GB), SMOL, rt(), lim())
    assert (p.context_length, p.max_batch) == (4096, 4)
    assert p.max_prompt_tokens == 4096 - 256
    assert p.kv_bytes == SMOL.kv_bytes_per_token * 4096 * 4
    assert p.prefill_chunk == PREFILL_CHUNK
    assert p.logits_bytes == 49152 * 4 * 4  # pruned LM head: one row per sequence
    assert p.attention_bytes == 9 * PREFILL_CHUNK * 4096 * 4  # one chunk against the context
    assert p.headroom_bytes == 256 * MB
    assert p.total_bytes == (p.weights_bytes + p.kv_bytes + p.logits_bytes + p.attention_bytes
                             + p.prefix_cache_bytes + p.headroom_bytes)
    assert p.provider == "cpu"
    assert "auto_context_cap=4096" in p.reasons["context_length"]
    assert fits(p)


def test_model_limit_below_cap() -> None:
    p = plan(box(8 * GB), SMOL, rt(auto_context_cap=16384), lim())
    assert p.context_length == 8192
    assert "model's limit 8192" in p.reasons["context_length"]


def test_little_ram_shrinks_batch_first() -> None:
    # room for two 4096-token sequences: 2 x 180 MB of KV cache + 36 MB of prefill scores
    p = plan(box(86 * MB + 256 * MB + 450 * MB), SMOL, rt(), lim())
    assert (p.context_length, p.max_batch) == (4096, 2)
    assert "memory-limited" in p.reasons["max_batch"]
    assert fits(p)


def test_little_ram_smaller_context() -> None:
    p = plan(box(86 * MB + 256 * MB + 120 * MB), SMOL, rt(), lim())
    assert p.max_batch == 1
    assert p.context_length < 4096
    assert p.context_length % CONTEXT_GRANULARITY == 0
    # 120 MB / (46080 B KV + 9 x 256 x 4 B of prefill scores) per token = 2272 -> 2048
    assert p.context_length == 2048
    assert "memory-limited to 2048 tokens" in p.reasons["context_length"]
    assert p.max_prompt_tokens == 2048 - 256
    assert fits(p)


def test_cgroup_limit_binds() -> None:
    hw = box(8 * GB, cgroup_limit=1000 * MB, cgroup_usage=200 * MB)
    p = plan(hw, SMOL, rt(), lim())
    assert p.available_bytes == 800 * MB
    assert "cgroup limit 1000 MB less 200 MB in use" in p.reasons["memory"]
    assert fits(p)


def test_unknown_available_uses_total() -> None:
    hw = Hardware(mem_total_bytes=2 * GB, physical_cores=2, logical_cpus=2)
    p = plan(hw, SMOL, rt(), lim())
    assert p.available_bytes == 2 * GB
    assert "MemTotal" in p.reasons["memory"]


def test_unknown_memory_is_an_error() -> None:
    with pytest.raises(PlanError, match="memory"):
        plan(Hardware(), SMOL, rt(), lim())


def test_model_that_cannot_fit_at_256() -> None:
    with pytest.raises(PlanError) as err:
        plan(box(2 * GB), PHI, rt(), lim())
    msg = str(err.value)
    assert "phi4-mini does not fit" in msg
    assert "2.7 GB of weights" in msg
    assert "256 tokens" in msg
    assert "256 MB headroom" in msg
    assert "2.0 GB are available" in msg


def test_explicit_context_that_cannot_fit() -> None:
    with pytest.raises(PlanError) as err:
        plan(box(700 * MB), SMOL, rt(context_length=8192, max_batch=4), lim())
    msg = str(err.value)
    assert msg.startswith("runtime.context_length=8192 with runtime.max_batch=4 needs 1.5 GB: "
                          "KV cache (46080 B/token x 8192 tokens x 4)")
    assert "only 358 MB are left after the 86 MB of weights and 256 MB headroom" in msg
    assert msg.endswith("lower runtime.context_length or runtime.max_batch")


def test_explicit_context_shrinks_auto_batch() -> None:
    # one 8192-token sequence needs 360 MB of KV cache and 72 MB of prefill scores; two, 792
    p = plan(box(86 * MB + 256 * MB + 600 * MB), SMOL, rt(context_length=8192), lim())
    assert (p.context_length, p.max_batch) == (8192, 1)
    assert fits(p)


def test_explicit_context_not_fitting_even_batch_one() -> None:
    with pytest.raises(PlanError, match="even with max_batch=1"):
        plan(box(500 * MB), SMOL, rt(context_length=8192), lim())


def test_explicit_context_above_model_limit() -> None:
    with pytest.raises(PlanError, match="above the model's limit of 8192"):
        plan(box(64 * GB), SMOL, rt(context_length=16384), lim())


def test_explicit_context_not_multiple_of_256_is_kept() -> None:
    p = plan(box(), SMOL, rt(context_length=1000, max_batch=2), lim())
    assert (p.context_length, p.max_batch) == (1000, 2)


def test_explicit_batch_shrinks_context() -> None:
    p = plan(box(86 * MB + 256 * MB + 300 * MB), SMOL, rt(max_batch=4), lim())
    assert p.max_batch == 4
    # (300 MB - 4 logits rows) / (46080 * 4 + 9 * 256 * 4) B per token = 1621 -> 1536
    assert p.context_length == 1536
    assert fits(p)


def test_explicit_batch_zero() -> None:
    with pytest.raises(PlanError, match=r"runtime\.max_batch=0"):
        plan(box(), SMOL, rt(max_batch=0), lim())


@pytest.mark.timeout(60)  # a guard: the planner once tried every batch up to the cap
@pytest.mark.parametrize("context", ["auto", 4096, 2])
def test_huge_auto_batch_cap_is_bounded_by_memory(context: Any) -> None:
    runtime = rt(context_length=context, auto_max_batch_cap=10**15)
    p = plan(box(8 * GB), SMOL, runtime, lim())
    small_cap = plan(box(8 * GB), SMOL, rt(context_length=context,
                                          auto_max_batch_cap=p.max_batch + 5), lim())
    assert p.max_batch == small_cap.max_batch < 10**15
    assert p.total_bytes <= p.available_bytes


def test_small_cap_not_rounded() -> None:
    p = plan(box(), SMOL, rt(auto_context_cap=100), lim(min_output_tokens=16))
    assert p.context_length == 100
    assert p.max_prompt_tokens == 84


# --------------------------------------------------------------------------- prompt limit


def test_max_prompt_at_least_half_context() -> None:
    p = plan(box(), SMOL, rt(context_length=512), lim(min_output_tokens=400))
    assert p.max_prompt_tokens == 256
    assert "half" in p.reasons["max_prompt_tokens"]


def test_explicit_max_prompt() -> None:
    p = plan(box(), SMOL, rt(), lim(max_prompt_tokens=1000))
    assert p.max_prompt_tokens == 1000


def test_explicit_max_prompt_not_below_context() -> None:
    with pytest.raises(PlanError, match=r"limits\.max_prompt_tokens=4096"):
        plan(box(), SMOL, rt(), lim(max_prompt_tokens=4096))


# --------------------------------------------------------------------------- output


def test_describe_mentions_every_reason() -> None:
    p = plan(box(86 * MB + 256 * MB + 100 * MB, quota=1.5), SMOL, rt(threads=2), lim())
    text = p.describe()
    for key in ("threads", "context_length", "max_batch", "max_prompt_tokens", "provider"):
        assert p.reasons[key] in text
    assert p.reasons["memory"] in text
    for label in ("available", "weights", "KV cache", "logits", "attention", "headroom", "total"):
        assert label in text
    assert f"{p.kv_bytes / MB:.1f}" in text


def test_to_dict_is_json() -> None:
    p = plan(box(), SMOL, rt(), lim())
    doc = json.loads(json.dumps(p.to_dict()))
    assert doc["threads"] == 4
    assert doc["reasons"]["provider"] == "runtime.provider"
    assert doc["spare_bytes"] == p.available_bytes - p.total_bytes
    assert "threads=4" in p.summary()


def test_genai_overlay() -> None:
    from edgeagent.engine import genai_overlay  # the engine's concern, not the planner's

    p = plan(box(cores=2), SMOL, rt(), lim())
    assert genai_overlay(p) == {
        "model": {"decoder": {"session_options": {
            "intra_op_num_threads": 2,
            # idle intra-op threads sleep instead of spinning (docs/engine-notes.md)
            "session.intra_op.allow_spinning": "0"}}},
        "search": {"max_length": 4096},
    }


# --------------------------------------------------------------------------- steps


def test_memory_budget_names_its_source() -> None:
    budget = memory_budget(box(2 * GB), SMOL, rt(memory_headroom_mb=100))
    assert (budget.available, budget.headroom) == (2 * GB, 100 * MB)
    assert budget.room == 2 * GB - 86 * MB - 100 * MB
    assert budget.source == "MemAvailable"
    capped = memory_budget(box(8 * GB, cgroup_limit=GB, cgroup_usage=GB // 4), SMOL, rt())
    assert capped.available == GB - GB // 4
    assert capped.source == "cgroup limit 1.0 GB less 256 MB in use"
    starved = memory_budget(box(300 * MB), SMOL, rt())
    assert starved.room < 0 and starved.left.startswith("nothing is left after the 86 MB")
    unknown = dataclasses.replace(box(), mem_available_bytes=None)
    assert memory_budget(unknown, SMOL, rt()).source == "MemTotal: available memory unknown"


def test_context_ceiling_is_the_model_limit_or_the_cap() -> None:
    assert context_ceiling(SMOL, rt()) == (4096, "runtime.auto_context_cap=4096, below the "
                                                 "model's 8192")
    assert context_ceiling(SMOL, rt(auto_context_cap=10000)) == (8192, "the model's limit 8192")


@pytest.mark.parametrize(("context", "batch"), [
    ("auto", "auto"), (1024, "auto"), ("auto", 2), (1024, 2)])
def test_context_and_batch_is_what_the_plan_takes(context: Any, batch: Any) -> None:
    runtime = rt(context_length=context, max_batch=batch)
    budget = memory_budget(box(GB), SMOL, runtime)
    ctx, size, reasons = context_and_batch(SMOL, runtime, budget)
    p = plan(box(GB), SMOL, runtime, lim())
    assert (ctx, size) == (p.context_length, p.max_batch)
    assert reasons == {k: p.reasons[k] for k in ("context_length", "max_batch")}


def test_prompt_limit() -> None:
    assert prompt_limit(lim(), 4096) == (3840, "auto: context 4096 less "
                                               "limits.min_output_tokens=256")
    assert prompt_limit(lim(), 300)[0] == 150
    assert prompt_limit(lim(max_prompt_tokens=100), 300) == (
        100, "limits.max_prompt_tokens (context 300)")
    with pytest.raises(PlanError, match="below the context length 300"):
        prompt_limit(lim(max_prompt_tokens=300), 300)


# --------------------------------------------------------------------------- property


@settings(max_examples=300, deadline=None)
@given(
    # log-uniform from 1 MB to 64 GB: every regime, from "nothing fits" to "caps bind"
    available=st.floats(min_value=20, max_value=36).map(lambda e: int(2**e)),
    cores=st.integers(min_value=1, max_value=128),
    quota=st.none() | st.floats(min_value=0.01, max_value=256),
    context=st.sampled_from(["auto", 256, 1000, 4096, 8192]),
    batch=st.sampled_from(["auto", 1, 3, 8]),
    cap=st.integers(min_value=64, max_value=20000),
    batch_cap=st.integers(min_value=1, max_value=16),
    headroom_mb=st.integers(min_value=0, max_value=1024),
    model=st.sampled_from([SMOL, PHI]),
)
def test_a_plan_always_fits(
    available: int, cores: int, quota: float | None, context: Any, batch: Any, cap: int,
    batch_cap: int, headroom_mb: int, model: ModelMeta,
) -> None:
    runtime = rt(
        context_length=context, max_batch=batch, auto_context_cap=cap,
        auto_max_batch_cap=batch_cap, memory_headroom_mb=headroom_mb,
    )
    try:
        p = plan(box(available, cores=cores, quota=quota), model, runtime, lim())
    except PlanError as exc:
        assert str(exc)
        if context == "auto" and batch == "auto":
            # refused only when even the smallest plan does not fit
            smallest = min(CONTEXT_GRANULARITY, cap, model.max_context)
            need = (
                model.weights_bytes + headroom_mb * MB + model.kv_bytes_per_token * smallest
                + model.vocab_size * 4 * (1 if model.last_logits_only else 128)
                + model.attention_heads * PREFILL_CHUNK * smallest * 4
            )
            assert need > available
        return
    assert p.total_bytes <= p.available_bytes
    assert p.threads >= 1
    assert p.threads <= cores
    if quota is not None:
        assert p.threads <= max(1, math.ceil(quota))
    assert 1 <= p.context_length <= model.max_context
    assert p.max_batch >= 1
    assert 1 <= p.max_prompt_tokens < p.context_length
    if context == "auto" and p.context_length != min(cap, model.max_context):
        assert p.context_length % CONTEXT_GRANULARITY == 0
