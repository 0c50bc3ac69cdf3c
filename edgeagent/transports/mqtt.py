"""MQTT transport: request/response, streaming, cancel, fleet work sharing (paho-mqtt 2).

Topics, under ``{prefix}/{device}/``:

- ``status``: retained ``{"state": "online"}`` on every (re)connect, again once the model
  is ready and after every model reload (with the model id, a plan summary and the version:
  a subscriber always finds the current one), ``{"state": "draining"}`` when it stops
  accepting, ``{"state": "stopped"}`` on a clean shutdown; the will is a retained
  ``{"state": "offline"}``.
- ``request``: an OpenAI chat completion request. MQTT 5: the reply goes to the Response
  Topic, with the Correlation Data echoed; otherwise the payload's ``reply_to`` and ``id``.
- ``cancel``: ``{"id": "..."}`` cancels that request.
- ``$share/{group}/{prefix}/fleet/{group}/request`` when ``fleet.group`` is set: gateways
  split one request stream through the broker. It rides on a second connection
  (``<client_id>-share``) whose session ends with it, so a dead gateway collects no share;
  what was in flight to it is lost with it, and requesters re-publish (docs/fleet.md).

Delivery: QoS 1 both ways, a persistent session, and a request is acknowledged only once
its reply is published, so a request in flight when the daemon dies is delivered again.
Replies go only to topics within ``mqtt.reply_topics``, never to wildcards or the daemon's
own topics. Each request is answered once: the same request (reply topic, correlation
data or id, payload) delivered again is only acknowledged; every message on the request
topic gets a reply, an error when it is bad, or is counted when it has no allowed route.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import itertools
import json
import queue
import random
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import Field, ValidationError

from edgeagent import __version__, protocol
from edgeagent.bus import (
    broker_address,
    config_topics,
    make_client,
    reply_filters,
    telemetry_topic,
    topics,
)
from edgeagent.engine import Delta, Finish
from edgeagent.publisher import Handler
from edgeagent.scheduler import AdmissionError, Item, Job, JobError
from edgeagent.serving import ServingClient
from edgeagent.settings import Settings

log = structlog.get_logger(__name__)

RECENT_IDS = 256
# A reply publish paho accepted: sent, or queued for the next connection. paho keeps it until
# the broker acknowledges it and resends it after a reconnect, so it is never published again.
PAHO_HAS_IT = (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN)
MAX_TOPIC_BYTES = 65535  # MQTT's limit on a topic name
BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 30.0
#: The plan figures the status carries (the whole plan is in /health and telemetry).
STATUS_PLAN_KEYS = ("threads", "context_length", "max_batch", "max_prompt_tokens")


class MqttChatRequest(protocol.ChatCompletionRequest):
    """The MQTT request: the chat schema plus routing for MQTT 3.1.1 and a deadline."""

    id: str | None = Field(default=None, max_length=256,
                           description="Request id: echoed, used by cancel and dedup.")
    reply_to: str | None = Field(default=None, max_length=1024,
                                 description="Reply topic when there is no Response Topic.")
    deadline: float | None = Field(default=None,
                                   description="Unix time after which not to answer.")


@dataclass
class Route:
    topic: str
    correlation: bytes | None
    request_id: str | None
    properties: Properties | None = None  # built once, reused for every reply message


@dataclass
class Entry:
    """A request seen recently: running (its job) or done (its replies, as paho took them)."""

    route: Route
    job: Job | None = None
    replies: list[tuple[bytes, mqtt.MQTTMessageInfo]] = field(default_factory=list)
    done: bool = False
    acks: list[tuple[int, int, int]] = field(default_factory=list)  # (mid, qos, generation)


class MqttTransport:
    """Requests over MQTT, and the :class:`~edgeagent.publisher.Publisher` that telemetry
    and fleet configuration use. Its settings are read once, at start."""

    name = "mqtt"

    def __init__(self, settings: Settings, serving: ServingClient) -> None:
        self.settings = settings
        self.serving = serving
        self.client: mqtt.Client | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._accepting = True
        self._state = "off"
        self._lifecycle = "online"  # the status state while connected: online, draining
        self._generation = 0
        self._lock = threading.Lock()
        self._recent: collections.OrderedDict[str, Entry] = collections.OrderedDict()
        self.stats: dict[str, int] = collections.defaultdict(int)
        self.topics: dict[str, str] = {}
        self._attempt = 0  # reconnect backoff exponent
        self._held: list[tuple[mqtt.MQTTMessage, int]] = []  # arrived while loading
        self.replies: queue.SimpleQueue[tuple[_Reply, Item] | None] = queue.SimpleQueue()
        self._reply_thread: threading.Thread | None = None
        self._connected_callbacks: list[Callable[[], None]] = []
        self._handlers: list[tuple[str, Handler]] = []  # (topic filter, handler)
        # The fleet's shared subscription rides on its own clean-session connection: a
        # persistent session would keep collecting this member's share while it is dead.
        self._share: mqtt.Client | None = None
        self._share_generation = 0
        # Generations number the connections of both clients, so one names one connection.
        self._generations = itertools.count(1)

    # ------------------------------------------------------------ lifecycle
    def state(self) -> str:
        return self._state

    def counters(self) -> dict[str, int]:
        out = {f"mqtt_{k}": v for k, v in self.stats.items()}
        if self.client is not None:
            out["mqtt_buffered"] = len(self.client._out_messages)
        return out

    @property
    def enabled(self) -> bool:
        return self.settings.mqtt.url is not None

    # ------------------------------------------------------------ publisher
    @property
    def connected(self) -> bool:
        return self.client is not None and self.client.is_connected()

    def publish(self, topic: str, payload: str | bytes, retain: bool = False) -> bool:
        if self.client is None:
            return False
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        return info.rc == mqtt.MQTT_ERR_SUCCESS

    def subscribe(self, topic_filter: str, handler: Handler) -> None:
        self._handlers.append((topic_filter, handler))
        if self.connected:
            assert self.client is not None
            self.client.subscribe(topic_filter, qos=1)

    def on_connected(self, callback: Callable[[], None]) -> None:
        self._connected_callbacks.append(callback)

    async def start(self) -> None:
        if not self.enabled:
            log.info("mqtt is off (no mqtt.url)")
            return
        self.host, self.port = broker_address(self.settings.mqtt)
        self.topics = topics(self.settings)
        self.client = make_client(self.settings, manual_ack=True)
        self.client.will_set(self.topics["status"], json.dumps({"state": "offline"}), qos=1,
                             retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self._state = "connecting"
        self._thread = threading.Thread(target=self._run, name="mqtt", daemon=True)
        self._thread.start()
        self._reply_thread = threading.Thread(target=self._publish_replies,
                                              name="mqtt-replies", daemon=True)
        self._reply_thread.start()

    def _publish_replies(self) -> None:
        """Replies are rendered and published here, so the engine's loop never waits on
        JSON or on the network. What has queued up meanwhile goes out coalesced: a
        stream's consecutive tokens become one chunk, as on the socket."""
        while True:
            backlog = [self.replies.get()]
            while backlog[-1] is not None:
                try:
                    backlog.append(self.replies.get_nowait())
                except queue.Empty:
                    break
            for reply, item in _coalesce(job for job in backlog if job is not None):
                try:
                    reply.handle(item)
                except Exception:
                    self.stats["internal_errors"] += 1
                    log.exception("mqtt reply failed")
            if backlog[-1] is None:
                return

    async def stop_accepting(self) -> None:
        # Requests that arrive from now on are not acknowledged: the broker keeps them
        # for the next start (persistent session).
        self._accepting = False
        self._lifecycle = "draining"
        self.publish_status()
        if self._share is not None:
            # No more fleet work for this member. What the shared subscription delivered
            # and is not answered goes with its clean session: requesters re-publish it.
            self._share.unsubscribe(self.topics["fleet"])

    async def close(self) -> None:
        if self.client is None:
            return
        client = self.client
        self.replies.put(None)  # after the replies the drain left for it
        if self._reply_thread is not None:
            await asyncio.to_thread(self._reply_thread.join, 10)
        if self._share is not None:
            self._share.disconnect()
            await asyncio.to_thread(self._share.loop_stop)
        if client.is_connected():
            info = client.publish(self.topics["status"], self._status("stopped"), qos=1,
                                  retain=True)
            with contextlib.suppress(RuntimeError, ValueError):
                await asyncio.to_thread(info.wait_for_publish, 5)
        self._stop.set()
        client.disconnect()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _connect_properties(self) -> Properties | None:
        if self.settings.mqtt.protocol != "5":
            return None
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.settings.mqtt.session_expiry_s
        return props

    def _run(self) -> None:
        assert self.client is not None
        client = self.client
        self._attempt = 0
        first = True
        while not self._stop.is_set():
            try:
                if first:
                    client.connect(self.host, self.port, self.settings.mqtt.keepalive_s,
                                   clean_start=False if self.settings.mqtt.protocol == "5"
                                   else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                                   properties=self._connect_properties())
                    first = False
                else:
                    client.reconnect()
            except (OSError, ssl.SSLError) as exc:
                self._state = "unreachable"
                log.warning("mqtt broker unreachable", broker=f"{self.host}:{self.port}",
                            error=str(exc))
            else:
                client.loop_forever()
            if self._stop.is_set():
                break
            delay = (min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** self._attempt)
                     * random.uniform(0.5, 1.0))
            self._attempt = min(self._attempt + 1, 16)
            self._stop.wait(delay)
        self._state = "stopped"

    def publish_status(self) -> None:
        """Publish the current status, retained: the model became ready, was reloaded, or
        the daemon drains. While disconnected paho queues it, and the next connection
        publishes a fresh one anyway."""
        if self.client is not None:
            self.client.publish(self.topics["status"], self._status(self._lifecycle), qos=1,
                                retain=True)

    def _status(self, state: str) -> str:
        status = self.serving.status()
        loaded = status["plan"] is not None  # from ready on, draining included
        plan = {k: status["plan"][k] for k in STATUS_PLAN_KEYS} if loaded else None
        return json.dumps({"state": state, "serving": status["status"],
                           "device_id": self.settings.device_id, "ts": time.time(),
                           "model": self.serving.model_id if loaded else None,
                           "plan": plan, "version": __version__})

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                    properties: Properties | None) -> None:
        if reason.is_failure:
            self._state = f"refused: {reason}"
            self.stats["connect_refused"] += 1
            log.error("mqtt broker refused the connection", reason=str(reason),
                      broker=f"{self.host}:{self.port}")
            return
        self._attempt = 0  # a good connection restarts the backoff
        with self._lock:
            self._generation = next(self._generations)
        if self.stats["connects"]:
            self.stats["reconnects"] += 1
        self.stats["connects"] += 1
        self._state = "online"
        log.info("mqtt connected", broker=f"{self.host}:{self.port}",
                 session_present=bool(getattr(flags, "session_present", False)))
        client.publish(self.topics["status"], self._status(self._lifecycle), qos=1,
                       retain=True)
        client.subscribe([(self.topics["request"], 1), (self.topics["cancel"], 1)])
        if "fleet" in self.topics:
            # A session from an older version may still hold the shared subscription.
            client.unsubscribe(self.topics["fleet"])
        for topic_filter, _ in self._handlers:
            client.subscribe(topic_filter, qos=1)
        for callback in self._connected_callbacks:
            callback()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any,
                       reason: ReasonCode, properties: Properties | None) -> None:
        if not self._stop.is_set() and self._state == "online":
            self._state = "disconnected"
            log.warning("mqtt disconnected", reason=str(reason))

    # ------------------------------------------------------------ messages
    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        gen = self._share_generation if client is self._share else self._generation
        try:
            if msg.topic == self.topics["cancel"]:
                self._ack(msg.mid, msg.qos, gen)
                self._handle_cancel(msg)
            elif msg.topic in (self.topics["request"], self.topics.get("fleet_topic")):
                self._handle_request(msg, gen)
            else:
                self._ack(msg.mid, msg.qos, gen)
                for topic_filter, handler in self._handlers:
                    if mqtt.topic_matches_sub(topic_filter, msg.topic):
                        handler(msg.topic, bytes(msg.payload))
        except Exception:
            # The network loop must never die on a message.
            self.stats["internal_errors"] += 1
            log.exception("mqtt message handling failed", topic=msg.topic)
            self._ack(msg.mid, msg.qos, gen)

    def _ack(self, mid: int, qos: int, generation: int) -> None:
        """Acknowledge a delivery, only on the connection it came on."""
        if qos > 0 and self.client is not None and generation == self._generation:
            self.client.ack(mid, qos)
        elif qos > 0 and self._share is not None and generation == self._share_generation:
            self._share.ack(mid, qos)

    def _route(self, msg: mqtt.MQTTMessage, doc: dict[str, Any] | None) -> Route | None:
        props = msg.properties
        topic = getattr(props, "ResponseTopic", None) if props is not None else None
        corr = getattr(props, "CorrelationData", None) if props is not None else None
        rid = doc.get("id") if isinstance(doc, dict) and isinstance(doc.get("id"), str) else None
        if rid is None and corr:
            try:
                rid = bytes(corr).decode("utf-8")
            except UnicodeDecodeError:
                rid = bytes(corr).hex()
        if not topic and isinstance(doc, dict) and isinstance(doc.get("reply_to"), str):
            topic = doc["reply_to"]
        if not topic:
            return None
        if not self._reply_allowed(topic):
            self.stats["reply_refused"] += 1
            log.warning("mqtt reply topic refused", reply_topic=topic[:200],
                        allowed=reply_filters(self.settings))
            return None
        return Route(topic, bytes(corr) if corr else None, rid)

    def _reply_allowed(self, topic: str) -> bool:
        """A topic name (no wildcards) within ``mqtt.reply_topics``, and none of the daemon's
        own topics: a reply there would come back as a request or a configuration push, or
        overwrite a retained status."""
        if (any(c in topic for c in "+#\0") or not topic.strip()
                or len(topic.encode()) > MAX_TOPIC_BYTES):
            return False
        own = {t for k, t in self.topics.items() if k != "fleet"}  # not the $share filter
        own.update(config_topics(self.settings).values())
        own.add(telemetry_topic(self.settings))
        return topic not in own and any(mqtt.topic_matches_sub(f, topic)
                                        for f in reply_filters(self.settings))

    def _publish(self, route: Route, doc: dict[str, Any]) -> tuple[bytes, mqtt.MQTTMessageInfo]:
        if route.request_id is not None:
            doc["request_id"] = route.request_id
        doc["served_by"] = self.settings.device_id
        payload = json.dumps(doc, separators=(",", ":")).encode()
        return payload, self._send(route, payload)

    def _send(self, route: Route, payload: bytes) -> mqtt.MQTTMessageInfo:
        assert self.client is not None
        if (route.properties is None and self.settings.mqtt.protocol == "5"
                and route.correlation is not None):
            route.properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            route.properties.CorrelationData = route.correlation
        return self.client.publish(route.topic, payload, qos=1, properties=route.properties)

    def _reject(self, msg: mqtt.MQTTMessage, gen: int, route: Route | None, status: int,
                code: str, message: str, retry_after: int | None = None) -> None:
        self.stats[f"rejected_{code}"] += 1
        log.warning("mqtt request rejected", topic=msg.topic, code=code, error=message,
                    route=route.topic if route else None)
        if route is None:
            self.stats["no_route"] += 1
        else:
            self._publish(route, _error_doc(protocol.error_body(
                message, protocol.error_type(status), code), status, retry_after))
        self._ack(msg.mid, msg.qos, gen)

    def on_ready(self) -> None:
        """The model is loaded: say so, and handle the requests that arrived while it was
        loading."""
        self.publish_status()
        with self._lock:
            held, self._held = self._held, []
        for msg, gen in held:
            self._handle_request(msg, gen)
        self._start_share()

    def _start_share(self) -> None:
        """Join the fleet's shared subscription on a connection of its own, with a session
        that ends with it (so a dead member collects no share), once the model is loaded
        (so a loading member holds none back). paho reconnects it on its own."""
        if "fleet" not in self.topics or self.client is None or self._share is not None:
            return  # (on_ready runs again after a model is swapped in after an unload)
        m = self.settings.mqtt
        share = make_client(self.settings, f"{m.client_id or self.settings.device_id}-share",
                            manual_ack=True, persistent=False, reconnect=True)
        share.on_connect = self._on_share_connect
        share.on_message = self._on_message
        share.reconnect_delay_set(1, int(BACKOFF_MAX_S))
        share.connect_async(self.host, self.port, m.keepalive_s,
                            clean_start=True if m.protocol == "5"
                            else mqtt.MQTT_CLEAN_START_FIRST_ONLY)
        self._share = share
        share.loop_start()

    def _on_share_connect(self, client: mqtt.Client, userdata: Any, flags: Any,
                          reason: ReasonCode, properties: Properties | None) -> None:
        if reason.is_failure:
            log.error("mqtt broker refused the fleet connection", reason=str(reason))
            return
        with self._lock:
            self._share_generation = next(self._generations)
        if self._accepting:
            client.subscribe(self.topics["fleet"], qos=1)

    def _stopping(self) -> bool:
        """This transport, or the daemon ahead of it, has stopped accepting: a request is
        left unacknowledged and unanswered, as one that arrives after ``stop_accepting``
        (the broker delivers it again after the restart; a fleet request goes with the
        share's clean session and its requester re-publishes it), never refused with an
        error that would answer it."""
        return not self._accepting or self.serving.stopping

    def _handle_request(self, msg: mqtt.MQTTMessage, gen: int) -> None:
        if self._stopping():
            return  # not acknowledged: the broker delivers it again after the restart
        if not self.serving.ready:
            with self._lock:
                if not self.serving.ready:  # re-checked: on_ready may have just run
                    self._held.append((msg, gen))
                    return
        self.stats["requests"] += 1
        raw = msg.payload
        if len(raw) > self.settings.mqtt.max_payload_bytes:
            self._reject(msg, gen, self._route(msg, None), 413, "payload_too_large",
                         f"payload of {len(raw)} bytes is over the limit of "
                         f"{self.settings.mqtt.max_payload_bytes}")
            return
        try:
            doc = json.loads(raw.decode("utf-8"))
        except RecursionError:
            self._reject(msg, gen, self._route(msg, None), 400, "invalid_json",
                         "the payload is nested too deeply")
            return
        except (UnicodeDecodeError, ValueError) as exc:
            self._reject(msg, gen, self._route(msg, None), 400, "invalid_json",
                         f"the payload is not JSON: {exc}")
            return
        route = self._route(msg, doc if isinstance(doc, dict) else None)
        if not isinstance(doc, dict):
            self._reject(msg, gen, route, 400, "invalid_request",
                         "the payload must be a JSON object")
            return
        if route is None:
            self._reject(msg, gen, None, 400, "no_route",
                         "no allowed Response Topic or reply_to: nowhere to answer")
            return
        key = _dedup_key(route, raw)
        if key is not None and self._replay(key, msg, gen):
            return
        try:
            req = MqttChatRequest.model_validate(doc)
        except ValidationError as exc:
            detail, _ = protocol.validation_message(exc.errors())
            self._reject(msg, gen, route, 400, "invalid_request", detail)
            return
        if req.deadline is not None and req.deadline <= time.time():
            self._reject(msg, gen, route, 408, "expired", "the request's deadline has passed")
            return
        self._submit(msg, gen, route, req)

    def _replay(self, key: str, msg: mqtt.MQTTMessage, gen: int) -> bool:
        """The same request delivered again: never run it twice, never answer it twice.
        Running, it is acknowledged with the first delivery, once answered. Answered, it is
        only acknowledged: paho holds every reply until the broker acknowledges it (and
        resends it after a reconnect); a reply paho did not take has never been sent."""
        with self._lock:
            entry = self._recent.get(key)
            if entry is None:
                return False
            self.stats["duplicates"] += 1
            if not entry.done:
                entry.acks.append((msg.mid, msg.qos, gen))
                return True
        log.info("duplicate mqtt request: acknowledged, its reply already went out",
                 request_id=entry.route.request_id)
        for i, (payload, info) in enumerate(entry.replies):
            if info.rc not in PAHO_HAS_IT:
                entry.replies[i] = (payload, self._send(entry.route, payload))
        self._ack(msg.mid, msg.qos, gen)
        return True

    def _remember(self, key: str, entry: Entry) -> None:
        with self._lock:
            self._recent[key] = entry
            while len(self._recent) > RECENT_IDS:
                old_key, old = next(iter(self._recent.items()))
                if not old.done:
                    break
                del self._recent[old_key]

    def _submit(self, msg: mqtt.MQTTMessage, gen: int, route: Route,
                req: MqttChatRequest) -> None:
        try:
            prepared = self.serving.prepare_chat(req)
        except AdmissionError as exc:
            if self._stopping():  # the daemon began to stop since the check above
                return
            self._reject(msg, gen, route, exc.status, exc.code, exc.message,
                         exc.retry_after)
            return
        if route.request_id is not None:
            prepared.id = route.request_id
        expiry = getattr(msg.properties, "MessageExpiryInterval", None) \
            if msg.properties is not None else None
        entry = Entry(route, acks=[(msg.mid, msg.qos, gen)])
        reply = _Reply(self, entry, prepared, req.stream)
        job = protocol.to_job(prepared, reply.sink, "mqtt",
                              expiry_s=float(expiry) if expiry else None,
                              unix_deadline=req.deadline)
        entry.job = job
        key = _dedup_key(route, msg.payload) or job.id
        self._remember(key, entry)
        try:
            self.serving.submit(job)
        except AdmissionError as exc:
            with self._lock:
                self._recent.pop(key, None)
            if self._stopping():
                return
            self._reject(msg, gen, route, exc.status, exc.code, exc.message,
                         exc.retry_after)

    def _handle_cancel(self, msg: mqtt.MQTTMessage) -> None:
        try:
            doc = json.loads(msg.payload.decode("utf-8"))
            key = doc["id"]
        except (UnicodeDecodeError, ValueError, KeyError, TypeError):
            self.stats["bad_cancels"] += 1
            log.warning("malformed cancel ignored", payload=msg.payload[:200])
            return
        with self._lock:
            entry = next((e for e in reversed(self._recent.values())
                          if e.route.request_id == str(key) and not e.done), None)
        if entry is None or entry.done or entry.job is None:
            log.info("cancel for an unknown or finished request", request_id=key)
            return
        self.serving.cancel(entry.job)
        self.stats["cancels"] += 1

    def finished(self, entry: Entry) -> None:
        """The reply is published: acknowledge every delivery of this request."""
        with self._lock:
            entry.done = True
            entry.job = None
            acks, entry.acks = entry.acks, []
        for mid, qos, gen in acks:
            self._ack(mid, qos, gen)


