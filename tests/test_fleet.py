"""Fleet configuration pushes against a real Mosquitto and a real daemon."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgeagent.fleet import PushError, check_push
from tests.broker import Broker, Requester, requester
from tests.conftest import REPO, DaemonProc

pytestmark = [pytest.mark.model, pytest.mark.broker]

DEVICE = "edgeagent/test-d/config/desired"
GROUP = "edgeagent/group/line-1/config/desired"
REPORTED = "edgeagent/test-d/config/reported"


def _daemon(start_daemon: Any, broker: Broker, extra: str = "") -> DaemonProc:
    d: DaemonProc = start_daemon(extra_toml=(
        f'[mqtt]\nurl = "{broker.url}"\n[fleet]\ngroup = "line-1"\n{extra}'))
    d.wait_ready()
    return d


def _push(r: Requester, topic: str, doc: dict[str, Any]) -> dict[str, Any]:
    """Publish a push, retained, and wait for the report of that version."""
    r.publish(topic, json.dumps(doc), response=False, retain=True)
    while True:
        t, report, _ = r.get(120)
        if t == REPORTED and report.get("version") == doc.get("version"):
            return dict(report)


def _effective(d: DaemonProc) -> dict[str, Any]:
    res = subprocess.run([sys.executable, "-m", "edgeagent", "config", "show", "--config",
                          str(d.config)], capture_output=True, text=True, timeout=60,
                         cwd=REPO, env={k: v for k, v in d.env.items() if k != "NOTIFY_SOCKET"})
    return dict(json.loads(res.stdout))


def _reporter(broker: Broker) -> Requester:
    r = Requester(broker)
    r.subscribe(REPORTED)
    r.subscribe("edgeagent/test-d/telemetry")
    return r


def test_interval_change_by_push_takes_effect(start_daemon: Any, broker: Broker) -> None:
    d = _daemon(start_daemon, broker)  # telemetry every 30 s by default
    r = _reporter(broker)
    try:
        report = _push(r, DEVICE, {"version": 1, "settings": {"telemetry": {"interval_s": 0.2}}})
        assert report["status"] == "applied", report
        assert report["hash"]
        seen = []
        while len(seen) < 3:  # at 30 s this would not come
            topic, doc, _ = r.get(30)
            if topic.endswith("/telemetry"):
                seen.append(doc)
        assert seen[-1]["config"]["version"] == 1
        assert _effective(d)["telemetry"]["interval_s"] == 0.2
    finally:
        r.close()


def test_invalid_and_forbidden_pushes_are_rejected(start_daemon: Any, broker: Broker) -> None:
    d = _daemon(start_daemon, broker, "[limits]\nmax_queue = 5\n")
    r = _reporter(broker)
    try:
        report = _push(r, DEVICE, {"version": 1, "settings": {"limits": {"max_queue": "x"}}})
        assert report["status"] == "rejected"
        assert any(e.startswith("settings.limits.max_queue") for e in report["errors"])
        report = _push(r, DEVICE, {"version": 2, "settings": {"socket": {"path": "/tmp/x"}}})
        assert report["status"] == "rejected"
        assert "settings.socket.path: not settable by the fleet" in report["errors"]
        report = _push(r, DEVICE, {"version": 3, "settings": {
            "model": {"path": "/etc"}}})
        assert report["status"] == "rejected"
        assert "must be inside" in report["errors"][0]
        assert _effective(d)["limits"]["max_queue"] == 5, "the old configuration is kept"
    finally:
        r.close()


def test_group_and_device_precedence_and_stale(start_daemon: Any, broker: Broker) -> None:
    d = _daemon(start_daemon, broker)
    r = _reporter(broker)
    try:
        group = _push(r, GROUP, {"version": 5, "settings": {
            "limits": {"max_queue": 7, "default_max_tokens": 100}}})
        assert group["status"] == "applied"
        device = _push(r, DEVICE, {"version": 2, "settings": {"limits": {"max_queue": 9}}})
        assert device["status"] == "applied"
        limits = _effective(d)["limits"]
        assert limits["max_queue"] == 9, "the device layer wins"
        assert limits["default_max_tokens"] == 100, "the group layer still applies"
        stale = _push(r, DEVICE, {"version": 1, "settings": {"limits": {"max_queue": 3}}})
        assert stale["status"] == "stale"
        assert _effective(d)["limits"]["max_queue"] == 9
    finally:
        r.close()


def test_signatures(start_daemon: Any, broker: Broker, tmp_path: Path) -> None:
    keys = tmp_path / "fleet"
    subprocess.run([sys.executable, "-m", "edgeagent", "keygen", str(keys)], check=True,
                   capture_output=True, cwd=REPO)
    other = tmp_path / "other"
    subprocess.run([sys.executable, "-m", "edgeagent", "keygen", str(other)], check=True,
                   capture_output=True, cwd=REPO)
    d = _daemon(start_daemon, broker, f'trusted_keys = ["{keys}.pub"]\n')
    push = tmp_path / "push.json"
    push.write_text(json.dumps({"version": 1, "settings": {"limits": {"max_queue": 11}}}))
    r = _reporter(broker)
    try:
        unsigned = _push(r, DEVICE, json.loads(push.read_text()))
        assert unsigned["status"] == "rejected"
        assert any(e.startswith("signature: required") for e in unsigned["errors"]), unsigned
        forged = subprocess.run(
            [sys.executable, "-m", "edgeagent", "config", "push", "--mqtt", broker.url,
             "--device", "test-d", str(push), "--sign", f"{other}.key", "--timeout", "60"],
            capture_output=True, text=True, cwd=REPO, timeout=90)
        assert forged.returncode == 1
        assert "does not verify" in forged.stdout
        good = subprocess.run(
            [sys.executable, "-m", "edgeagent", "config", "push", "--mqtt", broker.url,
             "--device", "test-d", str(push), "--sign", f"{keys}.key", "--timeout", "60"],
            capture_output=True, text=True, cwd=REPO, timeout=90)
        assert good.returncode == 0, good.stdout + good.stderr
        assert '"status": "applied"' in good.stdout
        assert _effective(d)["limits"]["max_queue"] == 11
    finally:
        r.close()


def _keygen(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "edgeagent", "keygen", str(path)], check=True,
                   capture_output=True, cwd=REPO)
    return path


def _cli_push(broker: Broker, where: list[str], file: Path, key: Path,
              timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``edgeagent config push``, the operator's tool, signing with ``key``."""
    return subprocess.run(
        [sys.executable, "-m", "edgeagent", "config", "push", "--mqtt", broker.url, *where,
         str(file), "--sign", f"{key}.key", "--timeout", str(timeout)],
        capture_output=True, text=True, cwd=REPO, timeout=timeout + 60)


