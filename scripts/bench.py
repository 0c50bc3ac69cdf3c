#!/usr/bin/env python3
"""Benchmark edgeagent against the raw onnxruntime-genai loop, measured in the same run.

    .venv/bin/python scripts/bench.py            # raw loop, engine, socket, MQTT
    .venv/bin/python scripts/bench.py --quick    # fewer repeats
    .venv/bin/python scripts/bench.py --json out.json
    .venv/bin/python scripts/bench.py --report DIR [--quick]   # bench.json, bench.md, bench.png

Every figure is printed beside the raw loop's, as a ratio: the machine's speed cancels out.
Decode runs 128 greedy tokens with the end of sequence blocked; time to first token (TTFT)
is from the request to the first token; prefill tok/s is the prompt over the TTFT.

One pipeline measures, with or without ``--report``: the raw loop, the engine, the socket
and MQTT at each prompt length of about ``--prompt-lengths`` tokens (decode tok/s and TTFT
p50/p95 per length), ``--clients`` concurrent clients (aggregate tok/s and TTFT p50/p95),
and for each daemon its start to READY time, RSS (sampled from /proc throughout, and VmHWM)
and idle CPU (``--idle-seconds`` without requests, as % of one core). The daemons get a
context large enough for the longest prompt plus the output. ``--report DIR`` measures more
by default (prompts of 32, 512 and 2048 tokens, 1, 2, 4 and 8 clients, an idle period
instead of 32 and 512 tokens, 4 clients, none) and writes it to DIR.

The sampling features (logprobs with 5 alternatives, frequency and presence penalties, both)
are measured on the engine, each run alternated with the raw loop and the plain engine: the
plain engine's ratio is their cost when unused (no logits leave the generator), each
feature's ratio their cost when used.

Long prompts and late arrivals (issue 13), each beside its baseline in the same run:
decode at every prompt length after the first (engine vs raw loop at that context; 512 and
2,048 by default); the time to first token of a ~1,000-token system prompt seen before
(warm: the prefix cache) against one seen for the first time (cold), alternated; CPU ms per
generated token with one intra-op thread, engine vs raw loop, alternated (process CPU time:
the least noisy figure on a shared machine); on the socket daemon, the TTFT p95 of 4 clients
sending at random intervals, against the idle TTFT. With ``--llama-python PY`` (a Python with
llama-cpp-python, default /work/llama-venv/bin/python when it has it), llama.cpp's own
figures on the same GGUF (scripts/compare_llama_cpp.py: its low-level decode loop, not its
Python sampler) join the CPU rows as a third column.

Guided answers (a tool call, a long JSON answer) are measured on the engine against
unguided answers of as many tokens on the same prompt tokens (the tools' system note
included), alternated: decode tok/s, TTFT (the grammar's admission check and set-up
included, as a request pays them) and the grammar's admission check alone. Each runs cold
(prefix cache emptied first) and then warm (its prompt cached by the unguided answer: a
guided row takes the prefix cache like any); "first token vs unguided, warm prompt" is the
guided request's first token against the unguided answer's on the same warm prompt, in
wall and in process CPU time.
"""

from __future__ import annotations

import argparse
import bisect
import concurrent.futures
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import onnxruntime_genai as og  # noqa: E402
import psutil  # noqa: E402

from edgeagent import protocol  # noqa: E402
from edgeagent.engine import Delta, Engine, Sampling, genai_overlay  # noqa: E402
from edgeagent.planner import ModelMeta, Plan, plan  # noqa: E402
from edgeagent.probe import probe  # noqa: E402
from edgeagent.settings import LimitsSettings, RuntimeSettings, Settings  # noqa: E402
from edgeagent.testing.broker import Broker, requester  # noqa: E402
from edgeagent.testing.daemon import DaemonProc, exit_on_sigterm, running_daemon  # noqa: E402

MB = 2**20
SHORT = "Tell a story."
FILLER = ["The", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog."]


#: A summary row: metric, raw loop, edgeagent, the path it was measured on.
Row = tuple[str, float, float, str]


@dataclass
class Run:
    decode_tps: float
    ttft_s: float
    prefill_tps: float | None = None


@dataclass
class Streamed:
    """One streamed request through a transport, counted from its usage."""

    run: Run
    tokens: int
    prompt_tokens: int


def rate(count: float, seconds: float) -> float:
    """count / seconds, NaN when no time passed (e.g. all tokens came in one event)."""
    return count / seconds if seconds > 0 else math.nan


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prompt_content(engine: Engine, n_tokens: int) -> tuple[str, np.ndarray]:
    """A user message whose chat prompt is the longest of at most ``n_tokens`` tokens (at
    least one word, so a target under the template's own length gets the template + 1)."""
    words = FILLER * (n_tokens // len(FILLER) + 1)  # a word is at least one token: enough

    def text(k: int) -> str:
        return " ".join(words[:k])

    def tokens(k: int) -> np.ndarray:
        return engine.encode(engine.chat_prompt([{"role": "user", "content": text(k)}]))

    k = bisect.bisect_right(range(len(words) + 1), n_tokens, key=lambda k: len(tokens(k)))
    return text(max(1, k - 1)), tokens(max(1, k - 1))


# ---------------------------------------------------------------- raw loop
class RawLoop:
    def __init__(self, model_path: Path, the_plan: Plan) -> None:
        config = og.Config(str(model_path))
        config.overlay(json.dumps(genai_overlay(the_plan)))
        self.model = og.Model(config)

    def run(self, tokens: np.ndarray, n: int) -> Run:
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(tokens) + n, min_length=len(tokens) + n,
                                  do_sample=False)
        gen = og.Generator(self.model, params)
        t0 = time.perf_counter()
        gen.append_tokens(tokens)
        gen.generate_next_token()
        gen.get_next_tokens()
        t1 = time.perf_counter()
        count = 1
        while not gen.is_done():
            gen.generate_next_token()
            gen.get_next_tokens()
            count += 1
        t2 = time.perf_counter()
        return Run(rate(count - 1, t2 - t1), t1 - t0, rate(len(tokens), t1 - t0))


#: The sampling features measured, as the Sampling fields a request sets for them.
FEATURES: dict[str, dict[str, Any]] = {
    "unused": {},
    "logprobs (top 5)": {"logprobs": 5},
    "penalties": {"frequency_penalty": 0.5, "presence_penalty": 0.5},
    "logprobs + penalties": {"logprobs": 5, "frequency_penalty": 0.5,
                             "presence_penalty": 0.5},
}


def engine_run(engine: Engine, tokens: np.ndarray, n: int, **features: Any) -> Run:
    return timed(engine.generate(tokens, Sampling(max_tokens=n, ignore_eos=True, **features)),
                 len(tokens), time.perf_counter())[0]


def timed(items: Any, prompt_tokens: int, t0: float) -> tuple[Run, int]:
    """The run of a generation's items from ``t0``, and the tokens it produced."""
    first = last = 0.0
    count = 0
    for item in items:
        if isinstance(item, Delta):
            last = time.perf_counter()
            count += 1
            if count == 1:
                first = last
    return Run(rate(count - 1, last - first), first - t0, rate(prompt_tokens, first - t0)), count


#: Guided requests measured against unguided answers on the same prompt.
GUIDED: dict[str, dict[str, Any]] = {
    "tool call": {
        "messages": [{"role": "user", "content": "Open valve 3 to 50 percent."}],
        "tools": [{"type": "function", "function": {
            "name": "set_valve", "description": "Open a valve to a percentage",
            "parameters": {"type": "object", "properties": {
                "valve_id": {"type": "integer"}, "percent": {"type": "number"}},
                "required": ["valve_id", "percent"]}}}],
        "tool_choice": "required"},
    "JSON answer": {
        "messages": [{"role": "user", "content": "Tell a story, in JSON."}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "story", "schema": {
            # minLength: the answer runs to max_tokens, as the unguided one
            "type": "object", "properties": {"story": {
                "type": "string", "minLength": 2000, "maxLength": 4000}},
            "required": ["story"]}}}},
}


