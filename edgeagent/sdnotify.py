"""systemd notification protocol: READY=1, STATUS=..., WATCHDOG=1, STOPPING=1.

A no-op when the daemon is not run by systemd (no ``$NOTIFY_SOCKET``).
"""

from __future__ import annotations

import contextlib
import os
import socket


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        self._address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self._sock: socket.socket | None = None
        if self._address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def send(self, *fields: str) -> None:
        """Send ``KEY=value`` fields in one datagram; errors are not fatal to the daemon."""
        if self._sock is None or self._address is None:
            return
        addr = self._address
        if addr.startswith("@"):  # abstract namespace
            addr = "\0" + addr[1:]
        with contextlib.suppress(OSError):
            self._sock.sendto("\n".join(fields).encode(), addr)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval() -> float | None:
    """Seconds between two WATCHDOG=1 pings (half of ``$WATCHDOG_USEC``), or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2_000_000
    except ValueError:
        return None