def _error_doc(body: dict[str, Any], status: int,
               retry_after: int | None = None) -> dict[str, Any]:
    """An error reply: OpenAI's error object with the HTTP status it stands for and, for a
    429 or 503 worth retrying, the seconds to wait (MQTT has no status line, no headers)."""
    body["error"]["status"] = status
    if retry_after:
        body["error"]["retry_after"] = retry_after
    return body


def _dedup_key(route: Route, payload: bytes | bytearray) -> str | None:
    """A duplicate is the same request delivered again: the same reply topic, correlation
    data and id, and the same payload. A reused id or correlation with another payload is a
    new request (else whoever sends a victim's id first chooses the victim's answer)."""
    if route.request_id is None:
        return None
    corr = route.correlation.hex() if route.correlation is not None else ""
    digest = hashlib.sha256(payload).hexdigest()
    return f"{route.topic}\0{corr}\0{route.request_id}\0{digest}"


def _coalesce(jobs: Iterable[tuple[_Reply, Item]]) -> list[tuple[_Reply, Item]]:
    """Merge each reply's consecutive tokens of one choice into one Delta. A reply's items
    keep their order; the order between different replies does not matter."""
    out: list[tuple[_Reply, Item]] = []
    latest: dict[int, int] = {}  # id(reply) -> index in ``out`` of its latest item
    for reply, item in jobs:
        at = latest.get(id(reply))
        if at is not None and isinstance(item, Delta):
            prev = out[at][1]
            if isinstance(prev, Delta) and prev.index == item.index:
                out[at] = (reply, Delta(item.token, prev.text + item.text,
                                        prev.logprobs + item.logprobs, item.index))
                continue
        latest[id(reply)] = len(out)
        out.append((reply, item))
    return out


