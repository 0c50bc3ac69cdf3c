"""Faults: a broker that is not there yet, SIGKILL under load, a full disk, a corrupted model.

Real daemon subprocesses, a real Mosquitto; every wait is on a message, a socket or a
process, with a bound.
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.broker import Broker, Requester, requester
from tests.conftest import REPO, DaemonProc

pytestmark = pytest.mark.model

STARTUP_FAILURE = 3
STATUS = "edgeagent/test-d/status"
REQUEST = "edgeagent/test-d/request"
DESIRED = "edgeagent/test-d/config/desired"
REPORTED = "edgeagent/test-d/config/reported"
HI = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4}


def _socket(d: DaemonProc) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(d.socket_path)),
                        base_url="http://localhost", timeout=120)


def _chat_over_socket(d: DaemonProc) -> None:
    with _socket(d) as c:
        resp = c.post("/v1/chat/completions", json=HI)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"]


def _until(r: Requester, accept: Callable[[str, dict[str, Any], Any], bool],
           timeout: float = 120) -> dict[str, Any]:
    """The next message ``accept`` takes, skipping the others (each wait is bounded)."""
    while True:
        topic, doc, corr = r.get(timeout)
        if accept(topic, doc, corr):
            return doc


def _until_online(r: Requester, timeout: float = 60) -> None:
    """Follow the device's status and config reports; wait for the retained "online"."""
    r.subscribe(STATUS)
    r.subscribe(REPORTED)
    _until(r, lambda t, doc, _c: t == STATUS and doc.get("state") == "online", timeout)


def _chat_over_mqtt(r: Requester, corr: bytes, body: dict[str, Any] = HI) -> dict[str, Any]:
    r.request(REQUEST, body, correlation=corr)
    doc = _until(r, lambda t, _d, c: t == r.reply_topic and c == corr)
    assert doc["object"] == "chat.completion", doc
    return doc


def _push(r: Requester, doc: dict[str, Any]) -> dict[str, Any]:
    """Publish a push to this device, retained, and wait for the report of its version."""
    r.publish(DESIRED, json.dumps(doc), response=False, retain=True)
    return _until(r, lambda t, d, _c: t == REPORTED and d.get("version") == doc["version"])


def _effective(d: DaemonProc) -> dict[str, Any]:
    """What `edgeagent config show` reads from the configuration and the persisted overlay."""
    res = subprocess.run([sys.executable, "-m", "edgeagent", "config", "show", "--config",
                          str(d.config)], capture_output=True, text=True, timeout=60,
                         cwd=REPO, env={k: v for k, v in d.env.items() if k != "NOTIFY_SOCKET"})
    assert res.returncode == 0, res.stderr
    return dict(json.loads(res.stdout))


# ------------------------------------------------------------------ broker unreachable
@pytest.mark.broker
def test_broker_unreachable_at_boot_then_started(start_daemon: Any, tmp_path: Path) -> None:
    """The daemon does not wait for the broker: it serves the socket, keeps trying, and
    once the broker is up says online, answers requests and takes pushes."""
    broker = Broker(tmp_path / "late")  # its port is chosen, nothing listens there yet
    d: DaemonProc = start_daemon(extra_toml=(
        f'[mqtt]\nurl = "{broker.url}"\nsession_expiry_s = 600\n'))
    d.wait_ready()
    with _socket(d) as c:
        assert c.get("/health").json()["transports"]["mqtt"] != "online"
    _chat_over_socket(d)
    broker.start()
    try:
        with requester(broker) as r:
            _until_online(r, 90)  # the reconnect backoff is at most 30 s
            _chat_over_mqtt(r, b"late-1")
            report = _push(r, {"version": 1, "settings": {"limits": {"max_queue": 9}}})
            assert report["status"] == "applied", report
        with _socket(d) as c:
            assert c.get("/health").json()["transports"]["mqtt"] == "online"
        _chat_over_socket(d)
        assert d.proc.poll() is None
    finally:
        broker.stop()


