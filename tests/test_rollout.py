"""Fleet model rollout end to end: a packed copy of the default model served by a local HTTP
server with Range support, a real Mosquitto, the daemon as a subprocess, config push."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeagent.artifact import ArtifactInfo, pack
from edgeagent.canary import check as check_canary
from edgeagent.engine import Delta, Finish, Sampling
from edgeagent.rollout import collect_garbage
from edgeagent.settings import CanarySettings
from edgeagent.testing.artifact_server import ArtifactServer, serve_artifact
from tests.broker import Broker, Requester
from tests.conftest import REPO, DaemonProc
from tests.test_artifact import evil_archive, make_model, member

pytestmark = [pytest.mark.model, pytest.mark.broker]

DESIRED = "edgeagent/test-d/config/desired"
REPORTED = "edgeagent/test-d/config/reported"
NEW_NAME = "smollm2-v2"
@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory, default_model: Path
             ) -> Iterator[ArtifactInfo]:
    """The default model's weights under another name, packed once for the module."""
    work = tmp_path_factory.mktemp("artifact")
    folder = work / NEW_NAME
    shutil.copytree(default_model, folder, copy_function=os.link)  # same bytes, no copy
    info = pack(folder, work / f"{NEW_NAME}.tar.gz")
    # the links go once packed: onnx refuses a model whose data file has several
    # (tests/test_gguf_weights.py loads the default model with it, in this run or a later)
    shutil.rmtree(folder)
    yield info


@pytest.fixture
def server(artifact: ArtifactInfo) -> Iterator[ArtifactServer]:
    with serve_artifact(artifact.path) as served:
        yield served


def _start(start_daemon: Any, broker: Broker, fleet: str = "", canary: str = "") -> DaemonProc:
    # No speed check: the canary shares two cores with the test's own traffic.
    d: DaemonProc = start_daemon(extra_toml=(
        f'[mqtt]\nurl = "{broker.url}"\n[fleet]\n{fleet}\n[fleet.canary]\n'
        f"min_relative_speed = 0.0\n{canary}"))
    d.wait_ready()
    return d


def _push_doc(artifact: ArtifactInfo, url: str,
              model: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"version": 1, "target": {"device": "test-d"}, "settings": {},
            "model": {"url": url, "sha256": artifact.sha256, "size": artifact.size,
                      "name": NEW_NAME, **(model or {})}}


def _reports(broker: Broker) -> Requester:
    r = Requester(broker)
    r.subscribe(REPORTED)
    return r


def _outcome(r: Requester, version: int, timeout: float = 240) -> tuple[dict[str, Any],
                                                                          list[dict[str, Any]]]:
    """The report ending push ``version``, and the progress reports before it."""
    progress: list[dict[str, Any]] = []
    while True:
        topic, report, _ = r.get(timeout)
        if topic != REPORTED or report.get("version") != version:
            continue
        if report["status"] in ("applied", "rejected", "stale", "rolled_back"):
            return report, progress
        progress.append(report)


def _outcome_or_progress(r: Requester, timeout: float = 120) -> tuple[str, dict[str, Any]]:
    while True:
        topic, report, _ = r.get(timeout)
        if topic == REPORTED:
            return report["status"], report


def _model_path(d: DaemonProc) -> str:
    with d.client() as c:
        return str(c.get("/health").json()["model"]["path"])


def _ask(d: DaemonProc) -> int:
    with d.client() as c:
        return c.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}).status_code


def _left_behind(d: DaemonProc) -> list[str]:
    """What a rollout left in the state directory: model folders, downloads, its record."""
    state = Path(d.config.parent / "d-state")
    models = state / "models"
    out = [p.name for p in models.iterdir()] if models.exists() else []
    out += [f"downloads/{p.name}" for p in (state / "downloads").glob("*")]
    return out + (["rollout.json"] if (state / "rollout.json").exists() else [])


