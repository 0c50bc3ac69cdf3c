"""Telemetry against a real Mosquitto: the schema, ordering, buffering while the broker is away."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from tests.broker import Broker, requester
from tests.conftest import DaemonProc

pytestmark = [pytest.mark.model, pytest.mark.broker]

SCHEMA = json.loads((Path(__file__).parent.parent / "docs" / "telemetry.schema.json")
                    .read_text())


def _metric(d: DaemonProc, name: str) -> float:
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(d.socket_path)),
                      base_url="http://localhost", timeout=30) as c:
        for line in c.get("/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def _telemetry(r: Any, timeout: float = 60) -> dict[str, Any]:
    while True:
        topic, doc, _ = r.get(timeout)
        if topic.endswith("/telemetry"):
            return dict(doc)


def test_documents_follow_the_schema_in_order(start_daemon: Any, tmp_path: Path) -> None:
    broker = Broker(tmp_path / "b")
    broker.start()
    try:
        with requester(broker) as r:
            r.subscribe("edgeagent/test-d/telemetry")
            d: DaemonProc = start_daemon(extra_toml=(
                f'[mqtt]\nurl = "{broker.url}"\n[telemetry]\ninterval_s = 0.2\n'))
            d.wait_ready()
            docs = [_telemetry(r) for _ in range(3)]
        for doc in docs:
            jsonschema.validate(doc, SCHEMA)
        seqs = [doc["seq"] for doc in docs]
        assert seqs == list(range(seqs[0], seqs[0] + 3))
        assert docs[-1]["model"]["loaded"] is True
        assert docs[-1]["model"]["sha256"]
        assert docs[-1]["mqtt"]["state"] == "online"
    finally:
        broker.stop()


def test_buffered_while_the_broker_is_down_then_delivered_in_order(
    start_daemon: Any, tmp_path: Path
) -> None:
    broker = Broker(tmp_path / "b")
    broker.start()
    try:
        d: DaemonProc = start_daemon(extra_toml=(
            f'[mqtt]\nurl = "{broker.url}"\nkeepalive_s = 5\n'
            '[telemetry]\ninterval_s = 0.2\nbuffer_max = 1000\n'))
        d.wait_ready()
        with requester(broker, persistent=True, client_id="ops") as r:
            r.subscribe("edgeagent/test-d/telemetry")
            last = _telemetry(r)["seq"]
        broker.stop()
        deadline = time.monotonic() + 60
        while _metric(d, "edgeagent_telemetry_buffered_total") < 5:  # documents waiting
            assert time.monotonic() < deadline, "nothing was buffered"
        broker.start()
        with requester(broker, persistent=True, client_id="ops") as r:
            seqs = []
            while len(seqs) < 8:
                seqs.append(_telemetry(r)["seq"])
        # nothing lost, nothing reordered: the session queued what was published before,
        # the buffer what was collected while the broker was away
        assert seqs == sorted(seqs)
        assert seqs[0] <= last + 1
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    finally:
        broker.stop()


def test_spool_survives_a_restart(start_daemon: Any, tmp_path: Path) -> None:
    port_holder = Broker(tmp_path / "b")  # never started: the broker stays unreachable
    spool = tmp_path / "spool"
    toml = (f'[mqtt]\nurl = "{port_holder.url}"\n'
            f'[telemetry]\ninterval_s = 0.2\nspool_dir = "{spool}"\n')
    d: DaemonProc = start_daemon(extra_toml=toml)
    d.wait_ready()
    deadline = time.monotonic() + 60
    while not (spool / "telemetry.jsonl").exists() or len(
            (spool / "telemetry.jsonl").read_text().splitlines()) < 3:
        assert time.monotonic() < deadline
    assert d.stop() == 0
    before = [json.loads(x)["seq"] for x in (spool / "telemetry.jsonl").read_text().splitlines()]
    port_holder.start()
    try:
        with requester(port_holder) as r:
            r.subscribe("edgeagent/test-d/telemetry")
            d2: DaemonProc = start_daemon(extra_toml=toml)
            d2.wait_ready()
            got = [_telemetry(r)["seq"] for _ in range(len(before) + 1)]
        assert got[: len(before)] == before, "the spooled documents go first, in order"
        assert got[len(before)] == before[-1] + 1, "the sequence continues after a restart"
    finally:
        port_holder.stop()