# ------------------------------------------------------------------ SIGKILL under load
@pytest.mark.broker
def test_sigkill_under_load_then_restart(start_daemon: Any, broker: Broker,
                                         tmp_path: Path) -> None:
    """Requests in flight when the daemon is killed are delivered again by the broker (a
    persistent session, acknowledged only once answered) and answered after the restart;
    the fleet overlay persisted before the kill is intact and in force."""
    toml = (f'[mqtt]\nurl = "{broker.url}"\nsession_expiry_s = 600\n'
            "[runtime]\ncontext_length = 1024\n")
    d: DaemonProc = start_daemon(extra_toml=toml)
    d.wait_ready()
    overlay = tmp_path / "d-state" / "fleet-overlay.json"
    ids = [f"load-{i}".encode() for i in range(6)]
    with requester(broker) as r:
        _until_online(r)
        report = _push(r, {"version": 1, "settings": {"limits": {"default_max_tokens": 5}}})
        assert report["status"] == "applied", report
        # Clear the retained push: after the restart only the persisted overlay can say it.
        r.publish(DESIRED, b"", response=False, retain=True)
        persisted = overlay.read_bytes()

        body = {"messages": [{"role": "user", "content": "Tell me a long story."}],
                "max_tokens": 48, "min_tokens": 48, "stream": True}
        for corr in ids:
            r.request(REQUEST, body, correlation=corr)
        _until(r, lambda t, _d, c: t == r.reply_topic and c in ids)  # generating now
        d.proc.kill()
        assert d.proc.wait(30) == -9

        assert overlay.read_bytes() == persisted, "the overlay is whole after SIGKILL"
        d2: DaemonProc = start_daemon(extra_toml=toml)
        d2.wait_ready()
        finals: dict[bytes, dict[str, Any]] = {}
        while len(finals) < len(ids):  # a stream cut by the kill starts again from seq 0
            doc = _until(r, lambda t, doc, c: t == r.reply_topic and c in ids and (
                "error" in doc or doc["choices"][0].get("finish_reason") is not None))
            finals[doc["request_id"].encode()] = doc
        for corr, doc in finals.items():
            if "error" in doc:
                assert doc["error"]["message"], (corr, doc)
            else:
                assert doc["choices"][0]["finish_reason"] == "length", (corr, doc)
                assert doc["usage"]["completion_tokens"] == 48

        # The restarted daemon runs with the persisted overlay: 5 tokens by default.
        after = _chat_over_mqtt(r, b"after", {"messages": HI["messages"]})
        assert after["usage"]["completion_tokens"] <= 5
    with _socket(d2) as c:  # every request was generated again by the restarted daemon
        assert c.get("/health").json()["serving"]["submitted"] == len(ids) + 1
    assert json.loads(persisted)["settings"] == {"limits": {"default_max_tokens": 5}}
    assert _effective(d2)["limits"]["default_max_tokens"] == 5


@pytest.mark.broker
def test_killed_while_a_push_is_applied_boots_the_last_good_overlay(
        start_daemon: Any, broker: Broker, tmp_path: Path) -> None:
    """A push is written aside (``fleet-overlay.pending.json``) and replaces the overlay only
    once applied. Killed in between (here: the file such a kill leaves, naming a model that
    does not load), the daemon boots with the last good overlay instead of exiting 3, and
    the retained push, delivered again, is refused with a report (``rejected``: the push is
    planned before anything is applied, and the broken model has no geometry to plan)."""
    toml = f'[mqtt]\nurl = "{broker.url}"\n[runtime]\ncontext_length = 1024\n'
    state = tmp_path / "d-state"
    bad_model = state / "models" / "broken"
    bad_model.mkdir(parents=True)
    (bad_model / "genai_config.json").write_text("{}")
    good = {"version": 1, "settings": {"limits": {"default_max_tokens": 5}},
            "layers": {"device": {"version": 1, "settings": {"limits": {
                "default_max_tokens": 5}}}}}
    (state / "fleet-overlay.json").write_text(json.dumps(good))
    bad_push = {"version": 2, "settings": {"model": {"path": str(bad_model)}}}
    pending = state / "fleet-overlay.pending.json"
    pending.write_text(json.dumps({**bad_push, "layers": {"device": bad_push}}))
    with requester(broker) as r:
        r.subscribe(REPORTED)
        r.publish(DESIRED, json.dumps(bad_push), response=False, retain=True)
        d: DaemonProc = start_daemon(extra_toml=toml)
        d.wait_ready()
        report = _until(r, lambda t, doc, _c: t == REPORTED and doc.get("version") == 2)
        assert report["status"] == "rejected", report
        assert report["errors"], report
        _chat_over_socket(d)
        assert "interrupted before it was applied" in d.logs()
    assert not pending.exists()
    assert json.loads((state / "fleet-overlay.json").read_text()) == good
    assert _effective(d)["limits"]["default_max_tokens"] == 5