def _next(r: Requester, topic: str) -> dict[str, Any]:
    """The next message on ``topic``."""
    while True:
        t, doc, _ = r.get(120)
        if t == topic:
            return doc


def test_a_signed_push_is_bound_to_its_target(
    start_daemon: Any, broker: Broker, tmp_path: Path
) -> None:
    keys = _keygen(tmp_path / "fleet")
    d = _daemon(start_daemon, broker, f'trusted_keys = ["{keys}.pub"]\n')
    other_device = "edgeagent/gw-b/config/desired"
    r = _reporter(broker)
    r.subscribe(other_device)
    r.subscribe(GROUP)
    try:
        # A push signed for device gw-b, taken off the wire and replayed on test-d's topic.
        push = tmp_path / "push.json"
        push.write_text(json.dumps({"version": 1, "settings": {"limits": {"max_queue": 11}}}))
        assert _cli_push(broker, ["--device", "gw-b"], push, keys, timeout=1).returncode == 1
        for_b = _next(r, other_device)
        assert for_b["target"] == {"device": "gw-b"}
        report = _push(r, DEVICE, for_b)
        assert report["status"] == "rejected", report
        assert any(e.startswith("target: ") and "gw-b" in e for e in report["errors"]), report

        # A group push is applied as the group layer, and refused replayed on the device topic.
        push.write_text(json.dumps({"version": 2, "settings": {"limits": {"max_queue": 12}}}))
        assert _cli_push(broker, ["--group", "line-1"], push, keys).returncode == 0
        group = _next(r, GROUP)
        applied = _next(r, REPORTED)
        assert (applied["layer"], applied["status"], applied["version"]) == (
            "group", "applied", 2), applied
        report = _push(r, DEVICE, group)
        assert report["status"] == "rejected", report
        assert any(e.startswith("target: ") and "group" in e for e in report["errors"]), report

        # The device's own signed push is applied; a signed push without a target is not.
        report = _push(r, DEVICE, {"version": 3, "settings": {}})
        assert report["status"] == "rejected"
        assert any(e.startswith("target: required") for e in report["errors"]), report
        push.write_text(json.dumps({"version": 4, "settings": {"limits": {"max_queue": 13}}}))
        assert _cli_push(broker, ["--device", "test-d"], push, keys).returncode == 0
        assert _effective(d)["limits"]["max_queue"] == 13
    finally:
        r.close()


