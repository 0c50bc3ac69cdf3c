"""Issue 13's two engine measurements, in process with the real default model.

``warm-cold``: a ~1,000-token system prompt answered cold (a prompt never seen) and warm
(the same system prompt, another question: the prefix cache's case), alternated; prints the
process CPU time of each and the warm/cold ratio per pair (one thread: other load on the
machine barely moves CPU time).

``arrivals``: time to first token under 4 clients sending at random intervals (each waits a
random gap, sends, waits for its answer, again) against the same request alone on an idle
engine; prints p50/p95 and p95 / idle.

Runs against whichever edgeagent is importable, so the code before a change can be measured
with PYTHONPATH pointing at a checkout of it (the plan's settings it does not know are left
out)::

    .venv/bin/python scripts/measure_prefix_arrivals.py warm-cold --threads 1
    .venv/bin/python scripts/measure_prefix_arrivals.py arrivals
"""

from __future__ import annotations

import argparse
import random
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgeagent.engine import Delta, Engine, Sampling
from edgeagent.planner import ModelMeta, plan
from edgeagent.probe import probe
from edgeagent.scheduler import Item, Job, Scheduler
from edgeagent.settings import LimitsSettings, RuntimeSettings, Settings
from edgeagent.testing.prompts import system_prompt as shared_prompt

MODEL = Path.home() / ".local/share/edgeagent/models/smollm2-135m-instruct-int4"


def load(model: Path, threads: int | None, context: int) -> Engine:
    runtime: dict[str, Any] = {"context_length": context}
    if threads:
        runtime["threads"] = threads
    meta = ModelMeta.from_folder(model)
    return Engine(model, plan(probe(), meta, RuntimeSettings(**runtime), LimitsSettings()))


def system_prompt(topic: str, sensors: int = 28) -> str:
    return shared_prompt(topic, sensors)


def cpu_time(engine: Engine, prompt: np.ndarray, max_tokens: int) -> float:
    start = time.process_time()
    for _ in engine.generate(prompt, Sampling(max_tokens=max_tokens)):
        pass
    return time.process_time() - start


def warm_cold(engine: Engine, pairs: int, max_tokens: int) -> None:
    ratios = []
    for i in range(pairs):
        system = system_prompt(f"unit{i}")  # never seen: cold
        cold_prompt = engine.chat_tokens([{"role": "system", "content": system},
                                          {"role": "user", "content": "Any alarms?"}])
        warm_prompt = engine.chat_tokens([{"role": "system", "content": system},
                                          {"role": "user", "content": "Which line is 3 on?"}])
        cold = cpu_time(engine, cold_prompt, max_tokens)
        warm = cpu_time(engine, warm_prompt, max_tokens)
        ratios.append(warm / cold)
        print(f"pair {i}: prompt {len(cold_prompt)} tokens, cold {cold * 1000:.0f} ms CPU, "
              f"warm {warm * 1000:.0f} ms CPU, warm/cold {warm / cold:.3f}")
    print(f"warm/cold: median {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}, {pairs} pairs, "
          f"max_tokens {max_tokens})")


QUESTIONS = ["Name a river.", "What is a relay?", "Give me a number.", "Describe a valve.",
             "Say hello to the operator.", "What does a gateway do?", "Name a colour.",
             "What is MQTT?"]


def ttft(scheduler: Scheduler, engine: Engine, question: str, max_tokens: int) -> float:
    """Seconds from submit to the first token of one request."""
    first = threading.Event()
    done = threading.Event()

    def sink(item: Item) -> None:
        if isinstance(item, Delta):
            first.set()
        else:
            done.set()

    tokens = engine.chat_tokens([{"role": "user", "content": question}])
    job = Job(np.asarray(tokens), Sampling(max_tokens=max_tokens, ignore_eos=True), sink,
              deadline=time.monotonic() + 600)
    scheduler.submit(job)
    assert done.wait(600), "no answer"
    assert job.first_token is not None
    return job.first_token - job.submitted


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def arrivals(engine: Engine, clients: int, requests: int, max_tokens: int, gap: float,
             seed: int, window_ms: float | None) -> None:
    settings = Settings()
    if window_ms is not None:
        settings.runtime.batch_window_ms = window_ms
    scheduler = Scheduler(engine, engine.plan, settings)
    scheduler.start()
    try:
        # Warm-up to the steady state: the prefix cache full and the engine's spare
        # generators made (while idle it makes one after each request until then).
        for q in QUESTIONS:
            ttft(scheduler, engine, q, 4)
        idle = [ttft(scheduler, engine, q, max_tokens) for q in QUESTIONS]
        rng = random.Random(seed)
        gaps = [[rng.uniform(0, 2 * gap) for _ in range(requests)] for _ in range(clients)]
        loaded: list[float] = []
        lock = threading.Lock()

        def client(c: int) -> None:
            for r in range(requests):
                time.sleep(gaps[c][r])  # a random interval, not all at once
                t = ttft(scheduler, engine, QUESTIONS[(c + r) % len(QUESTIONS)], max_tokens)
                with lock:
                    loaded.append(t)

        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        scheduler.stop()
    idle_p50 = statistics.median(idle)
    print(f"idle TTFT p50 {idle_p50 * 1000:.0f} ms; {clients} clients at random intervals "
          f"(mean gap {gap:.1f} s, {max_tokens} tokens each, {len(loaded)} requests): "
          f"TTFT p50 {pct(loaded, 0.5) * 1000:.0f} ms, p95 {pct(loaded, 0.95) * 1000:.0f} ms, "
          f"p95 / idle p50 {pct(loaded, 0.95) / idle_p50:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["warm-cold", "arrivals"])
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--threads", type=int, default=None, help="default: the plan's")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="default: 1 for warm-cold (the prefill), 64 for arrivals")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=6, help="per client")
    parser.add_argument("--gap", type=float, default=1.0, help="mean seconds between sends")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-window-ms", type=float, default=None,
                        help="runtime.batch_window_ms (default: the setting's default)")
    args = parser.parse_args()
    engine = load(args.model, args.threads, args.context)
    if args.what == "warm-cold":
        warm_cold(engine, args.pairs, args.max_tokens or 1)
    else:
        arrivals(engine, args.clients, args.requests, args.max_tokens or 64, args.gap,
                 args.seed, args.batch_window_ms)


if __name__ == "__main__":
    main()