def test_rollout_applies_while_serving_and_watch_shows_it(
        start_daemon: Any, broker: Broker, artifact: ArtifactInfo,
        server: ArtifactServer, tmp_path: Path) -> None:
    # Rate-limited (about 50 MB/s) so that the download reports progress on the way.
    d = _start(start_daemon, broker, "download_rate_kbps = 400000")
    stop = threading.Event()
    statuses: list[int] = []

    def traffic() -> None:  # requests all along: none may fail during the rollout
        while not stop.is_set():
            statuses.append(_ask(d))

    load = threading.Thread(target=traffic)
    load.start()
    push = tmp_path / "push.json"
    doc = _push_doc(artifact, server.url)
    del doc["target"]  # config push fills it in
    push.write_text(json.dumps(doc))
    try:
        res = subprocess.run(
            [sys.executable, "-m", "edgeagent", "config", "push", "--mqtt", broker.url,
             "--device", "test-d", "--watch", "--timeout", "240", str(push)],
            capture_output=True, text=True, timeout=300, cwd=REPO)
    finally:
        stop.set()
        load.join(120)
    assert res.returncode == 0, res.stdout + res.stderr + d.logs()
    final = res.stdout.split("final:")[1].split()
    assert final[:3] == ["test-d", "applied", "100.0"], res.stdout
    assert re.search(r"test-d\s+downloading\s+\d", res.stdout), res.stdout
    assert _model_path(d).endswith(f"/models/{NEW_NAME}")
    assert statuses and set(statuses) == {200}, statuses
    assert _ask(d) == 200
    assert server.sent == artifact.size, "one download, no restart"
    assert _left_behind(d) == [NEW_NAME], "the archive and the record are gone"


@pytest.mark.parametrize("case", ["wrong_sha256", "plan_does_not_fit", "canary_fails"])
def test_bad_rollout_keeps_the_old_model(start_daemon: Any, broker: Broker,
                                         artifact: ArtifactInfo,
                                         server: ArtifactServer, case: str) -> None:
    # A regex no answer of this model matches: the canary must refuse it.
    canary = ('[[fleet.canary.prompts]]\nprompt = "Say hello."\nregex = "^NEVER-[0-9]{40}$"\n'
              if case == "canary_fails" else "")
    d = _start(start_daemon, broker, canary=canary)
    old = _model_path(d)
    r = _reports(broker)
    try:
        doc = _push_doc(artifact, server.url,
                        {"sha256": "0" * 64} if case == "wrong_sha256" else None)
        if case == "plan_does_not_fit":  # more threads than this machine has CPUs
            doc["settings"] = {"runtime": {"threads": (os.cpu_count() or 1) + 64}}
        r.publish(DESIRED, json.dumps(doc), response=False, retain=True)
        report, _ = _outcome(r, 1)
    finally:
        r.close()
    if case == "wrong_sha256":
        assert report["status"] == "rejected", report
        assert report["errors"][0].startswith("(artifact):") and "sha256" in \
            report["errors"][0], report
    elif case == "plan_does_not_fit":
        assert report["status"] == "rejected", report
        assert report["errors"][0].startswith("(plan):"), report
    else:
        assert report["status"] == "rolled_back", report
        assert report["errors"][0].startswith("(canary): prompt 0:"), report
    assert _model_path(d) == old
    assert _ask(d) == 200
    assert _left_behind(d) == [], "no folder, archive or record left behind"


def test_killed_mid_download_boots_with_the_old_model_and_resumes(
        start_daemon: Any, broker: Broker, artifact: ArtifactInfo,
        server: ArtifactServer) -> None:
    server.drop_after = artifact.size * 3 // 4  # after the restart, the link drops too
    # About 7 s for the whole download: time to kill it midway, and to ask the restarted
    # daemon which model serves before the rest is in.
    d = _start(start_daemon, broker, "download_rate_kbps = 100000")
    old = _model_path(d)
    r = _reports(broker)
    try:
        r.publish(DESIRED, json.dumps(_push_doc(artifact, server.url)), response=False,
                  retain=True)
        while True:
            status, report = _outcome_or_progress(r)
            assert status == "downloading", report
            if report["progress"]["percent"] >= 25:
                break
        d.proc.kill()  # a power cut mid-download
        d.proc.wait(30)
        killed_at = server.sent
        again = _start(start_daemon, broker, "download_rate_kbps = 100000")  # same state
        assert _model_path(again) == old, "the last good model serves meanwhile"
        assert _ask(again) == 200
        report, _ = _outcome(r, 1)
    finally:
        r.close()
    assert report["status"] == "applied", report | {"log": again.logs()[-3000:]}
    assert _model_path(again).endswith(f"/models/{NEW_NAME}")
    assert killed_at < artifact.size
    resumed = [int(h.split("=")[1].rstrip("-")) for h in server.ranges if h]
    assert server.ranges[0] is None and len(resumed) == 2 and 0 < resumed[0] < resumed[1], \
        f"each resumption asks for the rest (Range), not from zero: {server.ranges}"
    assert server.sent < artifact.size * 1.5, "resumed, not downloaded again"