@dataclass
class GuidedRun:
    """A run's wall figures, its tokens, and its process CPU time to the first token and
    per token after it."""

    run: Run
    tokens: int
    ttft_cpu_s: float
    decode_cpu_s: float


def cpu_timed(items: Any, prompt_tokens: int, t0: float, c0: float) -> GuidedRun:
    """Like ``timed``, with the process CPU time (from ``c0``) of the first token and of
    each one after it."""
    first = last = 0.0
    cfirst = clast = 0.0
    count = 0
    for item in items:
        if isinstance(item, Delta):
            last, clast = time.perf_counter(), time.process_time()
            count += 1
            if count == 1:
                first, cfirst = last, clast
    run = Run(rate(count - 1, last - first), first - t0, rate(prompt_tokens, first - t0))
    return GuidedRun(run, count, cfirst - c0, (clast - cfirst) / max(1, count - 1))


def guided_run(engine: Engine, p: protocol.Prepared) -> GuidedRun:
    """A guided request as the daemon runs it: the admission check, then the generation."""
    assert p.guidance is not None
    t0, c0 = time.perf_counter(), time.process_time()
    engine.check_guidance(p.guidance, p.sampling)
    return cpu_timed(engine.generate(p.prompt_tokens, p.sampling, guidance=p.guidance),
                     len(p.prompt_tokens), t0, c0)


def unguided_run(engine: Engine, tokens: np.ndarray, n: int) -> GuidedRun:
    t0, c0 = time.perf_counter(), time.process_time()
    return cpu_timed(engine.generate(tokens, Sampling(max_tokens=n, ignore_eos=True)),
                     len(tokens), t0, c0)


def guided_block(engine: Engine, n: int, repeat: int) -> dict[str, dict[str, Any]]:
    """Each guided request beside unguided answers of as many tokens on the same prompt
    tokens, alternated: with the prefix cache emptied, the guided request and then the
    unguided answer (cold); then the unguided answer again and the guided request again,
    both on the prompt the first unguided answer left in the cache (warm). Median decode
    tok/s and TTFT (wall, and CPU) of each, the median ratios of guided to unguided runs in
    the same state, and the median time of the grammar's admission check (remembered after
    the first)."""
    out: dict[str, dict[str, Any]] = {}
    for name, body in GUIDED.items():
        req = protocol.ChatCompletionRequest.model_validate({**body, "max_tokens": n})
        p = protocol.prepare_chat(req, engine, Settings(), "bench")
        assert p.guidance is not None
        runs: dict[str, list[GuidedRun]] = {
            "guided": [], "unguided": [], "unguided_warm": [], "guided_warm": []}
        checks = []
        for _ in range(repeat):
            engine.prefix_cache.clear()
            runs["guided"].append(guided_run(engine, p))
            count = max(2, runs["guided"][-1].tokens)
            engine.prefix_cache.clear()
            runs["unguided"].append(unguided_run(engine, p.prompt_tokens, count))
            runs["unguided_warm"].append(unguided_run(engine, p.prompt_tokens, count))
            runs["guided_warm"].append(guided_run(engine, p))
            t = time.perf_counter()
            engine.check_guidance(p.guidance, p.sampling)
            checks.append(time.perf_counter() - t)

        def ratio(a: str, b: str, key: Callable[[GuidedRun], float],
                  runs: dict[str, list[GuidedRun]] = runs) -> float:
            return median([key(x) / key(y) for x, y in zip(runs[a], runs[b], strict=True)])

        out[name] = {
            "prompt_tokens": len(p.prompt_tokens),
            "tokens": median([r.tokens for r in runs["guided"]]),
            **{f"{k}_decode_tps": median([r.run.decode_tps for r in v])
               for k, v in runs.items()},
            **{f"{k}_ttft_s": median([r.run.ttft_s for r in v]) for k, v in runs.items()},
            **{f"{k}_ttft_cpu_s": median([r.ttft_cpu_s for r in v]) for k, v in runs.items()},
            **{f"{k}_decode_cpu_ms": median([r.decode_cpu_s for r in v]) * 1000
               for k, v in runs.items()},
            "decode_vs_unguided": ratio("guided_warm", "unguided_warm",
                                        lambda r: r.run.decode_tps),
            "ttft_vs_unguided": ratio("guided", "unguided", lambda r: r.run.ttft_s),
            "ttft_vs_unguided_warm": ratio("guided_warm", "unguided_warm",
                                           lambda r: r.run.ttft_s),
            "ttft_cpu_vs_unguided_warm": ratio("guided_warm", "unguided_warm",
                                               lambda r: r.ttft_cpu_s),
            "check_ms": median(checks) * 1000}
    return out


# ---------------------------------------------------------------- issue 13 rows
#: A system prompt of about 1,000 tokens: the instructions and tool notes that gateway
#: requests repeat.
SYSTEM = " ".join(
    f"Rule {i}: when sensor {i} reads above its threshold, report the reading, the unit and "
    f"the time, and suggest one action for the operator of line {i % 7}." for i in range(30))


def cold(engine: Engine) -> None:
    """Empty the engine's prefix cache, if it has one: a run that must prefill its prompt
    (the raw loop's baseline) must not find it cached from the run before."""
    cache = getattr(engine, "prefix_cache", None)
    if cache is not None:
        cache.clear()


