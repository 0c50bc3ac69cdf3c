"""The retained ``{prefix}/{device}/status`` follows the daemon: republished when it becomes
ready, after a model reload and when it drains, with the model id, a plan summary and the
version. A real Mosquitto, the daemon as a subprocess, mosquitto_sub for the retained copy."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any

from edgeagent import __version__
from tests.broker import Broker, Requester, requester
from tests.conftest import DaemonProc

STATUS = "edgeagent/test-d/status"


def _until(r: Requester, pred: Callable[[dict[str, Any]], bool],
           timeout: float = 60) -> dict[str, Any]:
    """The first status message that ``pred`` accepts, within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        topic, doc, _ = r.get(max(0.1, deadline - time.monotonic()))
        if topic == STATUS and pred(doc):
            return doc


def _retained(broker: Broker) -> dict[str, Any]:
    """The status a subscriber that arrives now gets: the retained one."""
    res = subprocess.run(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port),
                          "-t", STATUS, "-C", "1", "-W", "10"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


def test_status_is_republished_on_ready_reload_and_drain(start_daemon: Any,
                                                         broker: Broker) -> None:
    extra = (f'[mqtt]\nurl = "{broker.url}"\n'
             "[runtime]\ncontext_length = 512\n")
    with requester(broker) as r:
        r.subscribe(STATUS)
        d: DaemonProc = start_daemon(extra_toml=extra)
        d.wait_ready()
        ready = _until(r, lambda doc: doc.get("model") is not None)
        assert ready["state"] == "online"
        assert ready["version"] == __version__
        assert ready["plan"]["context_length"] == 512
        model = ready["model"]
        assert _retained(broker)["model"] == model

        # A change that needs a model reload: the new plan is announced once it serves.
        d.config.write_text(d.config.read_text().replace("context_length = 512",
                                                         "context_length = 1024"))
        d.proc.send_signal(signal.SIGHUP)
        reloaded = _until(r, lambda doc: (doc.get("plan") or {}).get("context_length")
                          == 1024)
        assert reloaded["model"] == model
        assert _retained(broker)["plan"]["context_length"] == 1024

        d.proc.send_signal(signal.SIGTERM)
        draining = _until(r, lambda doc: doc.get("state") != "online")
        assert draining["state"] == "draining"
        _until(r, lambda doc: doc.get("state") == "stopped")
        assert d.proc.wait(60) == 0
    assert _retained(broker)["state"] == "stopped"
