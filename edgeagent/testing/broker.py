"""A real Mosquitto on a free port, that can be stopped and restarted, and a requester."""

from __future__ import annotations

import getpass
import json
import queue
import shutil
import signal
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Broker:
    def __init__(self, workdir: Path, extra_conf: str = "") -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            f"user {getpass.getuser()}\n"  # as root, mosquitto would drop to 'mosquitto'
            "persistence true\n"
            f"persistence_location {self.dir}/\n"
            f"log_dest file {self.dir}/mosquitto.log\n"
            "log_dest stderr\n"
            "log_type all\n"
            "max_queued_messages 10000\n"
            + (extra_conf or "allow_anonymous true\n")
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        """Start and wait for mosquitto's own word that it listens (its log on stderr)."""
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        listening = threading.Event()

        def drain(stream: IO[bytes]) -> None:
            for line in stream:  # keep reading, or mosquitto blocks on a full pipe
                if line.rstrip().endswith(b" running"):  # after it opened its listeners
                    listening.set()

        assert self.proc.stderr is not None
        self._drain = threading.Thread(target=drain, args=(self.proc.stderr,), daemon=True)
        self._drain.start()
        if not listening.wait(timeout):
            self.stop(signal.SIGKILL)
            raise RuntimeError(f"mosquitto did not start: {self.log()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=10)
        if self.proc is not None and self.proc.stderr is not None:
            self._drain.join(timeout=10)  # EOF once mosquitto has exited
            self.proc.stderr.close()
        self.proc = None

    def log(self) -> str:
        path = self.dir / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""


def password_broker(workdir: Path, user: str, password: str) -> Broker:
    """A started Mosquitto that accepts only ``user`` with ``password``."""
    workdir.mkdir(parents=True, exist_ok=True)
    pw = workdir / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pw), user, password], check=True,
                   capture_output=True)
    broker = Broker(workdir / "broker", f"allow_anonymous false\npassword_file {pw}\n")
    broker.start()
    return broker


class Requester:
    """A test client: MQTT 5 by default, with a private reply topic and an inbox."""

    def __init__(self, broker: Broker, v5: bool = True, client_id: str | None = None,
                 persistent: bool = False) -> None:
        self.v5 = v5
        self.token = uuid.uuid4().hex[:12]
        # Under replies/#, one of the reply topics a daemon allows by default (mqtt.reply_topics).
        self.reply_topic = f"replies/{self.token}/reply"
        self.inbox: queue.Queue[tuple[str, dict[str, Any], Any]] = queue.Queue()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id or f"req-{self.token}",
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else not persistent)
        self.client.on_message = self._on_message
        subscribed = queue.Queue[bool]()
        self.client.on_subscribe = lambda *a: subscribed.put(True)
        props = None
        if v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 600 if persistent else 0
        self.client.connect("127.0.0.1", broker.port,
                            clean_start=not persistent if v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                            properties=props)
        self.client.loop_start()
        self.client.subscribe(self.reply_topic, qos=1)
        subscribed.get(timeout=10)

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            doc = json.loads(msg.payload)
        except ValueError:
            doc = {"unparsable": msg.payload.decode("latin-1")}
        corr = getattr(msg.properties, "CorrelationData", None) if msg.properties else None
        self.inbox.put((msg.topic, doc, corr))

    def subscribe(self, topic: str) -> None:
        done = queue.Queue[bool]()
        self.client.on_subscribe = lambda *a: done.put(True)
        self.client.subscribe(topic, qos=1)
        done.get(timeout=10)

    def publish(self, topic: str, payload: bytes | str, correlation: bytes | None = None,
                response: bool = True, expiry: int | None = None,
                retain: bool = False) -> None:
        props = None
        if self.v5:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if response:
                props.ResponseTopic = self.reply_topic
            if correlation is not None:
                props.CorrelationData = correlation
            if expiry is not None:
                props.MessageExpiryInterval = expiry
        self.client.publish(topic, payload, qos=1, properties=props,
                            retain=retain).wait_for_publish(10)

    def request(self, topic: str, body: dict[str, Any], correlation: bytes = b"c1") -> None:
        if self.v5:
            self.publish(topic, json.dumps(body), correlation)
        else:
            self.publish(topic, json.dumps({**body, "reply_to": self.reply_topic}))

    def get(self, timeout: float = 120.0) -> tuple[str, dict[str, Any], Any]:
        return self.inbox.get(timeout=timeout)

    def until_final(self, timeout: float = 120.0) -> list[dict[str, Any]]:
        """Messages of one reply stream, up to the one with a finish reason or an error."""
        out = []
        while True:
            _, doc, _ = self.get(timeout)
            out.append(doc)
            if "error" in doc:
                return out
            choice = (doc.get("choices") or [{}])[0]
            if choice.get("finish_reason"):
                return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        # Close paho's wake-up socket pair now: left to the garbage collector (the client
        # and this object reference each other) it is a ResourceWarning at exit.
        self.client.on_message = None
        self.client.on_subscribe = None
        self.client._reset_sockets()


@contextmanager
def requester(broker: Broker, **kw: Any) -> Iterator[Requester]:
    r = Requester(broker, **kw)
    try:
        yield r
    finally:
        r.close()