def prefix_block(engine: Engine, n: int, repeat: int) -> dict[str, Any]:
    """TTFT of a ~1,000-token system prompt seen for the first time (cold: a new first line)
    and seen before (warm: the same system prompt, a new question), alternated. Without a
    prefix cache in the engine, warm is NaN (the row reads n/a)."""
    cache = getattr(engine, "prefix_cache", None)
    enabled = bool(cache is not None and cache.enabled)

    def tokens(first_line: str, question: str) -> np.ndarray:
        return engine.encode(engine.chat_prompt([
            {"role": "system", "content": f"{first_line}\n{SYSTEM}"},
            {"role": "user", "content": question}]))

    cold_runs: list[Run] = []
    warm_runs: list[Run] = []
    if enabled:
        engine_run(engine, tokens("Site A.", "Status?"), 2)  # the prompt warm runs find
    for i in range(repeat):
        cold_runs.append(engine_run(engine, tokens(f"Site {i + 100}.", "Status?"), n))
        if enabled:
            warm_runs.append(engine_run(engine, tokens("Site A.", f"Status of line {i}?"), n))
    cold_ms = median([r.ttft_s for r in cold_runs]) * 1000
    warm_ms = median([r.ttft_s for r in warm_runs]) * 1000 if enabled else math.nan
    return {"prompt_tokens": len(tokens("Site A.", "Status?")), "cache": enabled,
            "cold_ttft_ms": cold_ms, "warm_ttft_ms": warm_ms, "warm_vs_cold": warm_ms / cold_ms,
            "cold_ttft_ms_runs": [r.ttft_s * 1000 for r in cold_runs],
            "warm_ttft_ms_runs": [r.ttft_s * 1000 for r in warm_runs]}


def cpu_ms_per_token(items: Any) -> float:
    """Process CPU ms per token of a generation, from its first token to its last."""
    start = 0.0
    count = 0
    for item in items:
        if isinstance(item, Delta | int):
            count += 1
            if count == 1:
                start = time.process_time()
    return (time.process_time() - start) * 1000 / (count - 1) if count > 1 else math.nan


def raw_tokens(raw: RawLoop, tokens: np.ndarray, n: int) -> Any:
    """The raw loop's tokens one by one, greedy, the end of sequence blocked."""
    params = og.GeneratorParams(raw.model)
    params.set_search_options(max_length=len(tokens) + n, min_length=len(tokens) + n,
                              do_sample=False)
    gen = og.Generator(raw.model, params)
    gen.append_tokens(tokens)
    while not gen.is_done():
        gen.generate_next_token()
        yield int(gen.get_next_tokens()[0])


def cpu_block(model_path: Path, context: int, tokens: np.ndarray, n: int,
              repeat: int) -> dict[str, Any]:
    """CPU ms per generated token with one intra-op thread: engine and raw loop alternated
    (raw, engine, raw), each engine run against the mean of the raw runs around it.

    The engine runs a plain request (greedy, EOS allowed: no min_tokens, whose EOS mask
    costs a logits round trip on a prefix-cache generator): the per-token path of a request
    that asks for nothing more. The prompt is one the model answers at length."""
    one = plan(probe(), ModelMeta.from_folder(model_path),
               RuntimeSettings(threads=1, context_length=context), LimitsSettings())
    engine, raw = Engine(model_path, one), RawLoop(model_path, one)
    sampling = Sampling(max_tokens=n)
    cpu_ms_per_token(engine.generate(tokens, sampling))  # warm-up
    raws, engines, ratios = [], [], []
    before = cpu_ms_per_token(raw_tokens(raw, tokens, n))
    for _ in range(repeat):
        engines.append(cpu_ms_per_token(engine.generate(tokens, sampling)))
        after = cpu_ms_per_token(raw_tokens(raw, tokens, n))
        raws.append(after)
        ratios.append(engines[-1] / ((before + after) / 2))
        before = after
    return {"raw_ms": median(raws), "engine_ms": median(engines), "vs_raw": median(ratios),
            "vs_raw_runs": ratios, "threads": 1}


def late_block(one: Callable[[str, int], Streamed], n: int, repeat: int,
               clients: int = 4) -> dict[str, Any]:
    """Time to first token when ``clients`` clients send at random intervals (not at once),
    against the idle TTFT of the same requests measured alone just before: the clients' own
    prompts, each sent once first, so that alone as under load they are the prefix cache's
    (a client repeats its prompt) and the daemon has made its spare generators.

    Each client waits a random time, uniform up to one idle request's duration, before each
    of its ``repeat`` requests: most arrive while other requests are generating."""
    prompts = [f"Tell story number {i}." for i in range(clients)]
    for prompt in prompts:
        one(prompt, n)
    idle = [one(prompts[i % clients], n) for i in range(max(2, repeat))]
    duration = median([s.run.ttft_s + s.tokens / s.run.decode_tps for s in idle])
    rng = np.random.default_rng(13)
    waits = rng.uniform(0, duration, size=(clients, repeat))

    def client(i: int) -> list[float]:
        ttfts = []
        for wait in waits[i]:
            time.sleep(wait)  # the workload: arrivals spread at random, not a synchronisation
            ttfts.append(one(prompts[i], n).run.ttft_s)
        return ttfts

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        ttfts = [t for got in pool.map(client, range(clients)) for t in got]
    idle_ms = median([s.run.ttft_s for s in idle]) * 1000
    p95_ms = percentile(ttfts, 95) * 1000
    return {"clients": clients, "requests": len(ttfts), "idle_ttft_ms": idle_ms,
            "ttft_p50_ms": median(ttfts) * 1000, "ttft_p95_ms": p95_ms,
            "p95_vs_idle": p95_ms / idle_ms, "ttft_ms_runs": [t * 1000 for t in ttfts]}


def llama_cpp_figures(python: Path | None, threads: int, contexts: list[int], n: int,
                      repeat: int) -> dict[str, Any] | None:
    """llama.cpp's figures from scripts/compare_llama_cpp.py run by ``python`` (a Python with
    llama-cpp-python), or None when there is none: decode tok/s with ``threads`` threads
    after prompts of ``contexts`` tokens, and CPU ms per token with one thread."""
    from scripts.compare_llama_cpp import cached_gguf

    gguf = cached_gguf()
    if python is None or gguf is None:
        return None
    res = subprocess.run([str(python), str(REPO / "scripts" / "compare_llama_cpp.py"),
                          "--llama-only", "--gguf", str(gguf),
                          "--threads", str(threads), "--tokens", str(n),
                          "--repeat", str(repeat),
                          "--contexts", ",".join(str(c) for c in contexts)],
                         capture_output=True, text=True, timeout=1800, cwd=REPO)
    if res.returncode != 0:
        print(f"llama.cpp column skipped: {res.stderr.strip()[-500:]}", file=sys.stderr)
        return None
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