def test_collect_garbage_keeps_the_serving_and_the_most_recent(tmp_path: Path) -> None:
    models = tmp_path / "models"
    for age, name in enumerate(["newest", "serving", "older", "oldest"]):
        (models / name).mkdir(parents=True)
        os.utime(models / name, (1e9 - age * 1000, 1e9 - age * 1000))
    (models / ".unpack-leftover").mkdir()
    gone = collect_garbage(models, 2, models / "serving")
    assert sorted(p.name for p in gone) == ["older", "oldest"]
    assert sorted(p.name for p in models.iterdir()) == [".unpack-leftover", "newest", "serving"]
    assert collect_garbage(models, 1, models / "serving") == [models / "newest"]


class _Answers:
    """An engine's text side that answers every prompt with ``text``, token by token."""

    def __init__(self, text: str) -> None:
        self.text = text

    def chat_tokens(self, messages: list[dict[str, Any]]) -> list[int]:
        return [1, 2, 3]

    def generate(self, tokens: Any, sampling: Sampling,
                 guidance: tuple[str, str] | None = None) -> Iterator[Delta | Finish]:
        for i, char in enumerate(self.text):
            yield Delta(i, char)
        yield Finish("stop", len(tokens), len(self.text))


def test_canary_checks_answers_and_speed() -> None:
    prompts = CanarySettings(prompts=[
        {"prompt": "Say hello.", "regex": "hello"},
        {"prompt": "Status?", "json_schema": {"type": "object"}}], min_relative_speed=0.5)
    engine: Any = _Answers('{"hello": 1}')
    assert check_canary(engine, prompts, None) is None
    assert check_canary(engine, prompts, 1.0) is None, "far faster than 1 token/s"
    slow = check_canary(engine, prompts, 1e15)
    assert slow is not None and slow.startswith("decode speed"), slow
    wrong = check_canary(_Answers('{"bye": 1'), prompts, None)  # type: ignore[arg-type]
    assert wrong is not None and wrong.startswith("prompt 0: the answer"), wrong
    cut = check_canary(_Answers('{"hello": 1'), prompts, None)  # type: ignore[arg-type]
    assert cut is not None and cut.startswith("prompt 1:") and "not complete JSON" in cut


