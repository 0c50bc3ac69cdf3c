"""The tests' Mosquitto and requester: the harness's (edgeagent.testing.broker)."""

from edgeagent.testing.broker import (
    MOSQUITTO,
    Broker,
    Requester,
    free_port,
    password_broker,
    requester,
)

__all__ = ["MOSQUITTO", "Broker", "Requester", "free_port", "password_broker", "requester"]
