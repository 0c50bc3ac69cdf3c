"""The command-line clients against a real Mosquitto: ``config push`` reaches the broker as
the daemon does (credentials, TLS) and says "pushed" only once the broker acknowledged it;
``ask``, ``config push`` and ``doctor`` never load the model runtime."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.broker import Broker, free_port, password_broker
from tests.conftest import REPO
from tests.pki import make_pki

GROUP_TOPIC = "edgeagent/group/line-1/config/desired"
REFUSED = r"refused the connection: (Not authorized|Bad user name or password)"


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout)


def _push(*args: str) -> subprocess.CompletedProcess[str]:
    """``edgeagent config push`` of a version 1 group push, with ``args`` for the broker."""
    return _run("-m", "edgeagent", "config", "push", "--group", "line-1", "--timeout", "20",
                *args)


def _push_file(tmp_path: Path) -> str:
    path = tmp_path / "push.json"
    path.write_text(json.dumps({"version": 1, "settings": {"limits": {"max_queue": 5}}}))
    return str(path)


def _retained(port: int, topic: str, *auth: str) -> dict[str, object]:
    """The retained message on ``topic``, read by mosquitto_sub."""
    res = subprocess.run(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), *auth,
                          "-t", topic, "-C", "1", "-W", "10"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    doc: dict[str, object] = json.loads(res.stdout)
    return doc


def _imported(importtime: str) -> set[str]:
    """Every module a ``python -X importtime`` run imported (its stderr)."""
    return {line.rsplit("|", 1)[1].strip() for line in importtime.splitlines()
            if line.startswith("import time:")}


def test_clients_do_not_load_the_model_runtime(tmp_path: Path) -> None:
    closed = f"mqtt://127.0.0.1:{free_port()}"  # nothing listens: each client fails fast
    config = tmp_path / "edgeagent.toml"
    config.write_text(f'[mqtt]\nurl = "{closed}"\n')
    push = _push_file(tmp_path)
    runs = {
        "import edgeagent.cli": ["-c", "import edgeagent.cli"],
        "config push --help": ["-m", "edgeagent", "config", "push", "--help"],
        "config push": ["-m", "edgeagent", "config", "push", "--mqtt", closed,
                        "--group", "line-1", push],
        "doctor": ["-m", "edgeagent", "doctor", "--config", str(config)],
        "ask --mqtt": ["-m", "edgeagent", "ask", "--mqtt", closed, "--device", "gw", "Hi"],
        "config reference": ["-m", "edgeagent", "config", "reference"],
    }
    loading = []
    for name, args in runs.items():
        res = _run("-X", "importtime", *args)
        modules = _imported(res.stderr)
        assert "edgeagent.cli" in modules, (name, res.stderr[-2000:])
        if name not in ("import edgeagent.cli", "config push --help", "config reference"):
            assert "paho.mqtt.client" in modules, f"{name} did not reach the broker code"
        if "onnxruntime_genai" in modules:
            loading.append(name)
    assert loading == [], "these load the model runtime"


@pytest.mark.broker
def test_config_push_is_refused_without_the_brokers_password(tmp_path: Path) -> None:
    broker = password_broker(tmp_path / "auth", "operator", "right")
    wrong = tmp_path / "wrong"
    wrong.write_text("wrong\n")
    push = _push_file(tmp_path)
    try:
        for creds in ([], ["--username", "operator", "--password-file", str(wrong)]):
            res = _push("--mqtt", broker.url, push, *creds)
            assert res.returncode == 1, res.stdout + res.stderr
            assert "pushed" not in res.stdout
            assert re.search(REFUSED, res.stderr), res.stderr
        res = subprocess.run(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port),
                              "-u", "operator", "-P", "right", "-t", GROUP_TOPIC,
                              "-C", "1", "-W", "2"], capture_output=True, text=True,
                             timeout=30)
        assert res.stdout == "", "nothing was retained"
    finally:
        broker.stop()


@pytest.mark.broker
def test_config_push_uses_the_mqtt_settings_of_its_config(tmp_path: Path) -> None:
    broker = password_broker(tmp_path / "auth", "operator", "right")
    secret = tmp_path / "mqtt_password"
    secret.write_text("right\n")
    config = tmp_path / "edgeagent.toml"
    config.write_text(f'[mqtt]\nurl = "{broker.url}"\nusername = "operator"\n'
                      f'password_file = "{secret}"\n')
    try:
        res = _push("--config", str(config), _push_file(tmp_path))
        assert res.returncode == 0, res.stdout + res.stderr
        assert f"pushed version 1 to {GROUP_TOPIC}" in res.stdout
        retained = _retained(broker.port, GROUP_TOPIC, "-u", "operator", "-P", "right")
        assert retained["target"] == {"group": "line-1"}
    finally:
        broker.stop()


@pytest.mark.broker
def test_config_push_refused_by_the_acl_is_not_pushed(tmp_path: Path) -> None:
    """The broker takes the connection but not the publish: MQTT 5 says so in the PUBACK."""
    acl = tmp_path / "acl"
    acl.write_text("topic read #\n")  # anonymous clients may read, not publish
    broker = Broker(tmp_path / "broker", f"allow_anonymous true\nacl_file {acl}\n")
    broker.start()
    try:
        res = _push("--mqtt", broker.url, _push_file(tmp_path))
        assert res.returncode == 1, res.stdout + res.stderr
        assert "pushed" not in res.stdout
        assert f"refused the push on {GROUP_TOPIC}: Not authorized" in res.stderr
    finally:
        broker.stop()


@pytest.mark.broker
def test_config_push_over_mutual_tls(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    broker = Broker(tmp_path / "tlsbroker", (
        f"allow_anonymous true\ncafile {pki['ca']}\ncertfile {pki['server']}\n"
        f"keyfile {pki['server_key']}\nrequire_certificate true\n"))
    broker.start()
    url = f"mqtts://127.0.0.1:{broker.port}"
    client_cert = ["--cert-file", str(pki["client"]), "--key-file", str(pki["client_key"])]
    push = _push_file(tmp_path)
    try:
        res = _push("--mqtt", url, *client_cert, push)  # the system CAs do not know ours
        assert res.returncode == 1, res.stdout + res.stderr
        assert "pushed" not in res.stdout
        assert "certificate verify failed" in res.stderr, res.stderr

        res = _push("--mqtt", url, "--ca-file", str(pki["ca"]), *client_cert, push)
        assert res.returncode == 0, res.stdout + res.stderr
        assert f"pushed version 1 to {GROUP_TOPIC}" in res.stdout
        retained = _retained(broker.port, GROUP_TOPIC, "--cafile", str(pki["ca"]), "--cert",
                             str(pki["client"]), "--key", str(pki["client_key"]))
        assert retained["version"] == 1
    finally:
        broker.stop()


def test_config_push_without_a_broker_is_a_usage_error(tmp_path: Path) -> None:
    config = tmp_path / "edgeagent.toml"
    config.write_text("[mqtt]\n")  # no url
    res = _push("--config", str(config), _push_file(tmp_path))
    assert res.returncode == 2, res.stdout + res.stderr
    assert "give --mqtt URL, or mqtt.url in --config" in res.stderr
