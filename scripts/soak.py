#!/usr/bin/env python3
"""Soak the daemon: mixed traffic for a while, RSS and file descriptors sampled throughout.

    .venv/bin/python scripts/soak.py --seconds 60          # short (the test suite runs it)
    .venv/bin/python scripts/soak.py --long                # an hour

RSS growth is a trend (the median of the last fifth of the samples after warm-up less the
median of the first fifth), so a transient peak is not counted as growth.

Traffic, from several client threads at once: socket and MQTT, streaming and not, cancels
(a stream closed early, an MQTT cancel), and bad inputs. The daemon's own Mosquitto and
socket are private to the run; nothing leaves the machine. Prints a JSON report and exits 1
when RSS grew more than --max-growth-mb after warm-up, a batch slot or a descriptor leaked,
or the daemon died.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edgeagent.testing.broker import Broker, Requester  # noqa: E402
from edgeagent.testing.daemon import DaemonProc, running_daemon  # noqa: E402

DEVICE = "soak"

PROMPTS = ["Name a colour.", "Say hello.", "Count to five.", "What is 2 + 2?",
           "Name a river.", "Write one word."]
BAD = [b"{not json", b"\xff\xfe", b'{"messages": []}', b'{"messages": "x"}',
       b'{"messages": [{"role": "user", "content": "hi"}], "colour": 1}']


def rss_growth(rss_mb: list[float]) -> float:
    """Growth as a trend: the median of the last fifth of the samples less the median of the
    first fifth. A transient peak (a full batch's buffers, freed again) is not growth."""
    if len(rss_mb) < 2:
        return 0.0
    fifth = max(1, len(rss_mb) // 5)
    return statistics.median(rss_mb[-fifth:]) - statistics.median(rss_mb[:fifth])


def daemon_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def http_worker(d: DaemonProc, stop: threading.Event, counts: dict[str, int], seed: int) -> None:
    rnd = random.Random(seed)
    with d.client() as c:
        while not stop.is_set():
            kind = rnd.choice(["plain", "stream", "cancel", "bad"])
            msgs = [{"role": "user", "content": rnd.choice(PROMPTS)}]
            if kind == "plain":
                r = c.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 8})
                counts[f"http_{r.status_code}"] = counts.get(f"http_{r.status_code}", 0) + 1
            elif kind in ("stream", "cancel"):
                body = {"messages": msgs, "max_tokens": 16, "stream": True}
                with c.stream("POST", "/v1/chat/completions", json=body) as r:
                    for i, _ in enumerate(r.iter_lines()):
                        if kind == "cancel" and i >= 2:
                            break
                counts[kind] = counts.get(kind, 0) + 1
            else:
                r = c.post("/v1/chat/completions", content=rnd.choice(BAD),
                           headers={"Content-Type": "application/json"})
                counts[f"bad_{r.status_code}"] = counts.get(f"bad_{r.status_code}", 0) + 1


def mqtt_worker(broker: Broker, stop: threading.Event, counts: dict[str, int],
                seed: int) -> None:
    rnd = random.Random(seed)
    r = Requester(broker)
    try:
        while not stop.is_set():
            kind = rnd.choice(["plain", "stream", "cancel", "bad"])
            rid = os.urandom(6).hex()
            if kind == "bad":
                r.publish(f"edgeagent/{DEVICE}/request", rnd.choice(BAD), correlation=rid.encode())
                r.get(60)
            else:
                body: dict[str, Any] = {
                    "messages": [{"role": "user", "content": rnd.choice(PROMPTS)}],
                    "max_tokens": 16, "stream": kind != "plain", "id": rid}
                r.request(f"edgeagent/{DEVICE}/request", body, correlation=rid.encode())
                if kind == "cancel":
                    r.get(60)
                    r.publish(f"edgeagent/{DEVICE}/cancel", json.dumps({"id": rid}),
                              response=False)
                r.until_final(60)
            counts[f"mqtt_{kind}"] = counts.get(f"mqtt_{kind}", 0) + 1
    finally:
        r.close()


