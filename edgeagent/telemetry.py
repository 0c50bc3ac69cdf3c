"""Health telemetry upstream: one JSON document every ``telemetry.interval_s``.

Published QoS 1 to ``{prefix}/{device}/telemetry``. While the broker is away, documents
wait in a bounded buffer (oldest dropped first, and counted), spooled to
``telemetry.spool_dir`` when set so they survive a restart, and go out in order after the
reconnect. Every figure is read from the counters the daemon already keeps (the same that
``/metrics`` shows); nothing is counted twice. The schema is schemas/telemetry.schema.json.
"""

from __future__ import annotations

import collections
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import structlog

from edgeagent import __version__, bus
from edgeagent.manifest import manifest_summary, write_text_atomic
from edgeagent.planner import Plan
from edgeagent.probe import probe
from edgeagent.publisher import Publisher
from edgeagent.settings import Settings, existing_ancestor

log = structlog.get_logger(__name__)

SPOOL_FILE = "telemetry.jsonl"


@dataclass(frozen=True)
class Vitals:
    """The daemon's figures a document reports, read when it is collected."""

    uptime_s: float
    ready: bool
    model_id: str
    manifest: dict[str, object] | None
    plan: Plan | None
    serving: dict[str, Any] | None  # the scheduler's snapshot
    counters: dict[str, int]  # every component's, as /metrics shows them
    config: dict[str, object]  # the configuration in effect: version, hash, last apply


class Telemetry:
    """Receives the ``publisher`` it sends through, the running ``settings`` and the
    daemon's ``vitals``; never the daemon."""

    def __init__(self, publisher: Publisher, settings: Callable[[], Settings],
                 vitals: Callable[[], Vitals]) -> None:
        self.publisher = publisher
        self.settings = settings
        self.vitals = vitals
        self.seq = 0
        self.dropped = 0
        self.published = 0
        self.spool_errors = 0
        self._spool_error: str | None = None  # the last failure, logged once
        self._buffer: collections.deque[str] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="telemetry", daemon=True)
        self._process = psutil.Process()
        self._process.cpu_percent(None)  # primes the per-process CPU figure
        self._load_spool()

    @property
    def topic(self) -> str:
        return bus.telemetry_topic(self.settings())

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def counters(self) -> dict[str, int]:
        return {"telemetry_buffered": self.buffered, "telemetry_dropped": self.dropped,
                "telemetry_published": self.published,
                "telemetry_spool_errors": self.spool_errors}

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.publisher.on_connected(self._wake.set)
        self._thread.start()

    def interval_changed(self) -> None:
        """Settings changed: the loop re-reads the interval at once."""
        self._wake.set()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        last = float("-inf")
        while not self._stop:
            interval = self.settings().telemetry.interval_s  # live: re-read each time
            now = time.monotonic()
            if now >= last + interval:
                last = now
                try:
                    self._enqueue(json.dumps(self.collect(), separators=(",", ":")))
                except Exception:
                    log.exception("telemetry collection failed")
            self._flush()
            left = last + interval - time.monotonic()  # clamped: a huge interval must not overflow
            self._wake.wait(timeout=min(max(0.0, left), threading.TIMEOUT_MAX))
            self._wake.clear()

    # ------------------------------------------------------------ buffer
    def _enqueue(self, doc: str) -> None:
        limit = self.settings().telemetry.buffer_max
        with self._lock:
            self._buffer.append(doc)
            while len(self._buffer) > limit:
                self._buffer.popleft()
                self.dropped += 1

    def _flush(self) -> None:
        if not self.publisher.connected:
            self._save_spool()
            return
        with self._lock:
            pending = list(self._buffer)
        for doc in pending:
            if not self.publisher.publish(self.topic, doc):
                break  # the connection went away: keep the rest, in order
            with self._lock:
                self._buffer.popleft()
            self.published += 1
        self._save_spool()

    def _spool_path(self) -> Path | None:
        spool = self.settings().telemetry.spool_dir
        return spool / SPOOL_FILE if spool is not None else None

    def _save_spool(self) -> None:
        path = self._spool_path()
        if path is None:
            return
        with self._lock:
            lines = list(self._buffer)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, "".join(line + "\n" for line in lines))
        except (OSError, ValueError) as exc:  # a full disk, a bad folder: keep publishing
            self.spool_errors += 1
            if str(exc) != self._spool_error:
                log.warning("telemetry spool not written; documents stay in memory",
                            path=str(path), error=str(exc))
            self._spool_error = str(exc)
            return
        if self._spool_error is not None:
            log.info("telemetry spool written again", path=str(path))
            self._spool_error = None

    def _load_spool(self) -> None:
        path = self._spool_path()
        try:
            if path is None or not path.exists():
                return
            text = path.read_text(encoding="utf-8")
        except (OSError, ValueError) as exc:
            log.warning("telemetry spool not readable", path=str(path), error=str(exc))
            return
        for line in text.splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                continue  # a torn last line from a crash
            self.seq = max(self.seq, int(doc.get("seq", 0)))
            self._enqueue(line)
        log.info("telemetry spool replayed", documents=len(self._buffer))

    # ------------------------------------------------------------ the document
    def collect(self) -> dict[str, Any]:
        d = self.vitals()
        s = self.settings()
        self.seq += 1
        hw = probe(s.runtime.probe_root)
        transport = d.counters
        plan = d.plan
        try:
            free_disk = psutil.disk_usage(str(existing_ancestor(s.state_dir))).free
        except OSError:
            free_disk = None
        load = os.getloadavg()
        return {
            "ts": time.time(),
            "seq": self.seq,
            "device_id": s.device_id,
            "version": __version__,
            "uptime_s": round(d.uptime_s, 1),
            "cpu": {
                "percent": psutil.cpu_percent(None),
                "process_percent": self._process.cpu_percent(None),
                "load": [round(x, 2) for x in load],
                "threads": plan.threads if plan else None,
                "temperatures_c": hw.temperatures_c,
                "throttle_count": hw.thermal_throttle_count,
            },
            "memory": {
                "total_bytes": hw.mem_total_bytes,
                "available_bytes": hw.effective_available_bytes,
                "cgroup_limit_bytes": hw.cgroup_memory_limit_bytes,
                "rss_bytes": self._process.memory_info().rss,
            },
            "disk": {"state_dir_free_bytes": free_disk},
            "model": {
                "id": d.model_id,
                "sha256": manifest_summary(d.manifest)["sha256"],
                "loaded": d.ready,
                "context_length": plan.context_length if plan else None,
                "threads": plan.threads if plan else None,
            },
            "serving": d.serving,
            "mqtt": {
                "state": self.publisher.state(),
                "reconnects": transport.get("mqtt_reconnects", 0),
                "buffered": transport.get("mqtt_buffered", 0),
                "dropped": self.dropped,
            },
            "telemetry": {"buffered": self.buffered, "dropped": self.dropped},
            "config": d.config,
        }