def default_llama_python() -> Path | None:
    """/work/llama-venv/bin/python when it can import llama_cpp."""
    python = Path("/work/llama-venv/bin/python")
    if not python.exists():
        return None
    res = subprocess.run([str(python), "-c", "import llama_cpp"], capture_output=True,
                         timeout=60)
    return python if res.returncode == 0 else None


# ---------------------------------------------------------------- daemons
#: The daemons' device id: their MQTT request topic is edgeagent/bench/request.
DEVICE = "bench"


def socket_request(d: DaemonProc, content: str, n: int) -> Streamed:
    """One streamed chat completion over the socket; tokens are counted from the usage
    chunk, since the daemon may send several tokens in one event."""
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": n,
            "min_tokens": n, "stream": True, "temperature": 0,
            "stream_options": {"include_usage": True}}
    first = last = 0.0
    usage: dict[str, int] = {}
    # The client is built before the clock starts: httpx spends ~25 ms creating its SSL
    # context, which is the client's cost, not the daemon's time to first token.
    with d.client(timeout=300) as c:
        t0 = time.perf_counter()
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.read().decode(errors='replace')}")
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                doc = json.loads(line[6:])
                if doc.get("usage"):
                    usage = doc["usage"]
                elif doc["choices"] and doc["choices"][0]["delta"].get("content"):
                    last = time.perf_counter()
                    if not first:
                        first = last
    tokens = usage.get("completion_tokens", 0)
    return Streamed(Run(rate(tokens - 1, last - first), first - t0), tokens,
                    usage.get("prompt_tokens", 0))


def health(d: DaemonProc) -> dict[str, Any]:
    with d.client() as c:
        doc: dict[str, Any] = c.get("/health").json()
        return doc


def mqtt_request(broker: Broker, content: str, n: int) -> Streamed:
    """One streamed request over MQTT 5 (response topic + correlation data); tokens are
    counted from the final chunk's usage, since a chunk may carry several tokens."""
    body = {"messages": [{"role": "user", "content": content}],
            "max_tokens": n, "min_tokens": n, "stream": True, "temperature": 0}
    with requester(broker) as r:
        t0 = time.perf_counter()
        r.request(f"edgeagent/{DEVICE}/request", body, correlation=os.urandom(8))
        first = last = 0.0
        chunks = 0
        while True:
            _, doc, _ = r.get(300)
            if "error" in doc:
                raise RuntimeError(f"MQTT error reply: {doc['error']}")
            choice = doc["choices"][0]
            if choice["delta"].get("content"):
                last = time.perf_counter()
                chunks += 1
                if chunks == 1:
                    first = last
            if choice.get("finish_reason"):
                usage = doc.get("usage") or {}
                break
    tokens = int(usage.get("completion_tokens", chunks))
    return Streamed(Run(rate(tokens - 1, last - first), first - t0), tokens,
                    int(usage.get("prompt_tokens", 0)))


def mqtt_round_trip(broker: Broker, count: int) -> list[float]:
    """Latency of 1-token requests: publish to reply received."""
    out = []
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    with requester(broker) as r:
        for _ in range(count):
            t0 = time.perf_counter()
            r.request(f"edgeagent/{DEVICE}/request", body, correlation=os.urandom(8))
            r.get(60)
            out.append(time.perf_counter() - t0)
    return sorted(out)


def print_summary(results: dict[str, Any], rows: list[Row]) -> None:
    """The console table: every figure beside the raw loop's, with the ratio."""
    print(f"\nedgeagent bench: {results['machine']}")
    print(f"{'metric':38} {'raw loop':>10} {'edgeagent':>10} {'ratio':>7}"
          f"{'  llama.cpp' if results.get('llama_cpp') else ''}")
    llama = results.get("llama_cpp") or {}
    for name, base, ours, _ in rows:
        ratio = ours / base if base else float("nan")
        line = f"{name:38} {base:10.1f} {ours:10.1f} {ratio:7.3f}"
        if name in llama:
            line += f" {llama[name]:10.1f}"
        print(line.replace(" nan", " n/a"))
    if "socket" in results:
        s2, r = results["socket"], results["raw"]
        print(f"{'socket TTFT p50 - raw TTFT (ms)':38} "
              f"{(s2['ttft_p50_s'] - s2.get('raw_ttft_s', r['ttft_s'])) * 1000:+10.1f}")
        print(f"start to READY: {s2['ready_s']:.2f}s; daemon RSS {s2['daemon_rss_mb']:.0f} MB")
    if "mqtt" in results:
        rtt_ms = results["mqtt"]["one_token_rtt_p50_s"] * 1000
        print(f"mqtt 1-token round trip p50: {rtt_ms:.1f} ms")
    print(f"bench process RSS after loading both models: {results['rss_after_load_mb']:.0f} MB")


# ---------------------------------------------------------------- report
def int_list(text: str) -> list[int]:
    """``1,2,4,8`` -> [1, 2, 4, 8] (positive, ascending, without duplicates)."""
    try:
        values = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from exc
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"positive integers expected: {text!r}")
    return values


