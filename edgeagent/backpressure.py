"""When a refused client should come back: the ``Retry-After`` of a 429 or a 503.

The estimate is the position a new request would have divided by the queue's recent drain
rate (sequences finished per second over the last ``DRAIN_WINDOW_S``), in whole seconds,
at least 1. The position counts the queue and the clients already told to come back (and
not yet due): they will be ahead of this one, so a burst of refused clients is spread out
instead of all coming back together into the same full queue.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable

#: How far back finished sequences count towards the drain rate.
DRAIN_WINDOW_S = 30.0
#: Before any sequence finished within the window: the seconds each one ahead is assumed
#: to take.
UNMEASURED_S_PER_JOB = 1.0
#: The most a client is told to wait: the openai SDK honours Retry-After up to 60 s (120 s
#: in recent versions) and falls back to its own short backoff above that.
RETRY_AFTER_MAX_S = 60


class DrainRate:
    """Finished sequences over a recent window, and the retries promised to refused clients.
    Thread-safe: the scheduler's thread records, transports' threads ask."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        #: (submitted, finished) of each sequence finished within the window
        self._finished: collections.deque[tuple[float, float]] = collections.deque()
        #: when each refused client was told to come back
        self._promised: list[float] = []

    def finished(self, submitted: float) -> None:
        """A sequence submitted at ``submitted`` (the clock's time) has finished."""
        now = self._clock()
        with self._lock:
            self._finished.append((submitted, now))
            self._prune(now)

    def retry_after(self, waiting: int) -> int:
        """Seconds a client refused now should wait, with ``waiting`` sequences queued;
        the client is counted as coming back then."""
        now = self._clock()
        with self._lock:
            self._prune(now)
            position = waiting + len(self._promised) + 1
            rate = self._rate(now)
            wait = position / rate if rate else position * UNMEASURED_S_PER_JOB
            seconds = max(1, min(RETRY_AFTER_MAX_S, math.ceil(wait)))
            self._promised.append(now + seconds)
            return seconds

    def _rate(self, now: float) -> float | None:
        if not self._finished:
            return None
        # Measured from when the work that finished began (at most the window): after an
        # idle spell, a burst's rate is not diluted by the quiet before it.
        began = max(now - DRAIN_WINDOW_S, min(s for s, _ in self._finished))
        return len(self._finished) / max(now - began, 1e-3)

    def _prune(self, now: float) -> None:
        while self._finished and self._finished[0][1] < now - DRAIN_WINDOW_S:
            self._finished.popleft()
        self._promised = [due for due in self._promised if due > now]
