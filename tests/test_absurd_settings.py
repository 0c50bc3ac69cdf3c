"""Explicit settings that cannot be right stop the daemon at boot, before anything is created."""

from __future__ import annotations

import json
import os
from typing import Any

from tests.conftest import DaemonProc

STARTUP_FAILURE = 3


def test_booting_with_more_threads_than_cpus_exits_3_with_one_line(start_daemon: Any) -> None:
    # 10,000 threads once left a gateway unanswering; the plan refuses before any exists
    d: DaemonProc = start_daemon(extra_toml="[runtime]\nthreads = 10000\n")
    assert d.proc.wait(60) == STARTUP_FAILURE, d.logs()
    events = []
    for line in d.logs().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    errors = [e for e in events if e.get("level") == "error"]
    assert len(errors) == 1, errors
    cpus = len(os.sched_getaffinity(0))
    assert f"runtime.threads=10000 is more than the {cpus} CPUs" in errors[0]["error"]
    assert not any(e.get("event") == "ready" for e in events)
