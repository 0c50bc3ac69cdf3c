"""MQTT requests from clients that cannot be trusted: where replies may go, what counts as a
duplicate, answered once across a broker restart, and a reply (or a count) for every message.
A real daemon, a real Mosquitto, paho and the Mosquitto command-line clients."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from edgeagent.settings import MqttSettings, Settings
from tests.broker import Broker, requester
from tests.conftest import DaemonProc
from tests.test_mqtt import SHORT, _health, _ready_online, req_topic

BAD = {"messages": []}  # refused at once with an error reply: nothing to generate


def _metrics(d: DaemonProc) -> str:
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(d.socket_path)),
                      base_url="http://localhost", timeout=30) as c:
        return c.get("/metrics").text


def _counter(d: DaemonProc, name: str) -> float:
    match = re.search(rf"^edgeagent_{name}(?:_total)? (\S+)$", _metrics(d), re.M)
    return float(match.group(1)) if match else 0.0


# ------------------------------------------------------------------ mqtt.reply_topics
def test_reply_topics_default_and_placeholders() -> None:
    from edgeagent.bus import reply_filters

    s = Settings(device_id="gw-7", mqtt={"topic_prefix": "plant"})
    assert reply_filters(s) == ["plant/clients/#", "replies/#"]
    s = Settings(device_id="gw-7", mqtt={"reply_topics": ["{prefix}/{device}/answers/+"]})
    assert reply_filters(s) == ["edgeagent/gw-7/answers/+"]


@pytest.mark.parametrize(("filter_", "problem"), [
    ("replies/#/more", "'#'"),
    ("replies/a#", "'#'"),
    ("replies/a+/x", "'+'"),
    ("", "empty"),
    ("{prefx}/clients/#", "placeholder"),
])
def test_reply_topics_must_be_valid_filters(filter_: str, problem: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(problem)) as err:
        MqttSettings(reply_topics=[filter_])
    assert "reply_topics" in str(err.value)


def test_reply_topics_cannot_be_empty() -> None:
    with pytest.raises(ValidationError, match="reply_topics"):
        MqttSettings(reply_topics=[])


# ------------------------------------------------------------------ item 3: where replies go
@pytest.mark.model
@pytest.mark.broker
def test_reply_topic_outside_the_allowed_filters_is_never_published_to(
    start_daemon: Any, broker: Broker
) -> None:
    """Replies aimed at another device's request topic, an unrelated PLC topic, the daemon's
    own configuration topic, or a wildcard are refused and counted. A watcher subscribed to
    everything sees the marker's reply after anything the daemon published before it (one
    connection, one topic order through the broker), so seeing the marker proves absence."""
    d = _ready_online(start_daemon, broker)
    bogus = ["edgeagent/test-other/request", "factory/plc/line3/cmd",
             "edgeagent/test-d/config/desired", "edgeagent/test-d/request"]
    with requester(broker) as watch, requester(broker) as r:
        watch.subscribe("#")
        for topic in bogus:  # MQTT 5 Response Topic
            r.client.publish(req_topic(d), json.dumps(BAD), qos=1,
                             properties=_response_props(topic, b"x")).wait_for_publish(10)
        for topic in [*bogus, "replies/+/x"]:  # reply_to in the payload
            r.publish(req_topic(d), json.dumps({**BAD, "reply_to": topic, "id": "x"}),
                      response=False)
        r.publish(req_topic(d), json.dumps(BAD), correlation=b"marker")
        seen = []
        while True:
            topic, doc, corr = watch.get(60)
            if topic == r.reply_topic and corr == b"marker":
                break
            if topic in bogus and "served_by" in doc:
                seen.append(topic)
        assert seen == []
    assert _counter(d, "mqtt_reply_refused") == 9
    assert _counter(d, "mqtt_no_route") == 9
    assert "reply topic refused" in d.logs()
    assert _health(d)["transports"]["mqtt"] == "online"


def _response_props(topic: str, corr: bytes) -> Any:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ResponseTopic = topic
    props.CorrelationData = corr
    return props


@pytest.mark.model
@pytest.mark.broker
def test_the_documented_reply_shapes_work(start_daemon: Any, broker: Broker) -> None:
    """README's mosquitto_rr example (``-e replies/me``); `edgeagent ask --mqtt` uses
    ``{prefix}/clients/<token>/reply`` (tests/test_mqtt.py::test_ask_over_mqtt)."""
    d = _ready_online(start_daemon, broker)
    res = subprocess.run(
        ["mosquitto_rr", "-h", "127.0.0.1", "-p", str(broker.port), "-V", "mqttv5",
         "-t", req_topic(d), "-e", "replies/me", "-m", json.dumps(SHORT), "-W", "120"],
        capture_output=True, text=True, timeout=130)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["object"] == "chat.completion"
    assert _counter(d, "mqtt_reply_refused") == 0


@pytest.mark.model
@pytest.mark.broker
def test_ask_names_the_reply_topic_a_daemon_refused(start_daemon: Any, broker: Broker) -> None:
    """A daemon that allows only replies/#: `edgeagent ask --mqtt` gets no reply, and says
    which reply topic the daemon must allow."""
    d = _ready_online(start_daemon, broker, 'reply_topics = ["replies/#"]')
    res = subprocess.run(
        [sys.executable, "-m", "edgeagent", "ask", "--mqtt", broker.url, "--device", "test-d",
         "--timeout", "5", "Say hi."], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert "mqtt.reply_topics allow edgeagent/clients/" in res.stderr
    assert _counter(d, "mqtt_reply_refused") == 1


# ------------------------------------------------------------------ item 4: reply poisoning
@pytest.mark.model
@pytest.mark.broker
def test_a_request_with_a_stolen_id_does_not_answer_the_victim(
    start_daemon: Any, broker: Broker
) -> None:
    """The attacker sends the victim's id and reply topic first, with its own question: the
    victim's own question, arriving after, is still generated and answered."""
    d = _ready_online(start_daemon, broker, 'protocol = "3.1.1"')
    before = _health(d)["serving"]["submitted"]
    with requester(broker, v5=False) as victim, requester(broker, v5=False) as attacker:
        stolen = {"reply_to": victim.reply_topic, "id": "victim-1"}
        attacker.publish(req_topic(d), json.dumps({**SHORT, "max_tokens": 1, **stolen}))
        victim.publish(req_topic(d), json.dumps(
            {**SHORT, "max_tokens": 6, "min_tokens": 6, **stolen}))
        answers = [victim.get(60)[1], victim.get(60)[1]]
    tokens = sorted(a["usage"]["completion_tokens"] for a in answers)
    assert tokens == [1, 6], "the victim's own question was answered"
    assert _health(d)["serving"]["submitted"] == before + 2


