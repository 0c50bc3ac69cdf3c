"""Prometheus metrics. Every figure is read from the scheduler's and the daemon's own
counters at scrape time, never counted a second time."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector


@dataclass(frozen=True)
class Figures:
    """What a scrape reads, at scrape time."""

    ready: bool
    uptime_s: float
    counters: dict[str, int]  # transports', telemetry's, the fleet's
    serving: dict[str, Any] | None  # the scheduler's snapshot, once the model is loaded


class FiguresCollector(Collector):
    def __init__(self, figures: Figures) -> None:
        self.figures = figures

    def collect(self) -> Iterator[Metric]:
        f = self.figures
        yield GaugeMetricFamily("edgeagent_ready", "1 when the model is loaded and serving",
                                value=1.0 if f.ready else 0.0)
        yield GaugeMetricFamily("edgeagent_uptime_seconds", "Seconds since start",
                                value=f.uptime_s)
        for name, value in f.counters.items():
            yield CounterMetricFamily(f"edgeagent_{name}", name.replace("_", " "),
                                      value=float(value))
        if f.serving is None:
            return
        snap = f.serving
        yield GaugeMetricFamily("edgeagent_queue_depth", "Requests waiting for a batch slot",
                                value=snap["queue_depth"])
        yield GaugeMetricFamily("edgeagent_active_sequences", "Sequences being generated",
                                value=snap["active_sequences"])
        yield GaugeMetricFamily("edgeagent_batch_capacity", "Sequences generated at once",
                                value=snap["capacity"])
        yield GaugeMetricFamily("edgeagent_prefix_cache_entries",
                                "Prompts held by the prefix cache",
                                value=snap["prefix_cache_entries"])
        yield GaugeMetricFamily("edgeagent_prefix_cache_bytes",
                                "Memory the prefix cache holds (KV caches of idle generators)",
                                value=snap["prefix_cache_bytes"])
        for key, help_ in (("submitted", "Requests admitted"),
                           ("completed", "Requests finished"),
                           ("cancelled", "Requests cancelled"),
                           ("prompt_tokens", "Prompt tokens processed"),
                           ("generated_tokens", "Tokens generated"),
                           ("prefix_cache_hits", "Requests started from the prefix cache"),
                           ("prefix_cache_tokens_saved",
                            "Prompt tokens the prefix cache spared prefilling")):
            yield CounterMetricFamily(f"edgeagent_{key}", help_, value=snap[key])
        rejected = CounterMetricFamily("edgeagent_rejected", "Requests refused at admission",
                                       labels=["reason"])
        for reason, count in snap["rejected"].items():
            rejected.add_metric([reason], count)
        yield rejected
        errors = CounterMetricFamily("edgeagent_errors", "Requests failed after admission",
                                     labels=["kind"])
        for kind, count in snap["errors"].items():
            errors.add_metric([kind], count)
        yield errors
        yield GaugeMetricFamily("edgeagent_decode_tokens_per_second",
                                "Moving average of per-request decode speed",
                                value=snap["decode_tokens_per_s"])
        ttft = GaugeMetricFamily("edgeagent_time_to_first_token_seconds",
                                 "Time to first token over recent requests",
                                 labels=["quantile"])
        for q, key in (("0.5", "ttft_p50_s"), ("0.95", "ttft_p95_s")):
            if snap[key] is not None:
                ttft.add_metric([q], snap[key])
        yield ttft


def render_metrics(figures: Figures) -> tuple[bytes, str]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FiguresCollector(figures))
    return generate_latest(registry), CONTENT_TYPE_LATEST
