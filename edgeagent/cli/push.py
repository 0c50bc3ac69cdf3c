"""``edgeagent config push`` and ``edgeagent keygen``: the operator's side of fleet pushes.

A push reaches the broker like the daemon does (bus.make_client: the same ``mqtt.*``
settings, TLS and credentials), and is reported "pushed" only once the broker accepted the
connection and acknowledged the retained publish; for one device, it then waits for that
device's report of this version. ``--watch`` shows the rollout across the fleet: a table of
devices, status and download percent from their reports of this push.
"""

from __future__ import annotations

import contextlib
import json
import queue
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.reasoncodes import ReasonCode

from edgeagent import bus
from edgeagent.fleet import sign
from edgeagent.settings import Settings

EXIT_FAILED = 1
EXIT_USAGE = 2
#: Reports that end a push (the others, downloading and activating, say how it goes).
OUTCOMES = ("applied", "rejected", "stale", "rolled_back")


class BrokerError(Exception):
    """The broker could not be reached, refused us, or did not acknowledge in time."""


def keygen_main(prefix: Path) -> int:
    """Write ``PREFIX.key`` (private, 0600) and ``PREFIX.pub`` (for fleet.trusted_keys)."""
    key = Ed25519PrivateKey.generate()
    private = prefix.with_suffix(".key")
    public = prefix.with_suffix(".pub")
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    print(f"private key: {private}\npublic key:  {public} (list it in fleet.trusted_keys)")
    return 0