def test_config_push_refuses_a_file_for_another_target(tmp_path: Path) -> None:
    push = tmp_path / "push.json"
    push.write_text(json.dumps({"version": 1, "target": {"group": "line-1"}, "settings": {}}))
    res = subprocess.run(  # refused before it connects: no broker listens on port 1
        [sys.executable, "-m", "edgeagent", "config", "push", "--mqtt", "mqtt://127.0.0.1:1",
         "--device", "test-d", str(push)], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "line-1" in res.stdout and "test-d" in res.stdout


def test_an_unsigned_push_with_a_target_must_match_it(start_daemon: Any, broker: Broker) -> None:
    d = _daemon(start_daemon, broker)
    r = _reporter(broker)
    try:
        report = _push(r, DEVICE, {"version": 1, "target": {"device": "gw-b"},
                                   "settings": {"limits": {"max_queue": 11}}})
        assert report["status"] == "rejected", report
        report = _push(r, GROUP, {"version": 1, "target": {"group": "line-1"},
                                  "settings": {"limits": {"max_queue": 12}}})
        assert report["status"] == "applied", report
        assert _effective(d)["limits"]["max_queue"] == 12
    finally:
        r.close()


def test_a_push_the_plan_refuses_is_rejected_and_never_kept(
    start_daemon: Any, broker: Broker
) -> None:
    d = _daemon(start_daemon, broker)
    state = Path(_effective(d)["state_dir"])
    r = _reporter(broker)
    try:
        report = _push(r, DEVICE, {"version": 1, "settings": {"runtime": {"threads": 10000}}})
    finally:
        r.close()
    assert report["status"] == "rejected", report
    assert any("runtime.threads=10000 is more than the" in e for e in report["errors"]), report
    assert not (state / "fleet-overlay.json").exists(), "the overlay never kept it"
    assert not (state / "fleet-overlay.pending.json").exists()
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(d.socket_path)),
                      base_url="http://localhost", timeout=60) as c:
        assert c.get("/health").json()["plan"]["threads"] <= len(os.sched_getaffinity(0))
        assert c.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}).status_code == 200


def test_broken_model_rolls_back_while_serving(
    start_daemon: Any, broker: Broker, default_model: Path
) -> None:
    d = _daemon(start_daemon, broker)
    state = Path(_effective(d)["state_dir"])
    broken = state / "models" / "broken"
    broken.mkdir(parents=True)
    shutil.copy(default_model / "genai_config.json", broken)
    (broken / "model.onnx").write_bytes(b"not an onnx model")
    served = threading.Event()
    first = threading.Event()
    results: list[int] = []

    def keep_asking() -> None:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(d.socket_path)),
                          base_url="http://localhost", timeout=60) as c:
            while not served.is_set():
                results.append(c.post("/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
                ).status_code)
                first.set()

    worker = threading.Thread(target=keep_asking)
    worker.start()
    assert first.wait(60)
    r = _reporter(broker)
    try:
        report = _push(r, DEVICE, {"version": 4, "settings": {"model": {"path": str(broken)}}})
    finally:
        served.set()
        worker.join(60)
        r.close()
    assert report["status"] == "rolled_back", report
    assert set(results) == {200}, "requests kept being served"
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(d.socket_path)),
                      base_url="http://localhost", timeout=60) as c:
        after = c.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert after.status_code == 200
    overlay = json.loads((state / "fleet-overlay.json").read_text()) if (
        state / "fleet-overlay.json").exists() else {"settings": {}}
    assert "model" not in overlay["settings"], "the last good overlay is back"
    assert d.proc.poll() is None


def test_kill_9_during_pushes_never_corrupts_the_overlay(
    start_daemon: Any, broker: Broker
) -> None:
    d = _daemon(start_daemon, broker)
    state = Path(_effective(d)["state_dir"])
    with requester(broker) as r:
        for version in range(1, 30):  # a burst; the daemon dies somewhere inside it
            r.publish(DEVICE, json.dumps({"version": version, "settings": {
                "limits": {"max_queue": version + 1}}}), response=False, retain=True)
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(30)
    path = state / "fleet-overlay.json"
    if path.exists():
        doc = json.loads(path.read_text())  # whole, never torn
        assert doc["settings"]["limits"]["max_queue"] == doc["version"] + 1


def test_check_push_unit() -> None:
    here = ("device", "gw")
    with pytest.raises(PushError) as err:
        check_push({"version": -1, "settings": {"state_dir": "/x"}, "colour": 1}, [], here)
    assert err.value.errors == ["colour: unknown field", "version: must be a non-negative "
                                "integer", "settings.state_dir: not settable by the fleet"]
    assert check_push({"version": 3, "settings": {"telemetry": {"interval_s": 5}}}, [],
                      here) == (3, {"telemetry": {"interval_s": 5}})
    with pytest.raises(PushError) as err:
        check_push({"version": 4, "settings": {"log": {"levelx": "debug"},
                                               "telemetry": {"spool_dir": "/etc"}}}, [], here)
    assert err.value.errors == ["settings.log.levelx: not settable by the fleet",
                                "settings.telemetry.spool_dir: not settable by the fleet"]


@pytest.mark.parametrize("target", [None, [], {}, {"device": 1}, {"device": "gw", "group": "g"},
                                    {"fleet": "gw"}, {"device": "gw-b"}, {"group": "gw"}])
def test_check_push_target_unit(target: Any) -> None:
    with pytest.raises(PushError) as err:
        check_push({"version": 1, "target": target, "settings": {}}, [], ("device", "gw"))
    assert len(err.value.errors) == 1 and err.value.errors[0].startswith("target: ")
