"""``edgeagent ask``: a client of the daemon (its socket, or MQTT 5 through a broker), or a
local one-shot run. Only ``--local`` loads the model runtime."""

from __future__ import annotations

import argparse
import http.client
import json
import queue
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgeagent.bus import broker_address, client_reply_topic, make_client, topics
from edgeagent.settings import ConfigError, load_settings

EXIT_UNAVAILABLE = 1


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a Unix socket: the stdlib speaks HTTP, we only supply the socket."""

    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(str(self._path))
        self.sock = sock


def _messages(args: argparse.Namespace) -> list[dict[str, str]]:
    messages = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    messages.append({"role": "user", "content": args.prompt})
    return messages


def request_body(args: argparse.Namespace, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": args.model or "edgeagent", "messages": _messages(args),
                            "stream": stream}
    if args.max_tokens is not None:
        body["max_tokens"] = args.max_tokens
    if args.temperature is not None:
        body["temperature"] = args.temperature
    return body


def ask(args: argparse.Namespace) -> int:
    if args.local:
        return ask_local(args)
    if args.mqtt:
        return ask_mqtt(args)
    return ask_socket(args)


def ask_socket(args: argparse.Namespace) -> int:
    path = args.socket
    if path is None:
        try:
            path = load_settings(args.config).socket.path
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    stream = not args.no_stream
    conn = UnixHTTPConnection(path, timeout=args.timeout)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(request_body(args, stream)),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
    except OSError as exc:
        print(f"error: cannot reach the daemon at {path}: {exc} "
              "(is 'edgeagent run' running? --local runs the model in this process)",
              file=sys.stderr)
        return EXIT_UNAVAILABLE
    if resp.status != 200:
        body = resp.read().decode("utf-8", "replace")
        try:
            message = json.loads(body)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = body
        print(f"error ({resp.status}): {message}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    if not stream:
        doc = json.loads(resp.read())
        print(doc["choices"][0]["message"]["content"])
        return 0
    for raw in resp:
        line = raw.decode("utf-8").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            print(f"\nerror: {chunk['error'].get('message')}", file=sys.stderr)
            return EXIT_UNAVAILABLE
        for choice in chunk.get("choices", []):
            sys.stdout.write(choice.get("delta", {}).get("content") or "")
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def ask_local(args: argparse.Namespace) -> int:
    """Load the model in this process, generate once, print as it comes."""
    from edgeagent.daemon import StartupError, load_engine
    from edgeagent.engine import Delta, Finish, Sampling

    try:
        settings = load_settings(args.config)
        engine, plan, _ = load_engine(settings)
    except (ConfigError, StartupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    tokens = engine.encode(engine.chat_prompt(_messages(args)))
    max_tokens = args.max_tokens or settings.limits.default_max_tokens
    max_tokens = min(max_tokens, plan.context_length - len(tokens))
    sampling = Sampling(max_tokens=max_tokens, temperature=args.temperature or 0.0)
    started = time.monotonic()
    for item in engine.generate(tokens, sampling):
        if isinstance(item, Delta):
            sys.stdout.write(item.text)
            sys.stdout.flush()
        elif isinstance(item, Finish):
            sys.stdout.write(item.tail + "\n")
            print(f"[{item.completion_tokens} tokens, {item.reason}, "
                  f"{time.monotonic() - started:.2f}s]", file=sys.stderr)
    return 0


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
