"""``edgeagent ask --mqtt URL --device ID``: an MQTT 5 requester of a gateway daemon."""

from __future__ import annotations

import argparse
import json
import queue
import sys
import uuid
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgeagent.bus import broker_address, client_reply_topic, make_client, topics
from edgeagent.client import request_body
from edgeagent.settings import ConfigError, load_settings


def ask_mqtt(args: argparse.Namespace) -> int:
    try:
        base = load_settings(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    device = args.device or base.device_id
    settings = base.model_copy(update={
        "device_id": device,
        "mqtt": base.mqtt.model_copy(update={"url": args.mqtt, "protocol": "5"})})
    try:
        host, port = broker_address(settings.mqtt)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    request_topic = topics(settings)["request"]
    token = uuid.uuid4().hex
    reply_topic = client_reply_topic(settings.mqtt.topic_prefix, token)
    stream = not args.no_stream
    body = request_body(args, stream)

    inbox: queue.Queue[dict[str, Any] | str] = queue.Queue()
    client = make_client(settings, client_id=f"edgeagent-ask-{token[:12]}")

    def on_connect(c: mqtt.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        if reason.is_failure:
            inbox.put(f"the broker refused the connection: {reason}")
            return
        c.subscribe(reply_topic, qos=1)

    def on_subscribe(c: mqtt.Client, _u: Any, _mid: int, _codes: Any, _p: Any) -> None:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = reply_topic
        props.CorrelationData = token.encode()
        c.publish(request_topic, json.dumps(body), qos=1, properties=props)

    def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            inbox.put(json.loads(msg.payload))
        except ValueError:
            inbox.put(f"unreadable reply: {msg.payload[:200]!r}")

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    try:
        client.connect(host, port, settings.mqtt.keepalive_s)
    except OSError as exc:
        print(f"error: cannot reach the broker at {host}:{port}: {exc}", file=sys.stderr)
        return 1
    client.loop_start()
    try:
        return _print_replies(inbox, args.timeout, stream, reply_topic)
    finally:
        client.disconnect()
        client.loop_stop()


def _print_replies(inbox: queue.Queue[dict[str, Any] | str], timeout: float,
                   stream: bool, reply_topic: str) -> int:
    while True:
        try:
            doc = inbox.get(timeout=timeout)
        except queue.Empty:
            # A daemon refuses (and counts) reply topics outside its mqtt.reply_topics.
            print(f"\nerror: no reply within {timeout}s (is the device online, and does its "
                  f"mqtt.reply_topics allow {reply_topic}?)", file=sys.stderr)
            return 1
        if isinstance(doc, str):
            print(f"error: {doc}", file=sys.stderr)
            return 1
        if "error" in doc:
            print(f"error: {doc['error'].get('message')}", file=sys.stderr)
            return 1
        choice = (doc.get("choices") or [{}])[0]
        if not stream:
            print(choice.get("message", {}).get("content") or "")
            return 0
        sys.stdout.write(choice.get("delta", {}).get("content") or "")
        sys.stdout.flush()
        if choice.get("finish_reason"):
            sys.stdout.write("\n")
            return 0