def warm_up(d: DaemonProc) -> None:
    """Full batches first, so the engine's largest buffers exist before the measurement
    (allocations that then stay are not growth)."""
    def one(i: int) -> None:
        body = {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                "max_tokens": 16, "stream": True}
        with d.client() as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
            for _ in r.iter_lines():
                pass

    for _ in range(3):
        burst = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in burst:
            t.start()
        for t in burst:
            t.join(120)


def soak(d: DaemonProc, broker: Broker, args: argparse.Namespace) -> dict[str, Any]:
    """Mixed traffic for ``args.seconds``, the daemon's RSS and descriptors sampled each
    second; the report."""
    stop = threading.Event()
    counts: dict[str, int] = {}
    threads = [threading.Thread(target=http_worker, args=(d, stop, counts, i))
               for i in range(args.clients)]
    threads += [threading.Thread(target=mqtt_worker, args=(broker, stop, counts, 100 + i))
                for i in range(args.mqtt_clients)]
    warm_up(d)
    warmup = args.warmup if args.warmup is not None else args.seconds / 5
    samples: list[tuple[float, float, int]] = []
    start = time.monotonic()
    for t in threads:
        t.start()
    try:
        while (elapsed := time.monotonic() - start) < args.seconds:
            samples.append((elapsed, d.rss_mb(), daemon_fds(d.proc.pid)))
            stop.wait(1.0)  # the sampling period, not a synchronisation
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    with d.client() as c:
        serving = c.get("/health").json()["serving"]
    after = [s for s in samples if s[0] >= warmup]
    growth = rss_growth([s[1] for s in after])
    fds_growth = (after[-1][2] - after[0][2]) if after else 0
    alive = d.proc.poll() is None
    return {
        "seconds": args.seconds, "requests": counts, "total": sum(counts.values()),
        "rss_mb_first_after_warmup": after[0][1] if after else None,
        "rss_mb_max": max(s[1] for s in samples) if samples else None,
        "rss_growth_after_warmup_mb": round(growth, 2), "fd_growth": fds_growth,
        "rss_mb_every_10s": [round(s[1], 1) for s in samples[::10]],
        "active_sequences_at_end": serving["active_sequences"],
        "queue_depth_at_end": serving["queue_depth"], "daemon_alive": alive,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--long", action="store_true", help="a one-hour soak (--seconds 3600)")
    ap.add_argument("--warmup", type=float, default=None, help="default: a fifth of the run")
    ap.add_argument("--clients", type=int, default=3, help="HTTP client threads")
    ap.add_argument("--mqtt-clients", type=int, default=2)
    ap.add_argument("--max-growth-mb", type=float, default=5.0)
    ap.add_argument("--model", type=Path, default=None)
    args = ap.parse_args()
    from edgeagent.settings import Settings

    if args.long:
        args.seconds = 3600.0
    model = args.model or Settings().model_path
    workdir = Path(tempfile.mkdtemp(prefix="soak-", dir="/tmp"))
    broker = Broker(workdir / "broker")
    broker.start()
    try:
        # No prefix cache: it is a bounded allocation that fills as distinct prompts run
        # alone (up to max_batch full-context KV caches, planned), which a leak trend would
        # count; the cache's own bound is tested in tests/test_prefix_cache.py.
        with running_daemon(workdir, model, "[runtime]\ncontext_length = 1024\n"
                            "prefix_cache_mb = 0\n"
                            f'[mqtt]\nurl = "{broker.url}"\n', device_id=DEVICE) as d:
            report = soak(d, broker, args)
    finally:
        broker.stop()
    print(json.dumps(report, indent=1))
    ok = (report["daemon_alive"] and report["rss_growth_after_warmup_mb"] <= args.max_growth_mb
          and report["fd_growth"] <= 2 and report["active_sequences_at_end"] == 0
          and report["queue_depth_at_end"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
