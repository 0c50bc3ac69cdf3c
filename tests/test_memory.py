"""Bounded prefill memory (issue 7): a 2048-token prompt costs its KV cache, not its logits.

The daemon runs as a subprocess; its peak RSS (VmHWM, reset through /proc/PID/clear_refs) is
read around one long request. Target: peak <= idle RSS + the KV cache for the sequence + the
attention scores of one prefill chunk (the planner's prefill figure) + 32 MB.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from edgeagent.planner import ATTENTION_BYTES_PER_ELEMENT, PREFILL_CHUNK, ModelMeta
from tests.conftest import DaemonProc

pytestmark = pytest.mark.model

MB = 2**20
PROMPT_TOKENS = 2048
MAX_TOKENS = 4


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def _chat(client: httpx.Client, content: str, max_tokens: int) -> dict[str, Any]:
    r = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens})
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


def test_long_prompt_peak_rss_is_its_kv_cache(start_daemon: Any, default_model: Path) -> None:
    meta = ModelMeta.from_folder(default_model)
    assert meta.last_logits_only, "the default model is built with a pruned LM head"
    # The prefill alone: without the prefix cache, whose generators hold the whole context
    # (its memory is tests/test_prefix_cache.py's).
    d: DaemonProc = start_daemon(extra_toml="[runtime]\ncontext_length = 4096\nmax_batch = 1\n"
                                 "prefix_cache_mb = 0\n")
    d.wait_ready()
    pid = d.proc.pid
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(d.socket_path)),
                      base_url="http://localhost", timeout=300) as client:
        # Warm-up: the first requests size onnxruntime's arenas and the tokenizer's caches.
        for _ in range(2):
            _chat(client, "Say hello.", 8)
        # "word " is one token for SmolLM2's tokenizer; measure the prompt the server counted.
        words = "word " * (PROMPT_TOKENS - 40)
        idle_kb = _status_kb(pid, "VmRSS")
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        doc = _chat(client, words, MAX_TOKENS)
        peak_kb = _status_kb(pid, "VmHWM")
    prompt = doc["usage"]["prompt_tokens"]
    assert PROMPT_TOKENS - 100 <= prompt <= PROMPT_TOKENS + 100, prompt
    kv = meta.kv_bytes_per_token * (prompt + MAX_TOKENS)
    # The attention scores of the last chunk against the whole prompt, as the planner
    # budgets them: onnxruntime's GEMM attention kernel (edgeagent/gqa_decode.py) holds
    # them whole for one node at a time.
    scores = meta.attention_heads * PREFILL_CHUNK * prompt * ATTENTION_BYTES_PER_ELEMENT
    growth = peak_kb * 1024 - idle_kb * 1024
    print(f"prompt {prompt} tokens: idle {idle_kb // 1024} MB, peak {peak_kb // 1024} MB, "
          f"KV cache {kv / MB:.1f} MB, scores {scores / MB:.1f} MB")
    assert growth <= kv + scores + 32 * MB, (
        f"peak RSS grew {growth / MB:.1f} MB for a {prompt}-token prompt; the target is the "
        f"KV cache ({kv / MB:.1f} MB) + a chunk's scores ({scores / MB:.1f} MB) + 32 MB")


def test_a_ready_daemon_has_its_kv_cache_in_memory(start_daemon: Any,
                                                   default_model: Path) -> None:
    """The spare generators are made with the model's load: when READY=1 comes, the plan's
    KV cache for every sequence is in memory, and no request (or reading of RSS) finds the
    daemon still faulting it in."""
    meta = ModelMeta.from_folder(default_model)
    d: DaemonProc = start_daemon(extra_toml="[runtime]\ncontext_length = 4096\nmax_batch = 4\n")
    d.wait_ready()
    rss = _status_kb(d.proc.pid, "VmRSS") * 1024
    kv = meta.kv_bytes_per_token * 4096 * 4
    assert rss >= kv, f"RSS {rss / MB:.0f} MB at READY, the plan's KV cache {kv / MB:.0f} MB"
