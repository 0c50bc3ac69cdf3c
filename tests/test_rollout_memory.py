"""A rollout when memory does not hold both models: the old one is unloaded, the new one
loaded and canaried, and the old one reloaded when it fails. The memory is a fake /proc tree
for the probe (runtime.probe_root), the rest is real: the daemon as a subprocess, a real
Mosquitto, the packed default model served over HTTP."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from edgeagent.artifact import ArtifactInfo
from edgeagent.planner import ModelMeta, Plan, plan
from edgeagent.probe import probe
from edgeagent.settings import LimitsSettings, RuntimeSettings
from edgeagent.testing.artifact_server import ArtifactServer
from edgeagent.testing.fake_proc import fake_machine
from tests.broker import Broker, Requester
from tests.conftest import DaemonProc
from tests.test_rollout import (  # noqa: F401 (fixtures)
    DESIRED,
    NEW_NAME,
    _left_behind,
    _model_path,
    _outcome,
    _push_doc,
    _reports,
    artifact,
    server,
)

pytestmark = [pytest.mark.model, pytest.mark.broker]

STATUS = "edgeagent/test-d/status"
REQUEST = "edgeagent/test-d/request"
RUNTIME = {"context_length": 1024, "max_batch": 1, "memory_headroom_mb": 64}
MARGIN_MB = 16




def _the_plan(root: Path, model: Path) -> Plan:
    """The plan the daemon makes for the default model on the fake machine."""
    return plan(probe(root), ModelMeta.from_folder(model), RuntimeSettings(**RUNTIME),
                LimitsSettings())


@pytest.mark.parametrize("case", ["applied", "canary_fails"])
def test_model_too_big_for_two_loads_after_the_old_one(
        start_daemon: Any, broker: Broker, artifact: ArtifactInfo,  # noqa: F811
        server: ArtifactServer, default_model: Path, tmp_path: Path,  # noqa: F811
        case: str) -> None:
    root = tmp_path / "machine"
    fake_machine(root, 8 * 2**30)
    alone = _the_plan(root, default_model)
    # At start: room for one model (the plan's total) and a little more.
    fake_machine(root, alone.total_bytes + MARGIN_MB * 2**20)
    runtime = "".join(f"{k} = {v}\n" for k, v in RUNTIME.items())
    canary = ('[[fleet.canary.prompts]]\nprompt = "Say hello."\nregex = "^NEVER-[0-9]{40}$"\n'
              if case == "canary_fails" else "")
    d: DaemonProc = start_daemon(extra_toml=(
        f'[mqtt]\nurl = "{broker.url}"\n[runtime]\nprobe_root = "{root}"\n{runtime}'
        f"[fleet.canary]\nmin_relative_speed = 0.0\n{canary}"))
    d.wait_ready()
    old = _model_path(d)
    # Loaded, the model holds what its plan counts (all but the headroom), as the kernel
    # would show: the new model's plan no longer fits beside it, but fits in its place.
    fake_machine(root, alone.headroom_bytes + MARGIN_MB * 2**20)
    stop = threading.Event()
    answers: list[tuple[int, str | None, str]] = []

    def traffic() -> None:  # socket clients all along: served, or told when to come back
        with d.client() as c:
            while not stop.is_set():
                res = c.post("/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
                answers.append((res.status_code, res.headers.get("retry-after"), res.text))

    load = threading.Thread(target=traffic)
    load.start()
    r = _reports(broker)
    asker = Requester(broker)
    asker.subscribe(STATUS)
    try:
        r.publish(DESIRED, json.dumps(_push_doc(artifact, server.url)), response=False,
                  retain=True)
        while True:  # the retained status says when the old model is unloaded
            topic, status, _ = asker.get(240)
            if topic == STATUS and status.get("serving") == "loading":
                break
        assert status["model"] is None, status
        asker.request(REQUEST, {"messages": [{"role": "user", "content": "Hi"}],
                                "max_tokens": 4})
        while True:  # held while no model serves, answered once one does
            topic, answer, _ = asker.get(240)
            if topic == asker.reply_topic:
                break
        report, _ = _outcome(r, 1)
    finally:
        stop.set()
        load.join(120)
        r.close()
        asker.close()
    assert answer["choices"][0]["finish_reason"] in ("stop", "length"), answer
    logs = d.logs()
    assert "unloading the serving model: the new one does not fit beside it" in logs, \
        report | {"log": logs[-3000:]}
    if case == "applied":
        assert report["status"] == "applied", report | {"log": logs[-3000:]}
        assert _model_path(d).endswith(f"/models/{NEW_NAME}")
        assert _left_behind(d) == [NEW_NAME]
    else:
        assert report["status"] == "rolled_back", report
        assert report["errors"][0].startswith("(canary): prompt 0:"), report
        assert "the serving model is loaded again" in logs
        assert _model_path(d) == old
        assert _left_behind(d) == []
    with d.client() as c:
        assert c.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        ).status_code == 200, "served after the swap"
    assert answers, "no request was made during the rollout"
    for status, retry_after, body in answers:
        assert status == 200 or (status == 503 and retry_after is not None
                                 and int(retry_after) >= 1
                                 and "model_loading" in body), (status, retry_after, body)
