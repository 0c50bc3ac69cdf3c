"""MQTT serving against a real Mosquitto started by the tests on a free port."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.broker import Broker, Requester, password_broker, requester
from tests.conftest import DaemonProc
from tests.pki import make_pki

pytestmark = [pytest.mark.model, pytest.mark.broker]

SHORT = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}


def mqtt_toml(b: Broker, extra: str = "") -> str:
    return f'[mqtt]\nurl = "{b.url}"\nsession_expiry_s = 600\n{extra}\n'


def req_topic(d: DaemonProc) -> str:
    return f"edgeagent/{_device(d)}/request"


def _device(d: DaemonProc) -> str:
    for line in d.config.read_text().splitlines():
        if line.startswith("device_id"):
            return line.split('"')[1]
    raise AssertionError("no device_id")


def _health(d: DaemonProc) -> dict[str, Any]:
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(d.socket_path)),
                      base_url="http://localhost", timeout=30) as c:
        return dict(c.get("/health").json())


def _wait_status(r: Requester, d: DaemonProc, state: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        topic, doc, _ = r.get(max(0.1, deadline - time.monotonic()))
        if topic.endswith("/status") and doc.get("state") == state:
            return doc


def _ready_online(start_daemon: Any, broker: Broker, extra_toml: str = "",
                  name: str = "d") -> DaemonProc:
    """A daemon that is READY and has said online on its status topic."""
    with requester(broker) as watch:
        watch.subscribe(f"edgeagent/test-{name}/status")
        d: DaemonProc = start_daemon(extra_toml=mqtt_toml(broker, extra_toml), name=name)
        d.wait_ready()
        _wait_status(watch, d, "online")
    return d


def test_v5_request_response_with_correlation(start_daemon: Any, broker: Broker) -> None:
    d = _ready_online(start_daemon, broker)
    with requester(broker) as r:
        r.request(req_topic(d), SHORT, correlation=b"corr-42")
        topic, doc, corr = r.get()
        assert topic == r.reply_topic
        assert corr == b"corr-42"
        assert doc["object"] == "chat.completion"
        assert doc["choices"][0]["message"]["content"]
        assert doc["usage"]["completion_tokens"] <= 8
        assert doc["served_by"] == "test-d"


def test_v311_fallback_with_reply_to_and_id(start_daemon: Any, broker: Broker) -> None:
    d = _ready_online(start_daemon, broker, 'protocol = "3.1.1"')
    with requester(broker, v5=False) as r:
        r.publish(req_topic(d), json.dumps({**SHORT, "reply_to": r.reply_topic, "id": "r-1"}))
        _, doc, _ = r.get()
        assert doc["request_id"] == "r-1"
        assert doc["object"] == "chat.completion"


def test_mosquitto_rr(start_daemon: Any, broker: Broker) -> None:
    d = _ready_online(start_daemon, broker)
    res = subprocess.run(
        ["mosquitto_rr", "-h", "127.0.0.1", "-p", str(broker.port), "-V", "mqttv5",
         "-t", req_topic(d), "-e", "replies/rr", "-m", json.dumps(SHORT), "-W", "120"],
        capture_output=True, text=True, timeout=130)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["choices"][0]["message"]["content"]


def test_streaming_in_order_and_cancel(start_daemon: Any, broker: Broker) -> None:
    d = _ready_online(start_daemon, broker)
    with requester(broker) as r:
        r.request(req_topic(d), {**SHORT, "stream": True, "max_tokens": 12})
        chunks = r.until_final()
        assert [c["seq"] for c in chunks] == list(range(len(chunks)))
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        assert chunks[-1]["usage"]["completion_tokens"] >= 1

        body = {**SHORT, "stream": True, "max_tokens": 500, "min_tokens": 500, "id": "long-1"}
        r.request(req_topic(d), body, correlation=b"long-1")
        for _ in range(3):
            r.get()
        r.publish(f"edgeagent/{_device(d)}/cancel", json.dumps({"id": "long-1"}),
                  response=False)
        rest = r.until_final()
        # as on the socket: OpenAI has no "cancelled"; the short stream shows the cancel
        assert rest[-1]["choices"][0]["finish_reason"] == "stop"
        assert len(rest) < 400


def test_duplicate_delivery_is_answered_once(start_daemon: Any, broker: Broker) -> None:
    """The same request (reply topic, id, payload) delivered again is acknowledged, neither
    run nor answered again: the next message on the reply topic answers the next request."""
    d = _ready_online(start_daemon, broker)
    before = _health(d)["serving"]["submitted"]
    with requester(broker, v5=False) as r:
        payload = json.dumps({**SHORT, "reply_to": r.reply_topic, "id": "dup-1"})
        r.publish(req_topic(d), payload)
        assert r.get()[1]["request_id"] == "dup-1"
        r.publish(req_topic(d), payload)
        r.publish(req_topic(d), json.dumps({**SHORT, "reply_to": r.reply_topic, "id": "next"}))
        assert r.get()[1]["request_id"] == "next"
    assert _health(d)["serving"]["submitted"] == before + 2


def test_expired_deadline_is_an_error_and_no_generation(
    start_daemon: Any, broker: Broker
) -> None:
    d = _ready_online(start_daemon, broker)
    before = _health(d)["serving"]["submitted"]
    with requester(broker) as r:
        r.request(req_topic(d), {**SHORT, "deadline": time.time() - 5})
        _, doc, _ = r.get()
    assert doc["error"]["code"] == "expired"
    assert _health(d)["serving"]["submitted"] == before


@pytest.mark.parametrize(("payload", "code"), [
    (b"{not json", "invalid_json"),
    (b"\xff\xfe\x00garbage", "invalid_json"),
    (json.dumps({**SHORT, "colour": "red"}).encode(), "invalid_request"),
    (json.dumps({**SHORT, "max_tokens": "many"}).encode(), "invalid_request"),
    (json.dumps({"messages": []}).encode(), "invalid_request"),
    (b"[1, 2]", "invalid_request"),
    (json.dumps({**SHORT, "messages": [{"role": "user", "content": "x" * 300_000}]}).encode(),
     "payload_too_large"),
])
def test_bad_input_gets_an_error_reply_and_the_loop_lives(
    start_daemon: Any, broker: Broker, payload: bytes, code: str
) -> None:
    d = _ready_online(start_daemon, broker)
    with requester(broker) as r:
        r.publish(req_topic(d), payload, correlation=b"bad")
        _, doc, corr = r.get()
        assert doc["error"]["code"] == code
        assert corr == b"bad"
        r.request(req_topic(d), SHORT, correlation=b"good")
        _, doc, corr = r.get()
        assert corr == b"good" and doc["object"] == "chat.completion"
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(d.socket_path)),
                      base_url="http://localhost") as client:
        metrics = client.get("/metrics").text
    assert f"edgeagent_mqtt_rejected_{code}" in metrics


def test_request_without_route_is_logged_and_counted(start_daemon: Any, broker: Broker) -> None:
    d = _ready_online(start_daemon, broker)
    with requester(broker) as r:
        r.publish(req_topic(d), json.dumps(SHORT), response=False)
        r.request(req_topic(d), SHORT, correlation=b"after")
        assert r.get()[2] == b"after"
    assert "nowhere to answer" in d.logs()


def test_requests_published_while_down_are_answered(start_daemon: Any, broker: Broker) -> None:
    d = _ready_online(start_daemon, broker)
    assert d.stop() == 0
    with requester(broker, persistent=True, client_id="patient") as r:
        r.request(req_topic(d), SHORT, correlation=b"while-down")
        d2: DaemonProc = start_daemon(extra_toml=mqtt_toml(broker), name="d")
        d2.wait_ready()
        _, doc, corr = r.get()
        assert corr == b"while-down"
        assert doc["object"] == "chat.completion"


def test_broker_restart_mid_stream(start_daemon: Any, broker: Broker) -> None:
    d = _ready_online(start_daemon, broker)
    with requester(broker, persistent=True, client_id="steady") as r:
        r.subscribe(f"edgeagent/{_device(d)}/status")
        body = {**SHORT, "stream": True, "max_tokens": 300, "min_tokens": 300}
        r.request(req_topic(d), body, correlation=b"mid")
        while True:  # the first chunk: the stream is running
            topic, doc, _ = r.get()
            if topic == r.reply_topic:
                break
        broker.stop()
        broker.start()
        r.client.reconnect()
        final = None
        online_again = False
        deadline = time.monotonic() + 120
        while final is None or not online_again:
            topic, doc, _ = r.get(max(0.1, deadline - time.monotonic()))
            if topic.endswith("/status") and doc.get("state") == "online":
                online_again = True
            elif topic == r.reply_topic and ("error" in doc or doc["choices"][0].get(
                    "finish_reason")):
                final = doc
        assert "error" in final or final["choices"][0]["finish_reason"] == "length"
    assert _health(d)["transports"]["mqtt"] == "online"


def test_two_daemons_share_the_fleet_topic(start_daemon: Any, broker: Broker) -> None:
    _ready_online(start_daemon, broker, _fleet_toml(), name="a")
    _ready_online(start_daemon, broker, _fleet_toml(), name="b")
    served: set[str] = set()
    with requester(broker) as r:
        for i in range(12):
            r.request("edgeagent/fleet/line-1/request",
                      {**SHORT, "max_tokens": 2}, correlation=f"f{i}".encode())
        for _ in range(12):
            served.add(r.get()[1]["served_by"])
    assert served == {"test-a", "test-b"}


def _fleet_toml() -> str:
    return '[fleet]\ngroup = "line-1"\n'


def test_wrong_password_is_refused_with_a_clear_log_line(
    start_daemon: Any, tmp_path: Path
) -> None:
    b = password_broker(tmp_path / "auth", "gw", "right")
    try:
        secret = tmp_path / "mqtt_password"
        secret.write_text("wrong\n")
        d: DaemonProc = start_daemon(extra_toml=mqtt_toml(
            b, f'username = "gw"\npassword_file = "{secret}"'))
        d.wait_ready()
        deadline = time.monotonic() + 60
        while "refused" not in _health(d)["transports"]["mqtt"]:
            assert time.monotonic() < deadline
        line = next(json.loads(x) for x in d.logs().splitlines()
                    if "refused the connection" in x)
        assert line["level"] == "error"
        assert line["reason"] in ("Not authorized", "Bad user name or password")
    finally:
        b.stop()


def test_mutual_tls_with_a_client_certificate(start_daemon: Any, tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    b = Broker(tmp_path / "tlsbroker", (
        f"allow_anonymous true\ncafile {pki['ca']}\ncertfile {pki['server']}\n"
        f"keyfile {pki['server_key']}\nrequire_certificate true\n"))
    b.start()
    try:
        d: DaemonProc = start_daemon(extra_toml=(
            f'[mqtt]\nurl = "mqtts://127.0.0.1:{b.port}"\nca_file = "{pki["ca"]}"\n'
            f'cert_file = "{pki["client"]}"\nkey_file = "{pki["client_key"]}"\n'))
        d.wait_ready()
        deadline = time.monotonic() + 60
        while _health(d)["transports"]["mqtt"] != "online":
            assert time.monotonic() < deadline, d.logs()
        res = subprocess.run(
            ["mosquitto_rr", "-h", "127.0.0.1", "-p", str(b.port), "-V", "mqttv5",
             "--cafile", str(pki["ca"]), "--cert", str(pki["client"]), "--key",
             str(pki["client_key"]), "-t", "edgeagent/test-d/request", "-e", "replies/tls",
             "-m", json.dumps(SHORT), "-W", "120"],
            capture_output=True, text=True, timeout=130)
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["object"] == "chat.completion"
    finally:
        b.stop()


def test_retained_offline_will_and_stopped(start_daemon: Any, broker: Broker) -> None:
    d = _ready_online(start_daemon, broker)
    with requester(broker) as r:
        r.subscribe("edgeagent/test-d/status")
        assert _wait_status(r, d, "online")["device_id"] == "test-d"  # retained
        d.stop(signal.SIGTERM)
        _wait_status(r, d, "stopped")
    d2: DaemonProc = start_daemon(extra_toml=mqtt_toml(broker), name="d")
    d2.wait_ready()
    with requester(broker) as r:
        r.subscribe("edgeagent/test-d/status")
        _wait_status(r, d2, "online")
        d2.proc.kill()  # no clean shutdown: the broker publishes the will
        d2.proc.wait(30)
        _wait_status(r, d2, "offline", timeout=90)



def test_ask_over_mqtt(start_daemon: Any, broker: Broker) -> None:
    d = _ready_online(start_daemon, broker)
    res = subprocess.run(
        [sys.executable, "-m", "edgeagent", "ask", "--mqtt", broker.url, "--device",
         _device(d), "--max-tokens", "8", "--system", "Be brief.", "Say hi."],
        capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip()


def test_backlogged_stream_tokens_are_coalesced_per_reply() -> None:
    from edgeagent.engine import Delta, Finish
    from edgeagent.transports.mqtt import _coalesce

    a, b = object(), object()
    fin = Finish("stop", 3, 2)
    jobs: list[Any] = [(a, Delta(1, "Hel")), (b, Delta(5, "x")), (a, Delta(2, "lo")),
                       (a, fin), (a, Delta(9, "late")), (b, Delta(6, "y"))]
    out = _coalesce(jobs)
    per = {id(r): [i for rr, i in out if rr is r] for r in (a, b)}
    assert [getattr(i, "text", i) for i in per[id(a)]] == ["Hello", fin, "late"]
    assert [i.text for i in per[id(b)]] == ["xy"]
