"""The publisher interface (as Frigate's ``Communicator``): how telemetry and fleet
configuration talk upstream without knowing the MQTT transport that implements it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

#: Called with (topic, payload) for each message on a subscribed filter.
Handler = Callable[[str, bytes], None]


class Publisher(Protocol):
    @property
    def connected(self) -> bool:
        """Whether a publish now goes to the broker rather than into a buffer."""
        ...

    def state(self) -> str:
        """The connection as /health and telemetry show it: online, unreachable, ..."""
        ...

    def publish(self, topic: str, payload: str | bytes, retain: bool = False) -> bool:
        """Publish QoS 1; False when the message was not handed to a connection."""
        ...

    def subscribe(self, topic_filter: str, handler: Handler) -> None:
        """Deliver messages on ``topic_filter`` to ``handler`` (on the network thread, so it
        only hands them over), now and after every reconnect."""
        ...

    def on_connected(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` after every (re)connect."""
        ...
