"""``edgeagent ask``: a client of the daemon (socket or MQTT), or a local one-shot run."""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

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
        from edgeagent.transports.mqtt_client import ask_mqtt

        return ask_mqtt(args)
    return ask_socket(args)


def ask_socket(args: argparse.Namespace) -> int:
    from edgeagent.settings import ConfigError, load_settings

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
    from edgeagent.settings import ConfigError, load_settings

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
