"""MQTT names and clients: every topic edgeagent uses, and every paho client it builds.

The daemon, telemetry, fleet configuration, ``ask --mqtt``, ``config push`` and ``doctor``
all name topics here and connect through :func:`make_client`, so they agree on the topic
layout and reach the broker with the same ``mqtt.*`` settings (protocol, credentials,
TLS). This module imports no serving code: the command-line clients use it without
loading the model runtime.

Topics, under ``{prefix}`` (``mqtt.topic_prefix``):

- ``{prefix}/{device}/status``, ``/request``, ``/cancel``: the daemon's serving topics;
- ``$share/{group}/{prefix}/fleet/{group}/request``: the fleet's shared request stream;
- ``{prefix}/{device}/config/desired`` and ``{prefix}/group/{group}/config/desired``:
  fleet configuration pushes; ``{prefix}/{device}/config/reported``: their outcome;
- ``{prefix}/{device}/telemetry``: health documents;
- ``{prefix}/clients/{token}/reply``: where edgeagent's own clients take their replies.
"""

from __future__ import annotations

import ssl
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgeagent.settings import MqttSettings, Settings, read_secret


# ---------------------------------------------------------------- topics
def topics(settings: Settings) -> dict[str, str]:
    """The daemon's serving topics: status, request, cancel and, with ``fleet.group``, the
    shared subscription (``fleet``) and the topic requesters publish it on (``fleet_topic``)."""
    prefix = settings.mqtt.topic_prefix
    base = f"{prefix}/{settings.device_id}"
    out = {"status": f"{base}/status", "request": f"{base}/request",
           "cancel": f"{base}/cancel"}
    if settings.fleet.group:
        out["fleet_topic"] = fleet_request_topic(prefix, settings.fleet.group)
        out["fleet"] = f"$share/{settings.fleet.group}/{out['fleet_topic']}"
    return out


def fleet_request_topic(prefix: str, group: str) -> str:
    """Where requesters publish work for any member of fleet ``group``."""
    return f"{prefix}/fleet/{group}/request"


def desired_topic(prefix: str, layer: str, name: str) -> str:
    """Where a configuration push for a ``layer`` ("device" or "group") ``name`` is retained."""
    return f"{prefix}/group/{name}/config/desired" if layer == "group" \
        else f"{prefix}/{name}/config/desired"


def reported_topic(prefix: str, device: str) -> str:
    """Where ``device`` reports the outcome of each configuration push (retained)."""
    return f"{prefix}/{device}/config/reported"


def config_topics(settings: Settings) -> dict[str, str]:
    """This device's configuration topics: ``device`` and, with ``fleet.group``, ``group``
    (desired), and ``reported``."""
    prefix = settings.mqtt.topic_prefix
    out = {"device": desired_topic(prefix, "device", settings.device_id),
           "reported": reported_topic(prefix, settings.device_id)}
    if settings.fleet.group:
        out["group"] = desired_topic(prefix, "group", settings.fleet.group)
    return out


def telemetry_topic(settings: Settings) -> str:
    return f"{settings.mqtt.topic_prefix}/{settings.device_id}/telemetry"


def client_reply_topic(prefix: str, token: str) -> str:
    """A reply topic for one of edgeagent's own clients: inside the default
    ``mqtt.reply_topics`` (``{prefix}/clients/#``)."""
    return f"{prefix}/clients/{token}/reply"


def reply_filters(settings: Settings) -> list[str]:
    """``mqtt.reply_topics`` with ``{prefix}`` and ``{device}`` filled in."""
    return [f.replace("{prefix}", settings.mqtt.topic_prefix).replace("{device}",
                                                                     settings.device_id)
            for f in settings.mqtt.reply_topics]


# ---------------------------------------------------------------- clients
def broker_address(m: MqttSettings) -> tuple[str, int]:
    url = urlparse(m.url or "")
    if url.scheme not in ("mqtt", "mqtts") or not url.hostname:
        raise ValueError(f"mqtt.url must be mqtt://host:port or mqtts://host:port, not {m.url!r}")
    return url.hostname, url.port or (8883 if url.scheme == "mqtts" else 1883)


def tls_context(m: MqttSettings) -> ssl.SSLContext | None:
    """The TLS context for an ``mqtts://`` URL (CA bundle, client certificate), else None."""
    if urlparse(m.url or "").scheme != "mqtts":
        return None
    ctx = ssl.create_default_context(cafile=str(m.ca_file) if m.ca_file else None)
    if m.cert_file is not None:
        ctx.load_cert_chain(str(m.cert_file), str(m.key_file) if m.key_file else None)
    return ctx


def make_client(settings: Settings, client_id: str | None = None,
                manual_ack: bool = False, persistent: bool = True,
                reconnect: bool = False) -> mqtt.Client:
    """A paho client configured from the settings: protocol, credentials, TLS.
    ``persistent=False`` asks MQTT 3.1.1 for a clean session (MQTT 5 asks at connect);
    ``reconnect`` lets paho's loop reconnect on its own."""
    m = settings.mqtt
    v5 = m.protocol == "5"
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id or m.client_id or settings.device_id,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        clean_session=None if v5 else not persistent,
        reconnect_on_failure=reconnect,
        manual_ack=manual_ack,
    )
    password = read_secret("mqtt_password", m.password_file)
    if m.username is not None or password is not None:
        client.username_pw_set(m.username, password)
    ctx = tls_context(m)
    if ctx is not None:
        client.tls_set_context(ctx)
    return client
