"""Transports: the ways in for requests. Each submits to the one scheduler."""

from __future__ import annotations

from edgeagent.daemon import TransportFactory


def default_transports() -> list[TransportFactory]:
    """Every transport the daemon runs; each decides from the settings whether it is on."""
    from edgeagent.transports.http import HttpTransport
    from edgeagent.transports.mqtt import MqttTransport

    return [HttpTransport, MqttTransport]