def _ignored(d: DaemonProc) -> float:
    """Pushes the daemon handled without a report (the same push delivered again)."""
    with d.client() as c:
        text = c.get("/metrics").text
    found = re.search(r"^edgeagent_fleet_ignored_total (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def _wait_ignored(d: DaemonProc, at_least: float, timeout: float = 60) -> None:
    """Until the daemon counted ``at_least`` pushes it ignored (bounded)."""
    deadline = time.monotonic() + timeout
    while _ignored(d) < at_least:
        assert time.monotonic() < deadline, "the push delivered again was not ignored: " + \
            d.logs()[-3000:]
        d.proc.poll()
        time.sleep(0.2)  # polling a counter the daemon exposes, with a deadline


def test_refused_artifact_is_not_downloaded_again(start_daemon: Any, broker: Broker,
                                                  artifact: ArtifactInfo,
                                                  server: ArtifactServer) -> None:
    """The broker delivers a retained push again on every reconnect and at every start: one
    that was refused (here a wrong sha256) answers as a repeated push, without a download."""
    d = _start(start_daemon, broker)
    r = _reports(broker)
    try:
        r.publish(DESIRED, json.dumps(_push_doc(artifact, server.url, {"sha256": "0" * 64})),
                  response=False, retain=True)
        report, _ = _outcome(r, 1)
        assert report["status"] == "rejected", report
        downloads = len(server.ranges)
        broker.stop()  # the daemon reconnects; the broker delivers the retained push again
        broker.start()
        _wait_ignored(d, 1)
        assert len(server.ranges) == downloads, "downloaded again after a reconnect"
        d.stop()
        again = _start(start_daemon, broker)  # the same state directory
        _wait_ignored(again, 1)
        assert len(server.ranges) == downloads, "downloaded again after a restart"
    finally:
        r.close()
    assert _left_behind(again) == []


def _bad_artifact(case: str, work: Path) -> Path:
    """A small archive of a model folder ``m``, broken as ``case`` says. Its weights are
    random: they compress no more than real INT4 weights (the unpacked-size cap)."""
    model = make_model(work / "src" / "m", weights=os.urandom(4096))
    if case == "truncated":  # the server holds the first half of a good archive
        good = pack(model, work / "good.tar.gz").path
        cut = work / "m.tar.gz"
        cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
        return cut
    if case == "path_traversal":
        return evil_archive(work / "m.tar.gz", member("m/../../edgeagent-evil"), model=model)
    (model / "model.onnx.data").write_bytes(os.urandom(4096))  # same size, other bytes
    return evil_archive(work / "m.tar.gz", model=model)


@pytest.mark.parametrize("case, reason", [
    ("truncated", "the server has"),
    ("path_traversal", "m/../../edgeagent-evil"),
    ("manifest_mismatch", "model.onnx.data does not match its manifest"),
])
def test_broken_artifact_is_rejected_and_leaves_nothing(start_daemon: Any, broker: Broker,
                                                        tmp_path: Path, case: str,
                                                        reason: str) -> None:
    served = _bad_artifact(case, tmp_path / "artifact")
    # The push names the archive as it was made (a truncated copy is only half of it).
    made = tmp_path / "artifact" / ("good.tar.gz" if case == "truncated" else "m.tar.gz")
    d = _start(start_daemon, broker)
    old = _model_path(d)
    r = _reports(broker)
    try:
        with serve_artifact(served) as server:
            r.publish(DESIRED, json.dumps({
                "version": 1, "target": {"device": "test-d"}, "settings": {},
                "model": {"url": server.url, "sha256": _sha256(made),
                          "size": made.stat().st_size, "name": "m"}}),
                response=False, retain=True)
            report, _ = _outcome(r, 1)
    finally:
        r.close()
    assert report["status"] == "rejected", report
    assert report["errors"][0].startswith("(artifact):") and reason in report["errors"][0], \
        report
    assert _model_path(d) == old
    assert _ask(d) == 200
    assert _left_behind(d) == [], "no folder (hidden or not), archive or record left behind"
    state = Path(d.config.parent / "d-state")
    assert not list(state.parent.rglob("edgeagent-evil")), "written outside the models"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_killed_mid_swap_boots_with_the_old_model_and_finishes(
        start_daemon: Any, broker: Broker, artifact: ArtifactInfo,
        server: ArtifactServer) -> None:
    # A canary long enough that the kill lands while the new model is being activated.
    canary = '[[fleet.canary.prompts]]\nprompt = "Count to twenty."\nregex = "\\\\S"\n' \
        "max_tokens = 48\n"
    d = _start(start_daemon, broker, canary=canary)
    old = _model_path(d)
    state = Path(d.config.parent / "d-state")
    r = _reports(broker)
    try:
        r.publish(DESIRED, json.dumps(_push_doc(artifact, server.url)), response=False,
                  retain=True)
        while True:
            status, report = _outcome_or_progress(r)
            assert status in ("downloading", "activating"), report
            if status == "activating":
                break
        d.proc.kill()  # a power cut while the new model loads and answers its canary
        d.proc.wait(30)
        overlay = state / "fleet-overlay.json"
        assert not overlay.exists() or NEW_NAME not in overlay.read_text(), \
            "the push had already applied: no kill mid-swap"
        again = _start(start_daemon, broker, canary=canary)  # the same state directory
        assert _model_path(again) == old, "the last good model serves after the restart"
        assert _ask(again) == 200
        report, _ = _outcome(r, 1)
    finally:
        r.close()
    assert report["status"] == "applied", report | {"log": again.logs()[-3000:]}
    assert _model_path(again).endswith(f"/models/{NEW_NAME}")
    assert server.sent == artifact.size, "the archive was kept: not downloaded again"
    assert _left_behind(again) == [NEW_NAME]