def percentile(values: Sequence[float], q: float) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.percentile(finite, q)) if finite else math.nan


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def report_context(lengths: Sequence[int], tokens: int) -> int:
    """A context that admits the longest prompt plus its output (the daemon keeps
    limits.min_output_tokens of room after a prompt), in steps of 256, at least 2048."""
    need = max(lengths) + max(tokens, LimitsSettings().min_output_tokens)
    return max(2048, -(-need // 256) * 256)


class RssSampler:
    """A process's RSS sampled from /proc (psutil) every ``interval`` s on a thread."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.process = psutil.Process(pid)
        self.interval = interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            try:
                self.samples.append(self.process.memory_info().rss / MB)
            except psutil.Error:
                return
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        return max(self.samples, default=math.nan)


def idle_cpu_pct(pid: int, seconds: float) -> float:
    """CPU time (user + system, all threads) a process uses over ``seconds`` of wall time
    without requests, as % of one core."""
    if seconds <= 0:
        return math.nan  # not measured
    process = psutil.Process(pid)
    before, t0 = process.cpu_times(), time.perf_counter()
    time.sleep(seconds)  # the measurement window itself
    after, wall = process.cpu_times(), time.perf_counter() - t0
    used = (after.user - before.user) + (after.system - before.system)
    return float(100.0 * used / wall)


def git(*argv: str) -> str | None:
    try:
        res = subprocess.run(["git", *argv], cwd=REPO, capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def machine_info(the_plan: Plan, model_path: Path) -> dict[str, Any]:
    cpu_model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "cpu_model": cpu_model,
        "cpus": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "cpus_in_affinity": len(os.sched_getaffinity(0)),
        "ram_mb": round(psutil.virtual_memory().total / MB),
        "available_mb_at_start": round(psutil.virtual_memory().available / MB),
        "loadavg_at_start": list(os.getloadavg()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": metadata.version("onnxruntime"),
        "onnxruntime_genai": metadata.version("onnxruntime-genai"),
        "numpy": np.__version__,
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "threads": the_plan.threads,
        "model": str(model_path),
    }


def by_length(runs: dict[int, list[Run]], prompt_tokens: dict[int, int],
              raw: dict[int, list[Run]]) -> list[dict[str, Any]]:
    """Per prompt length: decode tok/s, TTFT p50/p95, prefill tok/s, decode vs the raw loop's
    at the same length."""
    out = []
    for target, rs in runs.items():
        decode = median([r.decode_tps for r in rs])
        ttfts = [r.ttft_s for r in rs]
        out.append({
            "prompt_tokens_target": target, "prompt_tokens": prompt_tokens[target],
            "decode_tps": decode, "ttft_p50_s": median(ttfts),
            "ttft_p95_s": percentile(ttfts, 95),
            "prefill_tps": rate(prompt_tokens[target], median(ttfts)),
            "decode_vs_raw": decode / median([r.decode_tps for r in raw[target]]),
            "decode_tps_runs": [r.decode_tps for r in rs], "ttft_s_runs": ttfts,
        })
    return out


def measure_transport(d: DaemonProc, one: Callable[[str, int], Streamed],
                      raw_one: Callable[[int], Run], prompts: dict[int, str],
                      clients: list[int], n: int, repeat: int,
                      idle_s: float) -> dict[str, Any]:
    """Single streams per prompt length, then concurrent clients, then an idle period,
    with the daemon's RSS sampled throughout. Every request (or round of concurrent
    requests) follows a raw loop run at the same prompt (``raw_one``, in this process while
    the daemon idles), so that the ratios compare figures measured under the same load."""
    with RssSampler(d.proc.pid) as sampler:
        rss_ready = d.rss_mb()
        one(SHORT, 8)  # warm-up
        singles: dict[int, list[Streamed]] = {target: [] for target in prompts}
        raw: dict[int, list[Run]] = {target: [] for target in prompts}
        for _ in range(repeat):  # interleaved, so drift hits every length alike
            for target, content in prompts.items():
                raw[target].append(raw_one(target))
                singles[target].append(one(content, n))
        concurrency = []
        for c in clients:
            aggregates: list[float] = []
            ratios: list[float] = []
            ttfts: list[float] = []
            for _ in range(repeat):
                reference = raw_one(next(iter(prompts))).decode_tps
                t0 = time.perf_counter()
                with concurrent.futures.ThreadPoolExecutor(c) as pool:
                    done = list(pool.map(lambda i: one(f"Tell story number {i}.", n),
                                         range(c)))
                aggregates.append(sum(s.tokens for s in done) / (time.perf_counter() - t0))
                ratios.append(aggregates[-1] / reference)
                ttfts += [s.run.ttft_s for s in done]
            concurrency.append({
                "clients": c, "aggregate_tps": median(aggregates),
                "vs_raw_single": median(ratios),
                "ttft_p50_s": median(ttfts), "ttft_p95_s": percentile(ttfts, 95),
                "aggregate_tps_runs": aggregates, "vs_raw_single_runs": ratios})
        idle = idle_cpu_pct(d.proc.pid, idle_s)
    plan_doc = health(d).get("plan") or {}
    figures = {
        "ready_s": d.ready_s, "rss_ready_mb": rss_ready, "rss_peak_sampled_mb": sampler.peak_mb,
        "rss_samples": len(sampler.samples), "rss_sample_interval_s": sampler.interval,
        "vm_hwm_mb": d.status_mb("VmHWM"), "rss_end_mb": d.rss_mb(), "idle_cpu_pct": idle,
        "idle_s": idle_s, "plan": {k: plan_doc.get(k) for k in
                                   ("threads", "context_length", "max_batch", "max_prompt_tokens")},
    }
    return {"singles": singles, "raw": raw, "concurrency": concurrency, "daemon": figures}


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; the first column left-aligned, the others right-aligned."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "-" if not math.isfinite(v) else f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return "-" if v is None else str(v)

    lines = ["| " + " | ".join(header) + " |",
             "| --- | " + " | ".join("---:" for _ in header[1:]) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


PHASES = {"engine": "between the engine's runs", "socket": "between socket requests",
          "mqtt": "between MQTT requests"}


def ref_of(doc: dict[str, Any], phase: str) -> float:
    """The raw single stream (first prompt length) measured in a phase of the run."""
    value: float = doc["raw_by_phase"][phase][0]["decode_tps"]
    return value


def render_markdown(doc: dict[str, Any]) -> str:
    m, st = doc["machine"], doc["settings"]
    out = [
        "# edgeagent bench report\n",
        f"{doc['date']}, commit `{(m['git_commit'] or '?')[:12]}`"
        f"{' (dirty)' if m['git_dirty'] else ''}; {m['cpu_model']}, {m['cpus']} CPUs "
        f"({m['physical_cores']} cores), {m['ram_mb']} MB RAM; Python {m['python']}, "
        f"onnxruntime {m['onnxruntime']}, onnxruntime-genai {m['onnxruntime_genai']}; "
        f"load average at start {m['loadavg_at_start'][0]:.2f}.\n",
        f"Model `{Path(m['model']).name}`, {m['threads']} threads, context "
        f"{st['context_length']}; {st['tokens']} greedy tokens per request (end of sequence "
        f"blocked), repeats: {st['repeat']}{' (--quick)' if st['quick'] else ''}; "
        f"{doc['runtime_s']:.0f} s in all.\n",
        "Every path is compared with the raw onnxruntime-genai loop run alternately with it "
        "in this run (in the bench process, while the daemon idles), so the machine's speed, "
        "and its drift on a shared machine, cancel out. Raw single "
        f"stream ({st['prompt_lengths'][0]}-token prompt): "
        + ", ".join(f"{ref_of(doc, k):.1f} tok/s ({PHASES[k]})" for k in doc["raw_by_phase"])
        + ".\n",
        "## Summary\n",
        markdown_table(["metric", "raw loop", "edgeagent", "ratio"],
                       [(r["metric"], r["raw"], r["edgeagent"], r["ratio"])
                        for r in doc["rows"]]),
        "## Prompt length (one stream)\n",
        "Decode tok/s should stay close across prompt lengths; TTFT grows with the prefill. "
        "`vs raw` is against the raw loop at the same prompt, measured next to the path "
        "(raw rows: the run with the engine).\n",
    ]
    rows: list[Sequence[Any]] = []
    for target in st["prompt_lengths"]:
        for path, entries in doc["prompt_lengths"].items():
            e = next(x for x in entries if x["prompt_tokens_target"] == target)
            rows.append((f"{target} ({e['prompt_tokens']})", path, e["decode_tps"],
                         e["decode_vs_raw"], e["ttft_p50_s"] * 1000, e["ttft_p95_s"] * 1000,
                         e["prefill_tps"]))
    out.append(markdown_table(["prompt tokens (actual)", "path", "decode tok/s", "vs raw",
                               "TTFT p50 ms", "TTFT p95 ms", "prefill tok/s"], rows))
    out += ["The raw loop in each phase of the run (decode tok/s; TTFT p50 ms), which shows "
            "how much the machine drifted:\n",
            markdown_table(["raw loop", *[f"{t} tokens" for t in st["prompt_lengths"]]], [
                (PHASES[k], *[f"{e['decode_tps']:.1f}; {e['ttft_p50_s'] * 1000:.0f}"
                              if e["decode_tps"] is not None else "-" for e in entries])
                for k, entries in doc["raw_by_phase"].items()])]
    if doc["concurrency"]:
        out += ["## Concurrent clients\n",
                f"Aggregate tok/s: all clients' tokens over the wall time of the round; "
                "`vs raw`: the median over the rounds of the round's aggregate over a raw "
                f"single stream run just before it. {st['tokens']} tokens per client; TTFT "
                "includes waiting for a batch slot.\n"]
        conc_rows: list[Sequence[Any]] = [
            (e["clients"], transport, e["aggregate_tps"], e["vs_raw_single"],
             e["ttft_p50_s"] * 1000, e["ttft_p95_s"] * 1000)
            for transport, entries in doc["concurrency"].items() for e in entries]
        conc_rows.sort(key=lambda r: (r[0], r[1]))
        out.append(markdown_table(["clients", "transport", "aggregate tok/s", "vs raw",
                                   "TTFT p50 ms", "TTFT p95 ms"], conc_rows))
    if doc["daemon"]:
        names = list(doc["daemon"])
        ds = [doc["daemon"][k] for k in names]
        daemon_rows: list[Sequence[Any]] = [
            ("start to READY (s)", *[x["ready_s"] for x in ds]),
            ("RSS at READY (MB)", *[x["rss_ready_mb"] for x in ds]),
            ("RSS peak, sampled (MB)", *[x["rss_peak_sampled_mb"] for x in ds]),
            ("VmHWM (MB)", *[x["vm_hwm_mb"] for x in ds]),
            ("RSS at the end (MB)", *[x["rss_end_mb"] for x in ds]),
            (f"idle CPU, % of one core ({st['idle_s']:g} s)", *[x["idle_cpu_pct"] for x in ds]),
            ("plan: max_batch", *[x["plan"]["max_batch"] for x in ds]),
        ]
        if "mqtt" in doc:
            daemon_rows.append(("MQTT 1-token round trip p50 (ms)",
                         *[doc["mqtt"]["one_token_rtt_p50_s"] * 1000 if k == "mqtt" else None
                           for k in names]))
        out += ["## Daemon\n",
                f"RSS sampled from /proc every {ds[0]['rss_sample_interval_s']:g} s from READY "
                "to the end of the idle period; VmHWM is the kernel's peak since start.\n",
                markdown_table(["figure", *[f"{k} daemon" for k in names]], daemon_rows)]
    out.append("![bench](bench.png)\n")
    return "\n".join(out)


COLOURS = {"raw": "C0", "engine": "C1", "socket": "C2", "mqtt": "C3"}


def render_plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if doc["concurrency"] else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2), layout="constrained")
    if doc["concurrency"]:
        ax = axes[0]
        for transport, entries in doc["concurrency"].items():
            ax.plot([e["clients"] for e in entries], [e["aggregate_tps"] for e in entries],
                    marker="o", label=transport, color=COLOURS.get(transport))
            ax.axhline(ref_of(doc, transport), color=COLOURS.get(transport), linestyle="--",
                       label=f"raw single stream ({PHASES[transport]})")
        clients = doc["settings"]["clients"]
        ax.set_xscale("log", base=2)
        ax.set_xticks(clients, [str(c) for c in clients])
        ax.set(xlabel="concurrent clients", ylabel="aggregate tok/s",
               title="Aggregate decode vs concurrency")
        ax.set_ylim(bottom=0)
        ax.legend()
    lengths = doc["settings"]["prompt_lengths"]
    for ax, key, label, title, scale in (
            (axes[-2], "decode_tps", "decode tok/s (1 stream)", "Decode vs prompt length", 1),
            (axes[-1], "ttft_p50_s", "TTFT p50 (ms)", "Time to first token", 1000)):
        for name, entries in doc["prompt_lengths"].items():
            ax.plot([e["prompt_tokens"] for e in entries],
                    [math.nan if e[key] is None else e[key] * scale for e in entries],
                    marker="o", label=name, color=COLOURS.get(name))
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.set(xlabel="prompt tokens", ylabel=label, title=title)
        if key == "decode_tps":
            ax.set_ylim(bottom=0)
        else:
            ax.set_yscale("log")
        ax.legend()
    m = doc["machine"]
    fig.suptitle(f"edgeagent {(m['git_commit'] or '?')[:8]}: {m['cpu_model']}, "
                 f"{m['threads']} threads, {doc['settings']['tokens']} tokens")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def finite(obj: Any) -> Any:
    """NaN and infinities as null, so that bench.json is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def raw_block(raw: RawLoop, prompts: dict[int, tuple[str, np.ndarray]], n: int,
              repeat: int, engine: Engine | None = None
              ) -> tuple[dict[int, list[Run]], dict[int, list[Run]]]:
    """The raw loop at every prompt length, ``repeat`` times (interleaved with the engine
    when given, so drift hits both alike): the reference of the figures measured next."""
    raw_runs: dict[int, list[Run]] = {target: [] for target in prompts}
    eng_runs: dict[int, list[Run]] = {target: [] for target in prompts}
    for _ in range(repeat):
        for target, (_, tokens) in prompts.items():
            raw_runs[target].append(raw.run(tokens, n))
            if engine is not None:
                cold(engine)  # prefill, as the raw loop does
                eng_runs[target].append(engine_run(engine, tokens, n))
    return raw_runs, eng_runs


def features_block(raw: RawLoop, engine: Engine, tokens: np.ndarray, n: int, repeat: int
                   ) -> dict[str, dict[str, Any]]:
    """Decode with each sampling feature, and without, each beside a raw loop run just
    before it (alternated, so that drift hits every figure alike): the median ratio."""
    ratios: dict[str, list[float]] = {name: [] for name in FEATURES}
    tps: dict[str, list[float]] = {name: [] for name in FEATURES}
    for _ in range(repeat):
        for name, features in FEATURES.items():
            reference = raw.run(tokens, n).decode_tps
            run = engine_run(engine, tokens, n, **features)
            tps[name].append(run.decode_tps)
            ratios[name].append(run.decode_tps / reference)
    return {name: {"decode_tps": median(tps[name]), "vs_raw": median(ratios[name]),
                   "vs_raw_runs": ratios[name]} for name in FEATURES}


def measure(args: argparse.Namespace, model_path: Path) -> tuple[dict[str, Any], list[Row]]:
    """The one measurement pipeline: the results document and the summary rows.

    Each path is compared with the raw loop run alternately with it (the raw loop stays
    loaded in this process), so that the drift of a shared machine does not show up as a
    ratio."""
    started = time.perf_counter()
    lengths: list[int] = args.prompt_lengths
    clients: list[int] = args.clients
    n: int = args.tokens
    repeat: int = args.repeat
    idle_s: float = args.idle_seconds
    context = report_context(lengths, n)
    the_plan = plan(probe(), ModelMeta.from_folder(model_path),
                    RuntimeSettings(context_length=context), LimitsSettings())
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(the_plan, model_path),
        "settings": {"tokens": n, "repeat": repeat, "quick": args.quick,
                     "report": args.report is not None, "clients": clients,
                     "prompt_lengths": lengths, "context_length": context, "idle_s": idle_s,
                     "socket": not args.no_socket, "mqtt": not args.no_mqtt}}
    phases: dict[str, float] = {}

    t = time.perf_counter()
    engine = Engine(model_path, the_plan)
    results["engine_load_s"] = time.perf_counter() - t
    raw = RawLoop(model_path, the_plan)
    results["rss_after_load_mb"] = rss_mb()
    prompts = {target: prompt_content(engine, target) for target in lengths}
    prompt_tokens = {target: len(tokens) for target, (_, tokens) in prompts.items()}
    contents = {target: content for target, (content, _) in prompts.items()}
    short = engine.encode(engine.chat_prompt([{"role": "user", "content": SHORT}]))
    raw.run(short, 8)  # warm-up
    engine_run(engine, short, 8)
    raw_runs, eng_runs = raw_block(raw, prompts, n, repeat, engine)
    prefix = prefix_block(engine, n, repeat)
    features = features_block(raw, engine, prompts[lengths[0]][1], n, repeat)
    guided = guided_block(engine, n, repeat)
    del engine  # free the cores' caches for the daemons
    gc.collect()
    cpu = cpu_block(model_path, context, short, n, repeat)
    gc.collect()
    phases["raw_and_engine_s"] = time.perf_counter() - t
    lengths_doc = {"raw": by_length(raw_runs, prompt_tokens, raw_runs),
                   "engine": by_length(eng_runs, prompt_tokens, raw_runs)}
    raw_by_phase = {"engine": lengths_doc["raw"]}
    pre = 512 if 512 in lengths else lengths[-1]
    r, e = lengths_doc["raw"], lengths_doc["engine"]
    ref = r[0]["decode_tps"]
    results["raw_single_stream_tps"] = ref
    results["raw"] = {"decode_tps": ref, "ttft_s": r[0]["ttft_p50_s"],
                      f"prefill_tps_{pre}": r[lengths.index(pre)]["prefill_tps"]}
    results["engine"] = {"decode_tps": e[0]["decode_tps"], "ttft_s": e[0]["ttft_p50_s"],
                         f"prefill_tps_{pre}": e[lengths.index(pre)]["prefill_tps"],
                         "raw_single_stream_tps": ref}
    rows: list[Row] = [
        ("decode tok/s (1 stream)", ref, e[0]["decode_tps"], "engine"),
        (f"prefill tok/s ({pre})", r[lengths.index(pre)]["prefill_tps"],
         e[lengths.index(pre)]["prefill_tps"], "engine"),
        ("TTFT ms (short prompt)", r[0]["ttft_p50_s"] * 1000, e[0]["ttft_p50_s"] * 1000,
         "engine"),
    ]
    results["features"] = features
    results["prefix"], results["cpu_per_token"] = prefix, cpu
    rows.append((f"TTFT ms, {prefix['prompt_tokens']}-token prefix cold/warm",
                 prefix["cold_ttft_ms"], prefix["warm_ttft_ms"], "engine"))
    for raw_at, eng_at in zip(r[1:], e[1:], strict=True):
        rows.append((f"decode tok/s ({raw_at['prompt_tokens']} context)",
                     raw_at["decode_tps"], eng_at["decode_tps"], "engine"))
    rows.append(("CPU ms/token, 1 thread", cpu["raw_ms"], cpu["engine_ms"], "engine"))
    contexts = [int(x["prompt_tokens"]) for x in r[1:]]
    llama = llama_cpp_figures(args.llama_python, the_plan.threads, contexts, n, repeat)
    if llama is not None:  # keyed by the rows they stand beside, and the whole document
        results["llama_cpp"] = {
            "CPU ms/token, 1 thread": llama["decode_cpu_ms"],
            **{f"decode tok/s ({c} context)": llama["decode_tps_by_context"][str(c)]
               for c in contexts},
            "figures": llama}
    # raw: the feature's figure over its median ratio, so the ratio printed is that median
    rows.extend((f"decode tok/s, {name}", f["decode_tps"] / f["vs_raw"], f["decode_tps"],
                 "engine") for name, f in features.items())
    results["guided"] = guided
    # "raw loop" column: the unguided answer in the same state (cold, or warm: its prompt
    # in the prefix cache); the ratios printed are the medians of pairs
    for name, g in guided.items():
        rows.append((f"guided decode tok/s, {name}", g["guided_warm_decode_tps"]
                     / g["decode_vs_unguided"], g["guided_warm_decode_tps"], "engine"))
        rows.append((f"guided TTFT ms, {name}, cold", g["guided_ttft_s"] * 1000
                     / g["ttft_vs_unguided"], g["guided_ttft_s"] * 1000, "engine"))
        rows.append((f"{name} first token vs unguided, warm prompt, ms",
                     g["guided_warm_ttft_s"] * 1000 / g["ttft_vs_unguided_warm"],
                     g["guided_warm_ttft_s"] * 1000, "engine"))
        rows.append((f"{name} first token vs unguided, warm prompt, CPU ms",
                     g["guided_warm_ttft_cpu_s"] * 1000 / g["ttft_cpu_vs_unguided_warm"],
                     g["guided_warm_ttft_cpu_s"] * 1000, "engine"))
    conc_doc: dict[str, list[dict[str, Any]]] = {}
    daemons: dict[str, dict[str, Any]] = {}
    c4 = 4 if 4 in clients else clients[-1]

    def transport(name: str, d: DaemonProc, one: Callable[[str, int], Streamed]) -> None:
        """The daemon's figures, against the raw loop measured between its requests."""
        got = measure_transport(d, one, lambda target: raw.run(prompts[target][1], n),
                                contents, clients, n, repeat, idle_s)
        phase_raw: dict[int, list[Run]] = got["raw"]
        raw_by_phase[name] = by_length(phase_raw, prompt_tokens, phase_raw)
        phase_ref = raw_by_phase[name][0]
        lengths_doc[name] = by_length({k: [s.run for s in v] for k, v in got["singles"].items()},
                                      {k: v[0].prompt_tokens for k, v in got["singles"].items()},
                                      phase_raw)
        conc_doc[name] = got["concurrency"]
        daemons[name] = got["daemon"]
        single = lengths_doc[name][0]
        conc4 = next(x for x in got["concurrency"] if x["clients"] == c4)
        agg = conc4["aggregate_tps"]
        results[name] = {
            "decode_tps": single["decode_tps"], "ttft_p50_s": single["ttft_p50_s"],
            "ttft_p95_s": single["ttft_p95_s"], f"concurrent{c4}_aggregate_tps": agg,
            "ready_s": d.ready_s, "daemon_rss_mb": got["daemon"]["rss_end_mb"],
            "raw_single_stream_tps": phase_ref["decode_tps"],
            "raw_ttft_s": phase_ref["ttft_p50_s"]}
        what = "clients" if name == "socket" else "requesters"
        rows.extend([
            (f"{name} decode tok/s (1 stream)", phase_ref["decode_tps"], single["decode_tps"],
             name),
            # raw: the aggregate over the median of the per-round ratios, so the ratio
            # printed is that median
            (f"{name} {c4} {what} aggregate tok/s", agg / conc4["vs_raw_single"], agg,
             name)])
        if name == "socket":
            rows.append(("socket TTFT p50 ms", phase_ref["ttft_p50_s"] * 1000,
                         single["ttft_p50_s"] * 1000, "socket"))

    workdir = Path(tempfile.mkdtemp(prefix="eab-", dir="/tmp"))  # short: sockets go there
    daemon_toml = f"[runtime]\ncontext_length = {context}\n"
    if not args.no_socket:
        t = time.perf_counter()
        with running_daemon(workdir, model_path, daemon_toml, name="socket",
                            device_id=DEVICE) as d:
            transport("socket", d, lambda content, k: socket_request(d, content, k))
            late = late_block(lambda content, k: socket_request(d, content, k), n, repeat)
            results["late_arrivals"] = late
            rows.append((f"socket TTFT ms, idle / p95 {late['clients']} random",
                         late["idle_ttft_ms"], late["ttft_p95_ms"], "socket"))
        phases["socket_s"] = time.perf_counter() - t

    if not args.no_mqtt:
        t = time.perf_counter()
        broker = Broker(workdir / "broker")
        broker.start()
        try:
            with running_daemon(workdir, model_path,
                                daemon_toml + f'[mqtt]\nurl = "{broker.url}"\n', name="mqtt",
                                device_id=DEVICE) as d:
                transport("mqtt", d, lambda content, k: mqtt_request(broker, content, k))
                rtt = mqtt_round_trip(broker, 10)
                results["mqtt"]["one_token_rtt_p50_s"] = median(rtt)
                results["mqtt"]["ttft_s"] = results["mqtt"]["ttft_p50_s"]
        finally:
            broker.stop()
        phases["mqtt_s"] = time.perf_counter() - t

    results["prompt_lengths"] = lengths_doc
    results["raw_by_phase"] = raw_by_phase
    results["concurrency"] = conc_doc
    results["daemon"] = daemons
    results["rows"] = [{"metric": name, "raw": b, "edgeagent": o, "ratio": o / b if b else None}
                       for name, b, o, _ in rows]
    results["machine"]["loadavg_at_end"] = list(os.getloadavg())
    results["phases_s"] = phases
    results["runtime_s"] = time.perf_counter() - started
    return results, rows