class _Reply:
    """Turns scheduler items into MQTT replies (called on the scheduler thread)."""

    def __init__(self, transport: MqttTransport, entry: Entry, prepared: protocol.Prepared,
                 stream: bool) -> None:
        self.t = transport
        self.entry = entry
        self.p = prepared
        self.stream = stream and not prepared.tool_mode
        self.choices = protocol.Choices(prepared)
        self.seq = 0

    def _out(self, doc: dict[str, Any]) -> None:
        self.entry.replies.append(self.t._publish(self.entry.route, doc))

    def sink(self, item: Item) -> None:
        """Called on the scheduler's thread: hand over, render and publish elsewhere."""
        self.t.replies.put((self, item))

    def handle(self, item: Item) -> None:
        """Render and publish one item (on the transport's reply thread)."""
        if isinstance(item, Delta):
            if self.stream and (item.text or item.logprobs):
                self._out_chunk(protocol.stream_delta(self.p, self.choices, item, chat=True))
            else:
                self.choices.add(item)
            return
        if isinstance(item, JobError):
            self._out(_error_doc(protocol.job_error_body(item), item.status))
        elif isinstance(item, Finish):
            self._finish(item)
            if not self.choices.done:
                return  # other choices still run
        self.t.finished(self.entry)

    def _chunk(self, delta: dict[str, Any], finish: str | None, index: int = 0,
               usage: dict[str, int] | None = None) -> None:
        self._out_chunk(protocol.chat_chunk(self.p, delta, finish, index), usage)

    def _out_chunk(self, doc: dict[str, Any], usage: dict[str, int] | None = None) -> None:
        doc["seq"] = self.seq
        self.seq += 1
        if usage is not None:
            doc["usage"] = usage
        self._out(doc)

    def _finish(self, fin: Finish) -> None:
        self.choices.add(fin)
        if self.stream:  # a choice's last chunk: its tail, its reason; the usage in the last
            self._chunk({"content": fin.tail} if fin.tail else {},
                        protocol.finish_reason(fin.reason), fin.index,
                        self.choices.usage() if self.choices.done else None)
            return
        if not self.choices.done:
            return
        doc = protocol.answer(self.p, self.choices, chat=True)
        if isinstance(doc, JobError):
            doc = _error_doc(protocol.job_error_body(doc), doc.status)
        self._out(doc)
