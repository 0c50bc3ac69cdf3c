"""Settings liveness: each setting says when a change takes effect, and applying uses it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog

from edgeagent.docs import settings_reference
from edgeagent.settings import LIVENESS, Settings, changed_settings, leaf_fields, liveness

DEVICE = "edgeagent/test-d/config/desired"
REPORTED = "edgeagent/test-d/config/reported"


def _with(settings: Settings, **sections: dict[str, Any]) -> Settings:
    """``settings`` with some sections' fields replaced, validated like a pushed patch."""
    doc = settings.model_dump()
    for section, values in sections.items():
        doc[section] = {**doc[section], **values}
    return Settings(**doc)


def test_every_leaf_setting_declares_its_liveness() -> None:
    names = [name for name, _ in leaf_fields()]
    assert "runtime.batch_window_ms" in names and "profiles" in names
    for name, info in leaf_fields():
        assert liveness(info) in LIVENESS, f"{name} declares no liveness"


@pytest.mark.parametrize(("section", "values", "expected"), [
    ("runtime", {"batch_window_ms": 5.0}, {"scheduler": ["runtime.batch_window_ms"]}),
    ("limits", {"max_queue": 3}, {"scheduler": ["limits.max_queue"]}),
    ("runtime", {"threads": 1}, {"reload": ["runtime.threads"]}),
    ("limits", {"min_output_tokens": 8}, {"reload": ["limits.min_output_tokens"]}),
    ("model", {"verify": False}, {"reload": ["model.verify"]}),
    ("socket", {"path": Path("/tmp/other.sock")}, {"restart": ["socket.path"]}),
    ("limits", {"max_connections": 7}, {"restart": ["limits.max_connections"]}),
    ("telemetry", {"interval_s": 1.0}, {"live": ["telemetry.interval_s"]}),
    ("log", {"level": "debug"}, {"live": ["log.level"]}),
])
def test_changed_settings_are_grouped_by_liveness(
    section: str, values: dict[str, Any], expected: dict[str, list[str]]
) -> None:
    old = Settings()
    assert changed_settings(old, _with(old, **{section: values})) == expected


def test_changed_settings_of_several_kinds_and_of_nothing() -> None:
    old = Settings()
    new = _with(old, runtime={"batch_window_ms": 5.0, "context_length": 1024},
                mqtt={"url": "mqtt://127.0.0.1:1"})
    assert changed_settings(old, new) == {"scheduler": ["runtime.batch_window_ms"],
                                          "reload": ["runtime.context_length"],
                                          "restart": ["mqtt.url"]}
    assert changed_settings(old, old.model_copy(deep=True)) == {}
    profiles = {**old.profiles, "terse": old.profiles["math"]}
    assert changed_settings(old, old.model_copy(update={"profiles": profiles})) == {
        "live": ["profiles"]}


def test_reference_shows_each_settings_liveness() -> None:
    rows = {line.split(" | ")[0].strip("| `"): line for line in settings_reference().splitlines()
            if line.startswith("| `")}
    assert "| scheduler |" in rows["runtime.batch_window_ms"]
    assert "| reload |" in rows["runtime.threads"]
    assert "| restart |" in rows["socket.path"]
    assert "| live |" in rows["log.level"]


def test_apply_of_a_restart_setting_says_it_waits_for_a_restart(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from edgeagent.daemon import Daemon

    old = Settings()
    daemon = Daemon(old)
    # apply() configures logging from the new settings: JSON lines on stdout, read back.
    new = _with(old, limits={"max_connections": 7, "default_max_tokens": 99},
                log={"format": "json"})
    try:
        assert asyncio.run(daemon.apply(new)) is None
    finally:
        structlog.reset_defaults()
    logs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert daemon.settings is new and daemon.last_apply == "applied"
    applied = [e for e in logs if e["event"] == "configuration applied"]
    assert applied and applied[0]["after_restart"] == ["limits.max_connections"], logs
    assert not any("reload" in e["event"] for e in logs), logs


@pytest.mark.model
@pytest.mark.broker
def test_pushing_the_batch_window_does_not_reload_the_model(
    start_daemon: Any, broker: Any
) -> None:
    """A scheduler knob pushed by the fleet applies without a model reload; a plan setting
    pushed the same way reloads (the log line the first half looks for does exist)."""
    from tests.broker import Requester

    d = start_daemon(extra_toml=f'[mqtt]\nurl = "{broker.url}"\n')
    d.wait_ready()
    r = Requester(broker)
    r.subscribe(REPORTED)

    def push(version: int, settings: dict[str, Any]) -> dict[str, Any]:
        r.publish(DEVICE, json.dumps({"version": version, "settings": settings}),
                  response=False, retain=True)
        while True:
            topic, report, _ = r.get(120)
            if topic == REPORTED and report.get("version") == version:
                return dict(report)

    def events() -> list[str]:
        return [json.loads(line).get("event", "") for line in d.logs().splitlines()
                if line.startswith("{")]

    try:
        assert push(1, {"runtime": {"batch_window_ms": 5}})["status"] == "applied"
        assert "configuration applied" in events()
        assert "model reloaded" not in events(), d.logs()
        assert push(2, {"runtime": {"context_length": 1024}})["status"] == "applied"
        assert "model reloaded" in events(), d.logs()
    finally:
        r.close()
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(d.socket_path)),
                      base_url="http://localhost", timeout=60) as c:
        assert c.get("/health").json()["plan"]["context_length"] == 1024
