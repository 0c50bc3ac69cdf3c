"""The README's MQTT examples, as written there (`mosquitto_rr` with its reply topic, and
`edgeagent ask --mqtt`), work against a daemon with the default ``mqtt.reply_topics``: only
the broker's address and the device id are put in. A real Mosquitto, the daemon as a
subprocess, the commands as subprocesses."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from typing import Any

from tests.broker import Broker
from tests.conftest import REPO, DaemonProc


def _readme_commands() -> dict[str, list[str]]:
    """The README's MQTT example commands, by program, with their continuation lines."""
    text = (REPO / "README.md").read_text().replace("\\\n", " ")
    out = {}
    for line in text.splitlines():
        words = shlex.split(line) if line.startswith(("mosquitto_rr ", ".venv/bin/edgeagent "
                                                      "ask --mqtt")) else []
        if words:
            out[words[0]] = words
    assert set(out) == {"mosquitto_rr", ".venv/bin/edgeagent"}, out
    return out


def _local(words: list[str], broker: Broker, device: str) -> list[str]:
    """The example with this test's broker and device."""
    out = []
    for word in words:
        word = word.replace("gw-01", device)
        if word == "broker":  # mosquitto_rr -h broker
            out += ["127.0.0.1", "-p", str(broker.port)]
        else:
            out.append(word.replace("mqtt://broker:1883", broker.url))
    return out


def test_readme_mqtt_examples_work(start_daemon: Any, broker: Broker) -> None:
    d: DaemonProc = start_daemon(extra_toml=f'[mqtt]\nurl = "{broker.url}"\n')
    d.wait_ready()
    commands = _readme_commands()

    rr = _local(commands["mosquitto_rr"], broker, d.device_id)
    res = subprocess.run([*rr, "-W", "120"], capture_output=True, text=True, timeout=130)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["choices"][0]["message"]["content"]

    ask = _local(commands[".venv/bin/edgeagent"], broker, d.device_id)
    res = subprocess.run([sys.executable, "-m", "edgeagent", *ask[1:], "--max-tokens", "16"],
                         capture_output=True, text=True, timeout=130, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip()
