#!/usr/bin/env python3
"""Measure a fleet model rollout: from the push to ``applied`` for the default model.

    .venv/bin/python scripts/rollout.py                  # as fast as the local link goes
    .venv/bin/python scripts/rollout.py --rate-kbps 80000 --json out.json

A copy of the default model (hard links, another name) is packed and served by a local
HTTP server (edgeagent.testing.artifact_server); a private Mosquitto and the daemon as a
subprocess take a signed-free device push naming it. The time from the push to ``applied``
is split by the daemon's own reports and log lines (their timestamps, one clock):

- download: the push until the last progress report (100 %);
- verify: sha256 of the archive, safe unpacking, the folder's manifest, until ``activating``;
- load: the plan check and loading the new model beside the old one (``new model loaded``);
- canary: the fleet.canary prompts on the new model (``canary run``);
- swap: swapping it in, writing the overlay, until ``applied``.

One client on the socket asks all along (a short chat, ``--max-tokens``): its latency
while idle (``--idle-requests`` before the push) against during the rollout and during the
activation alone (load, canary, swap), p50/p95, in the same run. Prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edgeagent.artifact import ArtifactInfo, pack  # noqa: E402
from edgeagent.settings import Settings  # noqa: E402
from edgeagent.testing.artifact_server import serve_artifact  # noqa: E402
from edgeagent.testing.broker import Broker, Requester  # noqa: E402
from edgeagent.testing.daemon import DaemonProc, running_daemon  # noqa: E402

DEVICE = "rollout"
NEW_NAME = "rollout-v2"
OUTCOMES = ("applied", "rejected", "stale", "rolled_back")


def packed(model: Path, work: Path) -> tuple[ArtifactInfo, float]:
    """The default model under NEW_NAME (hard links: the same bytes), packed; seconds."""
    folder = work / NEW_NAME
    shutil.copytree(model, folder, copy_function=os.link)
    started = time.perf_counter()
    info = pack(folder, work / f"{NEW_NAME}.tar.gz")
    return info, time.perf_counter() - started


class Client(threading.Thread):
    """Asks the daemon, one request after the other, until stopped: (start, seconds,
    status) per request, start on the wall clock to match the daemon's timestamps."""

    def __init__(self, d: DaemonProc, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.d, self.max_tokens = d, max_tokens
        self.stop = threading.Event()
        self.samples: list[tuple[float, float, int]] = []
        self.count = threading.Semaphore(0)  # released per request done

    def run(self) -> None:
        body = {"messages": [{"role": "user", "content": "Name a colour."}],
                "max_tokens": self.max_tokens, "temperature": 0}
        with self.d.client() as c:
            while not self.stop.is_set():
                wall, began = time.time(), time.perf_counter()
                status = c.post("/v1/chat/completions", json=body).status_code
                self.samples.append((wall, time.perf_counter() - began, status))
                self.count.release()


def log_times(d: DaemonProc) -> dict[str, float]:
    """Wall-clock time of the daemon's log events this script splits the rollout by."""
    out: dict[str, float] = {}
    for line in d.logs().splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if doc.get("event") in ("new model loaded", "canary run"):
            stamp = datetime.datetime.fromisoformat(doc["timestamp"].replace("Z", "+00:00"))
            out[doc["event"]] = stamp.timestamp()
    return out


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def measure(args: argparse.Namespace, model: Path, work: Path) -> dict[str, Any]:
    artifact, pack_s = packed(model, work / "artifact")
    broker = Broker(work / "broker")
    broker.start()
    fleet = f"download_rate_kbps = {args.rate_kbps}\n" if args.rate_kbps else ""
    toml = (f'[mqtt]\nurl = "{broker.url}"\n[fleet]\n{fleet}'
            "[fleet.canary]\nmin_relative_speed = 0.0\n")
    try:
        with running_daemon(work, model, toml, device_id=DEVICE, log_level="info") as d, \
                serve_artifact(artifact.path) as server:
            reports = Requester(broker)
            reports.subscribe(f"edgeagent/{DEVICE}/config/reported")
            client = Client(d, args.max_tokens)
            client.start()
            for _ in range(args.idle_requests):
                client.count.acquire(timeout=120)
            pushed = time.time()
            reports.publish(f"edgeagent/{DEVICE}/config/desired", json.dumps({
                "version": 1, "target": {"device": DEVICE}, "settings": {},
                "model": {"url": server.url, "sha256": artifact.sha256,
                          "size": artifact.size, "name": NEW_NAME}}),
                response=False, retain=True)
            marks: dict[str, float] = {}
            while True:
                _topic, report, _ = reports.get(args.timeout)
                status = report.get("status")
                if status == "downloading" and report["progress"]["percent"] >= 100:
                    marks["downloaded"] = report["ts"]
                elif status == "activating":
                    marks["activating"] = report["ts"]
                elif status in OUTCOMES:
                    marks[status] = report["ts"]
                    break
            client.stop.set()
            client.join(120)
            reports.close()
            if "applied" not in marks:
                raise SystemExit(f"the rollout ended {report}")
            marks.update(log_times(d))
            assert server.sent == artifact.size, "downloaded once"
    finally:
        broker.stop()
    return summarize(marks, pushed, client.samples, artifact, pack_s, args)


def summarize(marks: dict[str, float], pushed: float, samples: list[tuple[float, float, int]],
              artifact: ArtifactInfo, pack_s: float, args: argparse.Namespace
              ) -> dict[str, Any]:
    bounds = [("download", pushed, marks["downloaded"]),
              ("verify", marks["downloaded"], marks["activating"]),
              ("load", marks["activating"], marks["new model loaded"]),
              ("canary", marks["new model loaded"], marks["canary run"]),
              ("swap", marks["canary run"], marks["applied"])]
    total = marks["applied"] - pushed
    phases = {name: {"s": round(end - start, 2), "share": round((end - start) / total, 3)}
              for name, start, end in bounds}

    def latency(start: float, end: float) -> dict[str, Any]:
        inside = [s for s in samples if start <= s[0] < end]
        ok = [s[1] for s in inside if s[2] == 200]
        return {"requests": len(inside), "failed": len(inside) - len(ok),
                "p50_ms": _ms(pct(ok, 0.5)), "p95_ms": _ms(pct(ok, 0.95))}

    return {
        "artifact": {"bytes": artifact.size, "pack_s": round(pack_s, 2)},
        "rate_kbps": args.rate_kbps, "push_to_applied_s": round(total, 2), "phases": phases,
        "download_mb_s": round(artifact.size / 2**20 / phases["download"]["s"], 1),
        "latency": {"idle": latency(0.0, pushed),
                    "during the rollout": latency(pushed, marks["applied"]),
                    "during the activation": latency(marks["activating"], marks["applied"])},
        "max_tokens": args.max_tokens,
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def print_table(r: dict[str, Any]) -> None:
    print(f"artifact {r['artifact']['bytes'] / 2**20:.1f} MB (packed in "
          f"{r['artifact']['pack_s']} s), rate limit {r['rate_kbps'] or 'none'} kbit/s")
    print(f"{'phase':<12}{'seconds':>9}{'share':>8}")
    for name, p in r["phases"].items():
        print(f"{name:<12}{p['s']:>9.2f}{p['share'] * 100:>7.1f}%")
    print(f"{'push->applied':<12}{r['push_to_applied_s']:>9.2f}{100:>7.1f}%  "
          f"(download {r['download_mb_s']} MB/s)")
    print(f"\nrequest latency, chat of {r['max_tokens']} tokens, one client:")
    print(f"{'window':<24}{'requests':>9}{'failed':>8}{'p50 ms':>9}{'p95 ms':>9}")
    for name, lat in r["latency"].items():
        print(f"{name:<24}{lat['requests']:>9}{lat['failed']:>8}"
              f"{lat['p50_ms'] or '-':>9}{lat['p95_ms'] or '-':>9}")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="model folder (default: the default model)")
    ap.add_argument("--rate-kbps", type=float, help="fleet.download_rate_kbps (default: none)")
    ap.add_argument("--idle-requests", type=int, default=30,
                    help="requests timed before the push (default 30)")
    ap.add_argument("--max-tokens", type=int, default=16, help="tokens per answer (16)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per report (600)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    return ap.parse_args()


def main() -> int:
    args = parse_args()
    model = args.model or Settings().model_path
    work = Path(tempfile.mkdtemp(prefix="ea-ro-", dir="/tmp"))  # short: sockets live there
    try:
        results = measure(args, model, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