def push_main(settings: Settings, layer: str, target: str, file: Path,
              sign_key: Path | None, timeout: float, watch: bool = False) -> int:
    """Publish a push for ``layer`` ("device" or "group") ``target``, retained; for one
    device, wait for its report and print it; with ``watch``, print the table of every
    device's progress on it."""
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        print(f"error: cannot read {file}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    wanted = {layer: target}
    if not isinstance(doc, dict):
        print(f"error: {file} must hold a JSON object", file=sys.stderr)
        return EXIT_USAGE
    if doc.setdefault("target", wanted) != wanted:
        print(f"error: {file} is for {doc['target']}, not {wanted}", flush=True)
        return EXIT_USAGE
    if sign_key is not None:
        key = serialization.load_pem_private_key(sign_key.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            print("error: --sign needs an Ed25519 private key", flush=True)
            return EXIT_USAGE
        doc["signature"] = sign(doc, key)
    prefix = settings.mqtt.topic_prefix
    desired = bus.desired_topic(prefix, layer, target)
    reported = bus.reported_topic(prefix, target) if layer == "device" else None
    try:
        with _Session(settings, timeout, retained=watch) as session:
            if watch:  # every device's report: which ones take this push is theirs to say
                session.subscribe(bus.reported_topic(prefix, "+"))
            elif reported is not None:
                session.subscribe(reported)
            session.publish_retained(desired, json.dumps(doc))
            print(f"pushed version {doc.get('version')} to {desired}", flush=True)
            if watch:
                return _watch(session, layer, target, doc.get("version"), timeout)
            if reported is None:
                return 0
            return _print_report(session, doc.get("version"), timeout)
    except (BrokerError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _print_report(session: _Session, version: Any, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            _, report = session.reports.get(timeout=left)
        except queue.Empty:
            break
        if report.get("version") != version:
            continue
        if report.get("status") not in OUTCOMES:  # a model rollout under way: still alive
            deadline = time.monotonic() + timeout
            continue
        print(json.dumps(report, indent=2))
        return 0 if report.get("status") == "applied" else EXIT_FAILED
    print(f"no report for version {version} within {timeout}s")
    return EXIT_FAILED


def _watch(session: _Session, layer: str, target: str, version: Any, timeout: float) -> int:
    """Print a row (device, status, percent) whenever a device's report of this push
    changes, then the whole table: for a device once it reports an outcome, for a group
    once no report came for ``timeout`` seconds (or on Ctrl-C). Exit 0 when every device
    applied it."""
    rows: dict[str, tuple[str, str]] = {}
    print(f"{'DEVICE':<24} {'STATUS':<12} PERCENT", flush=True)
    try:
        while True:
            try:
                device, report = session.reports.get(timeout=timeout)
            except queue.Empty:
                break
            if report.get("version") != version or report.get("layer") != layer:
                continue
            progress = report.get("progress") or {}
            percent = progress.get("percent", 100.0 if report.get("status") == "applied"
                                   else "")
            row = (str(report.get("status")), f"{percent}")
            if rows.get(device) != row:
                rows[device] = row
                print(f"{device:<24} {row[0]:<12} {row[1]}", flush=True)
            if layer == "device" and device == target and row[0] in OUTCOMES:
                break
    except KeyboardInterrupt:
        pass
    print("\nfinal:")
    for device, (status, percent) in sorted(rows.items()):
        print(f"{device:<24} {status:<12} {percent}")
    if not rows:
        print(f"no device reported version {version}")
    return 0 if rows and all(s == "applied" for s, _ in rows.values()) else EXIT_FAILED


class _Session:
    """One connection to the broker, each step waited for and its reason code checked:
    paho's calls only queue packets, and a refusing broker answers with a code."""

    def __init__(self, settings: Settings, timeout: float, retained: bool = False) -> None:
        self.settings = settings
        self.timeout = timeout
        self.retained = retained
        # Its own client id: the daemon's would take over the daemon's connection.
        client_id = f"edgeagent-push-{uuid.uuid4().hex[:12]}"
        try:
            self.client = bus.make_client(settings, client_id, persistent=False)
        except OSError as exc:  # a password, CA or certificate file that cannot be read
            raise BrokerError(f"cannot set up the MQTT client: {exc}") from exc
        #: (device, report), the device from the topic {prefix}/{device}/config/reported
        self.reports: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self._acks: dict[int, ReasonCode] = {}  # by message id: CONNACK is 0
        self._acked = threading.Condition()
        self.client.on_connect = lambda _c, _u, _f, reason, _p: self._ack(0, reason)
        self.client.on_subscribe = lambda _c, _u, mid, reasons, _p: self._ack(mid, reasons[0])
        self.client.on_publish = lambda _c, _u, mid, reason, _p: self._ack(mid, reason)
        self.client.on_message = self._on_message

    def __enter__(self) -> _Session:
        host, port = bus.broker_address(self.settings.mqtt)
        try:
            self.client.connect(host, port, self.settings.mqtt.keepalive_s)
        except OSError as exc:  # ssl.SSLError included: a certificate that does not verify
            raise BrokerError(f"cannot reach the broker at {host}:{port}: {exc}") from exc
        self.client.loop_start()
        try:
            self._wait(0, f"the broker at {host}:{port} refused the connection")
        except BrokerError:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def subscribe(self, topic: str) -> None:
        rc, mid = self.client.subscribe(topic, qos=1)
        if mid is None:
            raise BrokerError(f"cannot subscribe to {topic}: {mqtt.error_string(rc)}")
        self._wait(mid, f"the broker refused the subscription to {topic}")

    def publish_retained(self, topic: str, payload: str) -> None:
        mid = self.client.publish(topic, payload, qos=1, retain=True).mid
        self._wait(mid, f"the broker refused the push on {topic}")

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        # A retained report predates this push: only a watch shows it (a device that
        # reported this version already is part of the table).
        if msg.retain and not self.retained:
            return
        with contextlib.suppress(ValueError):  # not JSON: not a report of ours
            report = json.loads(msg.payload)
            if isinstance(report, dict):
                self.reports.put((msg.topic.split("/")[-3], report))

    def _ack(self, mid: int, reason: ReasonCode) -> None:
        with self._acked:
            self._acks[mid] = reason
            self._acked.notify_all()

    def _wait(self, mid: int, refused: str) -> None:
        with self._acked:
            if not self._acked.wait_for(lambda: mid in self._acks, self.timeout):
                raise BrokerError(f"{refused}: no answer within {self.timeout}s")
            reason = self._acks.pop(mid)
        if reason.is_failure:
            raise BrokerError(f"{refused}: {reason}")
