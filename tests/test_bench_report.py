"""scripts/bench.py: the smallest --report writes bench.json, bench.md and bench.png; a
plain run measures with the same pipeline.

Figures are not checked (they are noisy on a shared machine); the report's shape is.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.model, pytest.mark.broker, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
LENGTHS = [32, 64]
CLIENTS = [1, 2]


def test_quick_report_writes_its_files(default_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    res = subprocess.run(
        [sys.executable, "scripts/bench.py", "--report", str(out), "--quick",
         "--model", str(default_model), "--repeat", "1", "--tokens", "8",
         "--clients", ",".join(map(str, CLIENTS)),
         "--prompt-lengths", ",".join(map(str, LENGTHS)), "--idle-seconds", "1",
         "--no-llama"],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    # The classic ratios still print with --report.
    assert "decode tok/s (1 stream)" in res.stdout
    assert "socket 2 clients aggregate tok/s" in res.stdout
    # Issue 13's rows, each beside its baseline: decode at the longer prompt's context,
    # a long prefix cold vs warm, CPU per token with one thread, late arrivals vs idle.
    for row in ("context)", "-token prefix cold/warm", "CPU ms/token, 1 thread",
                "socket TTFT ms, idle / p95 4 random"):
        assert row in res.stdout, row

    doc = json.loads((out / "bench.json").read_text())
    assert {"prompt_tokens", "cache", "cold_ttft_ms", "warm_ttft_ms",
            "warm_vs_cold"} <= doc["prefix"].keys()
    assert doc["prefix"]["prompt_tokens"] > 900  # the ~1,000-token system prompt
    assert {"raw_ms", "engine_ms", "vs_raw", "threads"} <= doc["cpu_per_token"].keys()
    assert doc["cpu_per_token"]["threads"] == 1
    late = doc["late_arrivals"]
    assert late["clients"] == 4 and late["requests"] == 4  # one each with --repeat 1
    assert {"idle_ttft_ms", "ttft_p50_ms", "ttft_p95_ms", "p95_vs_idle"} <= late.keys()
    assert "llama_cpp" not in doc  # --no-llama
    assert {"date", "machine", "settings", "raw", "engine", "socket", "mqtt",
            "raw_single_stream_tps", "prompt_lengths", "concurrency", "daemon", "rows",
            "runtime_s"} <= doc.keys()
    assert {"cpu_model", "cpus", "physical_cores", "ram_mb", "python", "onnxruntime",
            "onnxruntime_genai", "git_commit"} <= doc["machine"].keys()
    assert doc["settings"]["prompt_lengths"] == LENGTHS
    assert doc["settings"]["clients"] == CLIENTS

    assert set(doc["prompt_lengths"]) == {"raw", "engine", "socket", "mqtt"}
    for path, entries in doc["prompt_lengths"].items():
        assert [e["prompt_tokens_target"] for e in entries] == LENGTHS, path
        for e in entries:
            assert {"decode_tps", "ttft_p50_s", "ttft_p95_s", "prefill_tps",
                    "decode_vs_raw"} <= e.keys()
            # The daemon counts the same prompt as the bench's tokenizer.
            assert e["prompt_tokens"] == next(
                r["prompt_tokens"] for r in doc["prompt_lengths"]["raw"]
                if r["prompt_tokens_target"] == e["prompt_tokens_target"]), path
            assert 0 < e["prompt_tokens"] <= e["prompt_tokens_target"], path

    assert set(doc["concurrency"]) == {"socket", "mqtt"}
    for transport, entries in doc["concurrency"].items():
        assert [e["clients"] for e in entries] == CLIENTS, transport
        for e in entries:
            assert {"aggregate_tps", "vs_raw_single", "ttft_p50_s", "ttft_p95_s"} <= e.keys()

    assert set(doc["daemon"]) == {"socket", "mqtt"}
    for figures in doc["daemon"].values():
        assert {"ready_s", "rss_ready_mb", "rss_peak_sampled_mb", "vm_hwm_mb",
                "idle_cpu_pct", "idle_s"} <= figures.keys()
        assert figures["rss_samples"] > 0
        # Not compared with each other: the kernel's RSS counters are per-CPU approximations,
        # so a sample can read a fraction of a MB above VmHWM.
        assert figures["vm_hwm_mb"] > 0 and figures["rss_peak_sampled_mb"] > 0

    md = (out / "bench.md").read_text()
    for heading in ("## Summary", "## Prompt length", "## Concurrent clients", "## Daemon"):
        assert heading in md
    assert "| metric | raw loop | edgeagent | ratio |" in md
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_plain_run_is_the_same_pipeline(default_model: Path, tmp_path: Path) -> None:
    """Without --report, bench.py measures with the same code and options (here one prompt
    length, 2 clients, no MQTT) and writes no report files, only the JSON asked for."""
    out = tmp_path / "plain.json"
    res = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), "--quick",
         "--model", str(default_model), "--repeat", "1", "--tokens", "8", "--clients", "2",
         "--prompt-lengths", "32",
         "--no-mqtt", "--no-llama", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "socket 2 clients aggregate tok/s" in res.stdout
    # Logprobs and penalties: decode unused vs used, measured in the same run.
    for row in ("unused", "logprobs (top 5)", "penalties", "logprobs + penalties"):
        assert f"decode tok/s, {row}" in res.stdout
    doc = json.loads(out.read_text())
    assert {"raw", "engine", "socket", "prompt_lengths", "concurrency", "daemon",
            "rows", "features"} <= doc.keys()
    assert "mqtt" not in doc
    assert [e["prompt_tokens_target"] for e in doc["prompt_lengths"]["socket"]] == [32]
    assert [e["clients"] for e in doc["concurrency"]["socket"]] == [2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.json"]