# ------------------------------------------------------------------ disk full
@pytest.mark.broker
def test_disk_full_while_persisting_a_push(start_daemon: Any, broker: Broker,
                                           tmp_path: Path) -> None:
    """The overlay cannot be written (RLIMIT_FSIZE on the daemon: writes past the limit fail
    with EFBIG, as they would with ENOSPC on a full disk): the push is rejected with the
    reason, the previous overlay and configuration stay, the daemon keeps serving."""
    d: DaemonProc = start_daemon(extra_toml=(
        f'[mqtt]\nurl = "{broker.url}"\n[runtime]\ncontext_length = 1024\n'))
    d.wait_ready()
    state = tmp_path / "d-state"
    overlay = state / "fleet-overlay.json"
    with requester(broker) as r:
        _until_online(r)
        good = _push(r, {"version": 1, "settings": {"limits": {"max_queue": 5}}})
        assert good["status"] == "applied", good
        before = overlay.read_bytes()

        # Any file the daemon writes may grow to the limit, and no further: room for its
        # log (stdout, a file here), none for an overlay holding this push.
        limit = d.log_path.stat().st_size + 1024 * 1024
        big = {"limits": {"max_queue": 9},
               "profiles": {"long": {"system_prompt": "x" * (limit + 1)}}}
        soft, hard = resource.prlimit(d.proc.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(d.proc.pid, resource.RLIMIT_FSIZE, (limit, hard))
        try:
            full = _push(r, {"version": 2, "settings": big})
            assert full["status"] == "rejected", full
            pending = overlay.with_name("fleet-overlay.pending.json")
            assert full["errors"] == [f"(persist): cannot write {pending}: File too large; "
                                      "the previous configuration is kept"], full
            assert not pending.exists()
            assert full["hash"] == good["hash"], "the running configuration is unchanged"
            assert overlay.read_bytes() == before
            assert sorted(p.name for p in state.iterdir()
                          if p.name.startswith(".fleet-overlay")) == [], "no temp file left"
            limits = _effective(d)["limits"]
            assert limits["max_queue"] == 5
            _chat_over_socket(d)
            _chat_over_mqtt(r, b"while-full")
        finally:
            resource.prlimit(d.proc.pid, resource.RLIMIT_FSIZE, (soft, hard))
        # Room again: the same push, newer, goes through.
        again = _push(r, {"version": 3, "settings": big})
        assert again["status"] == "applied", again
    assert _effective(d)["limits"]["max_queue"] == 9
    assert d.proc.poll() is None


# ------------------------------------------------------------------ corrupted model
def _model_copy(default_model: Path, dest: Path, manifest: bool = True) -> Path:
    """The model's files linked (never written through), the manifest copied or left out."""
    dest.mkdir()
    for f in default_model.iterdir():
        if f.name == "edgeagent-manifest.json":
            if manifest:
                shutil.copy(f, dest / f.name)
        else:
            (dest / f.name).symlink_to(f)
    return dest


def _replace(path: Path, data: bytes) -> None:
    path.unlink()  # the link, not the default model
    path.write_bytes(data)


def _truncate(path: Path) -> None:
    _replace(path, path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(0, len(data), 997):
        data[i] ^= 0xFF
    _replace(path, bytes(data))


@pytest.mark.parametrize(("manifest", "damage", "file", "expected"), [
    (True, _truncate, "model.onnx.data", "does not match its manifest (size"),
    (True, _truncate, "model.onnx", "does not match its manifest (size"),
    (True, lambda p: _replace(p, b"{not json"), "edgeagent-manifest.json", "is unreadable"),
    (False, _flip, "model.onnx", "failed to load"),
    (False, _truncate, "model.onnx", "failed to load"),
    (False, _truncate, "model.onnx.data", "out of bounds"),
    (False, _truncate, "genai_config.json", "genai_config.json"),
    (False, _truncate, "tokenizer.json", "failed to load"),
], ids=["data-truncated", "onnx-truncated", "manifest-garbled", "onnx-flipped-no-manifest",
        "onnx-truncated-no-manifest", "data-truncated-no-manifest",
        "config-truncated-no-manifest", "tokenizer-truncated-no-manifest"])
def test_corrupted_model_exits_3_with_one_clear_line(
    start_daemon: Any, default_model: Path, tmp_path: Path, manifest: bool,
    damage: Callable[[Path], None], file: str, expected: str,
) -> None:
    """With a manifest the damage is found before loading; without one, onnxruntime finds
    it. Either way: exit 3 (systemd stops restarting), one error line, no traceback."""
    model = _model_copy(default_model, tmp_path / "model", manifest)
    damage(model / file)
    d: DaemonProc = start_daemon(model_path=model)
    assert d.proc.wait(120) == STARTUP_FAILURE, d.logs()
    logs = d.logs()
    assert "Traceback" not in logs, logs
    errors = []
    for line in logs.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue  # onnxruntime's own stderr line, when it writes one
        if event.get("level") == "error":
            errors.append(event)
    assert len(errors) == 1, logs
    error = errors[0]["error"]
    assert expected in error and str(model) in error, error
    assert "\n" not in error and len(error) < 600, error