@pytest.mark.model
@pytest.mark.broker
def test_reused_correlation_data_with_a_new_question_gets_a_new_answer(
    start_daemon: Any, broker: Broker
) -> None:
    d = _ready_online(start_daemon, broker)
    with requester(broker) as r:
        r.request(req_topic(d), {**SHORT, "max_tokens": 1}, correlation=b"same")
        first = r.get(60)[1]
        r.request(req_topic(d), {**SHORT, "max_tokens": 5, "min_tokens": 5},
                  correlation=b"same")
        second = r.get(60)[1]
    assert first["usage"]["completion_tokens"] == 1
    assert second["usage"]["completion_tokens"] == 5


# ------------------------------------------------------------------ item 5: answered once
@pytest.mark.model
@pytest.mark.broker
def test_broker_restart_with_30_requests_in_flight_answers_each_once(
    start_daemon: Any, broker: Broker
) -> None:
    """30 requests from a requester with a persistent session; the broker restarts (with
    persistence) while they are generated, and some finish while it is away.

    What is counted, and why: every request must get its answer (at least one reply on its
    own reply topic at the requester). The requester may legitimately see a reply twice:
    QoS 1 is at-least-once, and a reply the broker took just before it stopped, whose PUBACK
    the daemon never saw, is resent by paho with the DUP flag and forwarded again. So
    "answered once" is counted where the daemon decides to answer: Mosquitto's log lists
    every PUBLISH it receives from the daemon with its DUP flag, and each reply topic must
    have exactly one fresh (``d0``) publish, or none when the reply was first sent while the
    broker was away (then only paho's resends, ``d1``, reach it). A replayed reply is a
    fresh publish."""
    n = 30
    # One sequence at a time, 32 tokens each: the 30 take seconds, so most are still queued
    # or running when the broker stops after the first answer.
    d = _ready_online(start_daemon, broker, "[runtime]\nmax_batch = 1")
    body = {**SHORT, "max_tokens": 32, "min_tokens": 32}
    with requester(broker, persistent=True, client_id="steady-30") as r:
        base = r.reply_topic.rsplit("/", 1)[0]
        r.subscribe(f"{base}/+")
        for i in range(n):
            r.client.publish(req_topic(d), json.dumps(body), qos=1, properties=_response_props(
                f"{base}/{i}", f"q{i}".encode())).wait_for_publish(10)
        answered = {r.get()[0]}  # the first answer: generation is under way
        broker.stop()
        # Some requests finish while the broker is away: their acks cannot reach it, so it
        # delivers them again; others are still being generated when it is back.
        completed = _health(d)["serving"]["completed"]
        assert completed <= n - 2, "every request finished before the broker stopped"
        deadline = time.monotonic() + 120
        while _health(d)["serving"]["completed"] < completed + 2:
            assert time.monotonic() < deadline
        broker.start()
        r.client.reconnect()
        deadline = time.monotonic() + 300
        while len(answered) < n:
            answered.add(r.get(max(0.1, deadline - time.monotonic()))[0])
        # A last request, handled after every redelivery the daemon got on reconnecting.
        r.request(req_topic(d), SHORT, correlation=b"last")
        while r.get()[2] != b"last":
            pass
    assert answered == {f"{base}/{i}" for i in range(n)}
    broker.stop()  # its log is complete
    sent = re.findall(rf"Received PUBLISH from test-d \((d[01]), q1, r0, m\d+, '({base}/\d+)'",
                      broker.log())
    fresh = {t: sum(1 for dup, topic in sent if topic == t and dup == "d0") for t in answered}
    # A reply first sent while the broker was away reaches it only as paho's resend (d1).
    assert all(n == 1 or (n == 0 and ("d1", t) in sent) for t, n in fresh.items()), (
        f"a reply was published more than once, or never: {fresh}")


# ------------------------------------------------------------------ item 6: every message
@pytest.mark.model
@pytest.mark.broker
def test_a_request_nested_100000_deep_gets_an_error_reply(
    start_daemon: Any, broker: Broker
) -> None:
    d = _ready_online(start_daemon, broker)
    deep = "[" * 100_000 + "]" * 100_000
    with requester(broker) as r:
        r.publish(req_topic(d), deep, correlation=b"deep")
        _, doc, corr = r.get(60)
        assert corr == b"deep"
        assert doc["error"]["code"] == "invalid_json"
        assert "deep" in doc["error"]["message"]
    # No route (MQTT 3.1.1, nothing parseable): counted and logged, with mosquitto_pub.
    res = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port),
                          "-q", "1", "-t", req_topic(d), "-s"], input=deep, text=True,
                         capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr
    with requester(broker) as r:  # after the deep one: it has been handled
        r.request(req_topic(d), SHORT, correlation=b"after")
        assert r.get(60)[2] == b"after"
    assert _counter(d, "mqtt_rejected_invalid_json") == 2
    assert _counter(d, "mqtt_no_route") == 1
    assert _counter(d, "mqtt_internal_errors") == 0
