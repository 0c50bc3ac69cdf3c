#!/usr/bin/env python3
"""Benchmark edgeagent against the raw onnxruntime-genai loop, measured in the same run.

    .venv/bin/python scripts/bench.py            # raw loop, engine, socket
    .venv/bin/python scripts/bench.py --quick    # fewer repeats
    .venv/bin/python scripts/bench.py --json out.json

Every figure is printed beside the raw loop's, as a ratio: the machine's speed cancels out.
Decode runs 128 greedy tokens with the end of sequence blocked; prefill uses a 512-token
prompt; time to first token (TTFT) is from the request to the first token.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import onnxruntime_genai as og  # noqa: E402

from edgeagent.engine import Delta, Engine, Sampling  # noqa: E402
from edgeagent.planner import ModelMeta, Plan, genai_overlay, plan  # noqa: E402
from edgeagent.probe import probe  # noqa: E402
from edgeagent.settings import LimitsSettings, RuntimeSettings, Settings  # noqa: E402


@dataclass
class Run:
    decode_tps: float
    ttft_s: float
    prefill_tps: float | None = None


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prompt_of(engine: Engine, n_tokens: int) -> np.ndarray:
    """A chat prompt of about ``n_tokens`` tokens."""
    filler = "The quick brown fox jumps over the lazy dog. "
    text = filler * max(1, n_tokens // 10)
    tokens = engine.encode(engine.chat_prompt([{"role": "user", "content": text}]))
    while len(tokens) > n_tokens:
        text = text[: int(len(text) * n_tokens / len(tokens)) - 1]
        tokens = engine.encode(engine.chat_prompt([{"role": "user", "content": text}]))
    return tokens


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
        return Run((count - 1) / (t2 - t1), t1 - t0, len(tokens) / (t1 - t0))


def engine_run(engine: Engine, tokens: np.ndarray, n: int) -> Run:
    t0 = time.perf_counter()
    first = last = 0.0
    count = 0
    for item in engine.generate(tokens, Sampling(max_tokens=n, ignore_eos=True)):
        if isinstance(item, Delta):
            last = time.perf_counter()
            count += 1
            if count == 1:
                first = last
    return Run((count - 1) / (last - first), first - t0, len(tokens) / (first - t0))


# ---------------------------------------------------------------- socket
class Daemon:
    """``edgeagent run`` as a subprocess on a private socket, ready when READY=1 arrives."""

    def __init__(self, model_path: Path, context: int, mqtt_url: str | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="eab-", dir="/tmp"))
        self.sock = self.dir / "api.sock"
        cfg = self.dir / "bench.toml"
        mqtt = f'[mqtt]\nurl = "{mqtt_url}"\n' if mqtt_url else ""
        cfg.write_text(f'state_dir = "{self.dir / "state"}"\ndevice_id = "bench"\n'
                       f'[model]\npath = "{model_path}"\n'
                       f'[runtime]\ncontext_length = {context}\n{mqtt}'
                       f'[socket]\npath = "{self.sock}"\n[log]\nlevel = "warning"\n'
                       'format = "json"\n')
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(self.dir / "notify"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEAGENT_")}
        env["NOTIFY_SOCKET"] = str(self.dir / "notify")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "edgeagent", "run", "--config",
                                      str(cfg)], env=env, cwd=REPO,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        notify.settimeout(180)
        while b"READY=1" not in notify.recv(4096):
            pass
        self.ready_s = time.perf_counter() - self.started
        notify.close()

    def client(self) -> httpx.Client:
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(self.sock)),
                            base_url="http://localhost", timeout=300)

    def stream(self, messages: list[dict[str, str]], n: int) -> tuple[Run, int]:
        """Stream one chat completion; tokens are counted from the usage chunk, since
        the daemon may send several tokens in one event."""
        body = {"messages": messages, "max_tokens": n, "min_tokens": n, "stream": True,
                "temperature": 0, "stream_options": {"include_usage": True}}
        t0 = time.perf_counter()
        first = last = 0.0
        tokens = 0
        with self.client() as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                doc = json.loads(line[6:])
                if doc.get("usage"):
                    tokens = doc["usage"]["completion_tokens"]
                elif doc["choices"] and doc["choices"][0]["delta"].get("content"):
                    last = time.perf_counter()
                    if not first:
                        first = last
        return Run((tokens - 1) / (last - first), first - t0), tokens

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


def mqtt_stream(broker: Any, n: int, i: int = 0) -> tuple[Run, int]:
    """One streamed request over MQTT 5 (response topic + correlation data)."""
    from tests.broker import requester

    body = {"messages": [{"role": "user", "content": f"Tell story number {i}."}],
            "max_tokens": n, "min_tokens": n, "stream": True, "temperature": 0}
    with requester(broker) as r:
        t0 = time.perf_counter()
        r.request("edgeagent/bench/request", body, correlation=os.urandom(8))
        first = last = 0.0
        chunks = 0
        while True:
            _, doc, _ = r.get(300)
            choice = doc["choices"][0]
            if choice["delta"].get("content"):
                last = time.perf_counter()
                chunks += 1
                if chunks == 1:
                    first = last
            if choice.get("finish_reason"):
                break
    return Run((chunks - 1) / (last - first), first - t0), chunks


def mqtt_round_trip(broker: Any, count: int) -> list[float]:
    """Latency of 1-token requests: publish to reply received."""
    from tests.broker import requester

    out = []
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    with requester(broker) as r:
        for _ in range(count):
            t0 = time.perf_counter()
            r.request("edgeagent/bench/request", body, correlation=os.urandom(8))
            r.get(60)
            out.append(time.perf_counter() - t0)
    return sorted(out)


def median_run(runs: list[Run]) -> Run:
    return Run(statistics.median(r.decode_tps for r in runs),
               statistics.median(r.ttft_s for r in runs),
               statistics.median(r.prefill_tps for r in runs) if runs[0].prefill_tps else None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="2 repeats")
    ap.add_argument("--no-socket", action="store_true")
    ap.add_argument("--no-mqtt", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args()
    repeat = 2 if args.quick else args.repeat
    model_path = args.model or Settings().model_path
    context = 2048
    the_plan = plan(probe(), ModelMeta.from_folder(model_path),
                    RuntimeSettings(context_length=context), LimitsSettings())
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "threads": the_plan.threads,
                                           "model": str(model_path)}}

    t = time.perf_counter()
    engine = Engine(model_path, the_plan)
    results["engine_load_s"] = time.perf_counter() - t
    raw = RawLoop(model_path, the_plan)
    results["rss_after_load_mb"] = rss_mb()
    short = engine.encode(engine.chat_prompt([{"role": "user", "content": "Tell a story."}]))
    long = prompt_of(engine, 512)

    raw_run(raw, short, 8)  # warm-up
    engine_run(engine, short, 8)
    raw_decode, eng_decode, raw_pre, eng_pre = [], [], [], []
    for _ in range(repeat):  # interleaved, so drift hits both alike
        raw_decode.append(raw.run(short, args.tokens))
        eng_decode.append(engine_run(engine, short, args.tokens))
        raw_pre.append(raw.run(long, 2))
        eng_pre.append(engine_run(engine, long, 2))
    r, e = median_run(raw_decode), median_run(eng_decode)
    rp, ep = median_run(raw_pre), median_run(eng_pre)
    results["raw"] = {"decode_tps": r.decode_tps, "ttft_s": r.ttft_s,
                      "prefill_tps_512": rp.prefill_tps}
    results["engine"] = {"decode_tps": e.decode_tps, "ttft_s": e.ttft_s,
                         "prefill_tps_512": ep.prefill_tps}
    rows = [
        ("decode tok/s (1 stream)", r.decode_tps, e.decode_tps, "engine"),
        ("prefill tok/s (512)", rp.prefill_tps, ep.prefill_tps, "engine"),
        ("TTFT ms (short prompt)", r.ttft_s * 1000, e.ttft_s * 1000, "engine"),
    ]
    del engine  # free the cores' caches for the daemon

    if not args.no_socket:
        d = Daemon(model_path, context)
        try:
            msgs = [{"role": "user", "content": "Tell a story."}]
            d.stream(msgs, 8)
            sock_runs = [d.stream(msgs, args.tokens)[0] for _ in range(repeat)]
            ttfts = sorted(x.ttft_s for x in sock_runs)
            s = median_run(sock_runs)

            def one(i: int) -> int:
                return d.stream([{"role": "user", "content": f"Tell story number {i}."}],
                                args.tokens)[1]

            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                total = sum(pool.map(one, range(4)))
            agg = total / (time.perf_counter() - t0)
            results["socket"] = {
                "decode_tps": s.decode_tps, "ttft_p50_s": statistics.median(ttfts),
                "ttft_p95_s": ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))],
                "concurrent4_aggregate_tps": agg, "ready_s": d.ready_s,
                "daemon_rss_mb": d.rss_mb()}
            rows += [
                ("socket decode tok/s (1 stream)", r.decode_tps, s.decode_tps, "socket"),
                ("socket 4 clients aggregate tok/s", r.decode_tps, agg, "socket"),
                ("socket TTFT p50 ms", r.ttft_s * 1000, statistics.median(ttfts) * 1000,
                 "socket"),
            ]
        finally:
            d.stop()

    if not args.no_mqtt:
        from tests.broker import Broker

        broker = Broker(Path(tempfile.mkdtemp(prefix="eab-mq-", dir="/tmp")))
        broker.start()
        d = Daemon(model_path, context, broker.url)
        try:
            mqtt_stream(broker, 8)
            runs = [mqtt_stream(broker, args.tokens)[0] for _ in range(repeat)]
            m = median_run(runs)
            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                total = sum(c for _, c in pool.map(
                    lambda i: mqtt_stream(broker, args.tokens, i), range(4)))
            agg = total / (time.perf_counter() - t0)
            rtt = mqtt_round_trip(broker, 10)
            results["mqtt"] = {"decode_tps": m.decode_tps, "concurrent4_aggregate_tps": agg,
                               "one_token_rtt_p50_s": statistics.median(rtt),
                               "ttft_s": m.ttft_s}
            rows += [
                ("mqtt decode tok/s (1 stream)", r.decode_tps, m.decode_tps, "mqtt"),
                ("mqtt 4 requesters aggregate tok/s", r.decode_tps, agg, "mqtt"),
            ]
        finally:
            d.stop()
            broker.stop()

    print(f"\nedgeagent bench: {results['machine']}")
    print(f"{'metric':38} {'raw loop':>10} {'edgeagent':>10} {'ratio':>7}")
    for name, base, ours, _ in rows:
        ratio = ours / base if base else float("nan")
        print(f"{name:38} {base:10.1f} {ours:10.1f} {ratio:7.3f}")
    if "socket" in results:
        s2 = results["socket"]
        print(f"{'socket TTFT p50 - raw TTFT (ms)':38} "
              f"{(s2['ttft_p50_s'] - r.ttft_s) * 1000:+10.1f}")
        print(f"start to READY: {s2['ready_s']:.2f}s; daemon RSS {s2['daemon_rss_mb']:.0f} MB")
    if "mqtt" in results:
        rtt_ms = results["mqtt"]["one_token_rtt_p50_s"] * 1000
        print(f"mqtt 1-token round trip p50: {rtt_ms:.1f} ms")
    print(f"bench process RSS after loading both models: {results['rss_after_load_mb']:.0f} MB")
    results["rows"] = [{"metric": n, "raw": b, "edgeagent": o, "ratio": o / b if b else None}
                       for n, b, o, _ in rows]
    print(json.dumps(results, indent=1, default=lambda o: asdict(o)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


def raw_run(raw: RawLoop, tokens: np.ndarray, n: int) -> Run:
    return raw.run(tokens, n)


if __name__ == "__main__":
    sys.exit(main())
