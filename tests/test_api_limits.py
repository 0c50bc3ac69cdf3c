"""Admission under load: queue full (429), deadlines (408), and `edgeagent ask`."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgeagent.testing.fake_proc import fake_machine
from tests.conftest import DaemonProc

pytestmark = pytest.mark.model

LIMITS = ("[runtime]\nmax_batch = 1\ncontext_length = 4096\n"
          "[limits]\nmax_queue = 1\nrequest_timeout_s = 5\n")
LONG = {"messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 2000, "min_tokens": 2000}


def _client(d: DaemonProc) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(d.socket_path)),
                        base_url="http://localhost", timeout=120)


def _wait(client: httpx.Client, key: str, value: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/health").json()["serving"][key] != value:
        assert time.monotonic() < deadline, f"{key} never reached {value}"


def test_queue_full_is_429_and_the_queue_drains(start_daemon: Any) -> None:
    d: DaemonProc = start_daemon(extra_toml=LIMITS)
    d.wait_ready()
    queued: dict[str, Any] = {}
    with _client(d) as client:
        with client.stream("POST", "/v1/chat/completions", json={**LONG, "stream": True}) as a:
            # Keep the line iterator: a discarded one closes the connection, which cancels.
            lines = a.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            _wait(client, "active_sequences", 1)  # running, not queued

            def second() -> None:
                with _client(d) as c2:
                    queued["resp"] = c2.post("/v1/chat/completions", json={
                        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})

            worker = threading.Thread(target=second)
            worker.start()
            _wait(client, "queue_depth", 1)
            third = client.post("/v1/chat/completions",
                                json={"messages": [{"role": "user", "content": "Hi"}]})
            assert third.status_code == 429
            assert third.json()["error"]["code"] == "queue_full"
        # the long stream is closed: its slot frees, the queued request runs
        worker.join(60)
        assert queued["resp"].status_code == 200, queued["resp"].text
        _wait(client, "active_sequences", 0)
        assert client.get("/health").json()["serving"]["rejected"] == {"queue_full": 1}


def test_deadline_is_408(start_daemon: Any) -> None:
    d: DaemonProc = start_daemon(extra_toml=LIMITS)
    d.wait_ready()
    with _client(d) as client:
        resp = client.post("/v1/chat/completions", json=LONG)
        assert resp.status_code == 408
        assert resp.json()["error"]["code"] == "timeout"
        lines = [ln for ln in client.post("/v1/chat/completions",
                                          json={**LONG, "stream": True}).text.splitlines()
                 if ln.startswith("data: ")]
        assert '"code":"timeout"' in lines[-2]
        assert lines[-1] == "data: [DONE]"
        _wait(client, "active_sequences", 0)


def test_ask_talks_to_the_socket(start_daemon: Any) -> None:
    d: DaemonProc = start_daemon()
    d.wait_ready()
    res = subprocess.run([sys.executable, "-m", "edgeagent", "ask", "--socket",
                          str(d.socket_path), "--max-tokens", "8", "Say hello."],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip()
    res = subprocess.run([sys.executable, "-m", "edgeagent", "ask", "--socket",
                          str(d.socket_path), "--model", "edgeagent:nope", "Hi"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert "unknown model" in res.stderr




def test_memory_guard_refuses_new_work_with_503(start_daemon: Any, tmp_path: Path) -> None:
    root = tmp_path / "machine"
    fake_machine(root, 4096 * 2**20)
    d: DaemonProc = start_daemon(extra_toml=(
        f'[runtime]\nprobe_root = "{root}"\ncontext_length = 1024\nmemory_headroom_mb = 256\n'))
    d.wait_ready()
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    with _client(d) as client:
        assert client.post("/v1/chat/completions", json=body).status_code == 200
        fake_machine(root, 100 * 2**20)  # below the 256 MB headroom
        resp = client.post("/v1/chat/completions", json=body)
        assert resp.status_code == 503
        assert "below the planned headroom" in resp.json()["error"]["message"]
        assert "memory guard" in d.logs()
        fake_machine(root, 4096 * 2**20)
        assert client.post("/v1/chat/completions", json=body).status_code == 200
