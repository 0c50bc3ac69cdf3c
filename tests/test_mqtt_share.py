"""Fleet work sharing (`$share`) when a member dies: no request is stranded on it.

Measured with Mosquitto 2.0: a member whose shared subscription lives in a persistent session
keeps receiving its round-robin share while it is dead (the broker queues it for its return);
a member whose session ends with its connection gets no more, but what was already delivered
to it and not acknowledged is dropped, not redistributed. So the daemon holds the shared
subscription on its own clean-session connection, and a requester re-publishes its unanswered
requests (same id, same payload) when a member goes offline (docs/fleet.md).
"""

from __future__ import annotations

import json
import queue
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.broker import Broker, Requester, requester

pytestmark = [pytest.mark.model, pytest.mark.broker]

GROUP = "line-1"
FLEET_TOPIC = f"edgeagent/fleet/{GROUP}/request"
BODY = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4}
DEADLINE_S = 120.0  # generous: two daemons share two busy cores


def member_toml(b: Broker) -> str:
    """A fleet member with a persistent session for its own topics, as deployed."""
    return f'[mqtt]\nurl = "{b.url}"\nsession_expiry_s = 600\n[fleet]\ngroup = "{GROUP}"\n'


class FleetRequester:
    """Sends fleet requests with a deadline; keeps the first reply per id and the members'
    status; re-publishes a request exactly as first sent (the documented retry)."""

    def __init__(self, r: Requester) -> None:
        self.r = r
        self.payloads: dict[str, bytes] = {}
        self.deadlines: dict[str, float] = {}
        self.replies: dict[str, tuple[dict[str, Any], float]] = {}  # id -> (reply, arrived)
        self.status: dict[str, str] = {}

    def send(self, rid: str) -> None:
        if rid not in self.payloads:
            self.deadlines[rid] = time.time() + DEADLINE_S
            self.payloads[rid] = json.dumps(
                {**BODY, "id": rid, "deadline": self.deadlines[rid]}).encode()
        self.r.publish(FLEET_TOPIC, self.payloads[rid], correlation=rid.encode())

    def unanswered(self, ids: list[str]) -> list[str]:
        return [rid for rid in ids if rid not in self.replies]

    def wait_reply(self, rid: str, resend_s: float = 5.0) -> dict[str, Any]:
        """Wait for the reply to ``rid`` (sent), re-publishing it every ``resend_s``: the
        broker drops what arrives before any member holds the shared subscription."""
        until = time.monotonic() + DEADLINE_S
        while not self._pump(lambda: rid in self.replies,
                             min(until, time.monotonic() + resend_s)):
            if time.monotonic() >= until:
                raise AssertionError(f"no reply to {rid} within {DEADLINE_S}s")
            self.send(rid)
        return self.replies[rid][0]

    def wait_until(self, done: Callable[[], bool], what: str) -> None:
        if not self._pump(done, time.monotonic() + DEADLINE_S):
            raise AssertionError(f"not {what} within {DEADLINE_S}s; replies: "
                                 f"{sorted(self.replies)}; status: {self.status}")

    def _pump(self, done: Callable[[], bool], until: float) -> bool:
        """Take messages until ``done()`` (True) or the monotonic time ``until`` (False)."""
        while not done():
            left = until - time.monotonic()
            if left <= 0:
                return False
            try:
                topic, doc, _ = self.r.get(left)
            except queue.Empty:  # checked again at the top
                continue
            self._take(topic, doc)
        return True

    def _take(self, topic: str, doc: dict[str, Any]) -> None:
        if topic.endswith("/status"):
            self.status[topic.split("/")[1]] = doc.get("state", "?")
        elif topic == self.r.reply_topic:
            self.replies.setdefault(doc.get("request_id", "?"), (doc, time.time()))


@pytest.mark.parametrize(("sig", "gone"), [(signal.SIGKILL, "offline"),
                                            (signal.SIGTERM, "stopped")],
                         ids=["killed", "stopped"])
def test_a_member_that_goes_strands_no_fleet_request(start_daemon: Any, broker: Broker,
                                                     sig: int, gone: str) -> None:
    """Two members; 20 requests; stop one (killed, or a clean stop) once it has answered
    some; 20 more. Every request is answered within its deadline, and all of those after
    the stop by the survivor. Before the fix the stopped member's persistent session kept
    its half of them."""
    with requester(broker) as r:
        r.subscribe("edgeagent/+/status")
        fleet = FleetRequester(r)
        a = start_daemon(extra_toml=member_toml(broker), name="a")
        start_daemon(extra_toml=member_toml(broker), name="b").wait_ready()
        a.wait_ready()
        fleet.wait_until(lambda: fleet.status.get("test-a") == fleet.status.get("test-b")
                         == "online", "both online")

        # Both members hold the shared subscription once each has answered one.
        for i in range(20):
            fleet.send(f"warm-{i}")
            fleet.wait_reply(f"warm-{i}")
            if {d["served_by"] for d, _ in fleet.replies.values()} == {"test-a", "test-b"}:
                break
        else:
            pytest.fail(f"one member took every request: {fleet.replies}")

        before = [f"r{i}" for i in range(20)]
        for rid in before:
            fleet.send(rid)
        fleet.wait_until(lambda: any(fleet.replies[rid][0]["served_by"] == "test-a"
                                     for rid in before if rid in fleet.replies),
                         "a reply from test-a")
        a.stop(sig)
        fleet.wait_until(lambda: fleet.status.get("test-a") == gone, f"test-a {gone}")
        for rid in fleet.unanswered(before):  # delivered to test-a and lost with it
            fleet.send(rid)
        after = [f"r{i}" for i in range(20, 40)]
        for rid in after:
            fleet.send(rid)
        fleet.wait_until(lambda: not fleet.unanswered(before + after), "all answered")

    for rid in before + after:
        reply, arrived = fleet.replies[rid]
        assert "error" not in reply, reply
        assert arrived <= fleet.deadlines[rid], rid
    assert {fleet.replies[rid][0]["served_by"] for rid in after} == {"test-b"}


def test_a_session_from_before_gives_up_the_shared_subscription(start_daemon: Any,
                                                               broker: Broker) -> None:
    """A gateway upgraded from a version that held the shared subscription in its
    persistent session drops it there, or that session strands requests once it is dead."""
    old = Requester(broker, client_id="test-a", persistent=True)  # test-a's old session
    old.subscribe(f"$share/{GROUP}/{FLEET_TOPIC}")
    old.close()
    with requester(broker) as r:
        r.subscribe("edgeagent/+/status")
        fleet = FleetRequester(r)
        a = start_daemon(extra_toml=member_toml(broker), name="a")
        a.wait_ready()
        fleet.wait_until(lambda: fleet.status.get("test-a") == "online", "test-a online")
        fleet.send("warm-a")
        assert fleet.wait_reply("warm-a")["served_by"] == "test-a"
        a.stop(signal.SIGKILL)
        fleet.wait_until(lambda: fleet.status.get("test-a") == "offline", "test-a offline")
        start_daemon(extra_toml=member_toml(broker), name="b").wait_ready()
        fleet.send("warm-b")
        assert fleet.wait_reply("warm-b")["served_by"] == "test-b"  # b holds the subscription
        ids = [f"r{i}" for i in range(6)]
        for rid in ids:
            fleet.send(rid)
        fleet.wait_until(lambda: not fleet.unanswered(ids), "all answered")
    assert {fleet.replies[rid][0]["served_by"] for rid in ids} == {"test-b"}