def write_report(doc: dict[str, Any], out: Path) -> None:
    """bench.json, bench.md and bench.png in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    (out / "bench.md").write_text(render_markdown(doc))
    render_plot(doc, out / "bench.png")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--tokens", type=int, default=128, help="tokens generated per request")
    ap.add_argument("--repeat", type=int, default=None, help="default 5 (2 with --quick)")
    ap.add_argument("--quick", action="store_true",
                    help="2 repeats (and with --report, a 5 s idle period)")
    ap.add_argument("--no-socket", action="store_true")
    ap.add_argument("--no-mqtt", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--report", type=Path, default=None, metavar="DIR",
                    help="measure more by default, and write bench.json, bench.md and "
                    "bench.png in DIR")
    ap.add_argument("--clients", type=int_list, default=None, metavar="N,N",
                    help="concurrent clients per round (default 4; 1,2,4,8 with --report)")
    ap.add_argument("--prompt-lengths", type=int_list, default=None, metavar="N,N",
                    help="prompt tokens, at most (default 32,512; 32,512,2048 with "
                    "--report); the first is the single-stream reference")
    ap.add_argument("--llama-python", type=Path, default=None, metavar="PY",
                    help="a Python with llama-cpp-python: llama.cpp's figures as a third "
                    "column (default /work/llama-venv/bin/python when it has it)")
    ap.add_argument("--no-llama", action="store_true", help="no llama.cpp column")
    ap.add_argument("--idle-seconds", type=float, default=None,
                    help="idle period for the daemon's idle CPU (default none; 10 with "
                    "--report, 5 with --report --quick)")
    args = ap.parse_args()
    if args.tokens < 2:
        ap.error("--tokens must be at least 2 (decode speed is measured after the first)")
    if args.repeat is None:
        args.repeat = 2 if args.quick else 5
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    report = args.report is not None
    if args.clients is None:
        args.clients = [1, 2, 4, 8] if report else [4]
    if args.prompt_lengths is None:
        args.prompt_lengths = [32, 512, 2048] if report else [32, 512]
    if args.llama_python is None and not args.no_llama:
        args.llama_python = default_llama_python()
    if args.no_llama:
        args.llama_python = None
    if args.idle_seconds is None:
        args.idle_seconds = (5.0 if args.quick else 10.0) if report else 0.0
    return args


def main() -> int:
    args = parse_args()
    exit_on_sigterm()  # the daemons started for the run are stopped on the way out
    results, rows = measure(args, args.model or Settings().model_path)
    doc = finite(results)
    print_summary(results, rows)
    actual = [e["prompt_tokens"] for e in results["prompt_lengths"]["raw"]]
    print(f"prompt lengths {args.prompt_lengths} (actual {actual}), clients {args.clients}, "
          f"context {results['settings']['context_length']}")
    if args.report is None:
        print(json.dumps(doc, indent=1, allow_nan=False))
    else:
        write_report(doc, args.report)
        print(f"wrote {args.report}/bench.json, bench.md, bench.png "
              f"({results['runtime_s']:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
