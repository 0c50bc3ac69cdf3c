"""`edgeagent run` as systemd runs it: sd_notify, watchdog, drain, reload, exit codes."""

from __future__ import annotations

import json
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import DaemonProc

pytestmark = pytest.mark.model

STARTUP_FAILURE = 3


def _log_events(d: DaemonProc) -> list[dict[str, Any]]:
    out = []
    for line in d.logs().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def test_ready_watchdog_and_clean_stop(start_daemon: Any) -> None:
    d: DaemonProc = start_daemon(env={"WATCHDOG_USEC": "400000"})
    ready = d.notify.wait_for("READY=1")
    assert any(f.startswith("STATUS=ready") for f in ready.split("\n"))
    d.notify.wait_for("WATCHDOG=1", timeout=30)
    assert d.socket_path.exists()
    assert d.stop(signal.SIGTERM) == 0
    d.notify.wait_for("STOPPING=1", timeout=5)
    assert not d.socket_path.exists(), "the socket file is unlinked on exit"


def test_sigterm_drains_in_flight_work(start_daemon: Any) -> None:
    d: DaemonProc = start_daemon()
    d.wait_ready()
    got_first = threading.Event()
    result: dict[str, Any] = {}

    def stream() -> None:
        body = {"messages": [{"role": "user", "content": "Tell me a long story."}],
                "max_tokens": 60, "min_tokens": 60, "stream": True}
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(d.socket_path)),
                          base_url="http://localhost", timeout=120) as client, \
                client.stream("POST", "/v1/chat/completions", json=body) as resp:
            lines = []
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    lines.append(line[6:])
                    got_first.set()
            result["lines"] = lines

    worker = threading.Thread(target=stream)
    worker.start()
    assert got_first.wait(60), d.logs()
    d.proc.send_signal(signal.SIGTERM)
    worker.join(120)
    assert d.proc.wait(60) == 0
    lines = result["lines"]
    assert lines[-1] == "[DONE]"
    last = json.loads(lines[-2])
    assert "choices" in last, last
    assert last["choices"][0]["finish_reason"] == "length", "the stream ran to its end"


def test_tampered_model_exits_3_with_one_clear_line(
    start_daemon: Any, default_model: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "model"
    shutil.copytree(default_model, copy)
    data = copy / "model.onnx.data"
    with data.open("r+b") as fh:
        fh.seek(data.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0xFF]))
    d: DaemonProc = start_daemon(model_path=copy)
    assert d.proc.wait(120) == STARTUP_FAILURE
    errors = [e for e in _log_events(d) if e.get("level") == "error"]
    assert len(errors) == 1
    assert "model.onnx.data" in errors[0]["error"]


def test_missing_model_and_bad_config_exit_3(start_daemon: Any, tmp_path: Path) -> None:
    d: DaemonProc = start_daemon(model_path=tmp_path / "nowhere", name="missing")
    assert d.proc.wait(60) == STARTUP_FAILURE
    assert "does not exist" in d.logs()

    d = start_daemon(extra_toml="[runtime]\nthreads = -4\n", name="badcfg")
    assert d.proc.wait(60) == STARTUP_FAILURE
    assert "runtime.threads" in d.logs()


def test_context_that_cannot_fit_is_a_startup_error(start_daemon: Any) -> None:
    d: DaemonProc = start_daemon(extra_toml="[runtime]\ncontext_length = 1048576\n")
    assert d.proc.wait(60) == STARTUP_FAILURE
    assert "context_length" in d.logs()


def _sighup_until(d: DaemonProc, text: str) -> str:
    """Send SIGHUP, then serve /health (same event loop) until ``text`` is logged."""
    before = len(d.logs())
    d.proc.send_signal(signal.SIGHUP)
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(d.socket_path)),
                      base_url="http://localhost", timeout=30) as client:
        for _ in range(200):
            assert client.get("/health").status_code == 200
            if text in d.logs()[before:]:
                break
    return d.logs()[before:]


def test_sighup_reloads_the_configuration(start_daemon: Any) -> None:
    d: DaemonProc = start_daemon(extra_toml="[limits]\nmax_queue = 4\n")
    d.wait_ready()
    d.config.write_text(d.config.read_text().replace("max_queue = 4", "max_queue = 7"))
    assert "configuration applied" in _sighup_until(d, "configuration applied")

    d.config.write_text(d.config.read_text().replace("max_queue = 7", "max_queue = -1"))
    assert "limits.max_queue" in _sighup_until(d, "reload rejected")
    assert d.stop() == 0


def test_socket_activation_accepts_before_ready(
    tmp_path: Path, short_dir: Path, default_model: Path
) -> None:
    """systemd passes a listening socket as fd 3 (LISTEN_FDS): clients connect at once."""
    import os
    import socket
    import subprocess
    import sys

    from tests.conftest import REPO, NotifyListener

    path = short_dir / "act.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    cfg = tmp_path / "act.toml"
    cfg.write_text(f'state_dir = "{tmp_path / "st"}"\n[model]\npath = "{default_model}"\n'
                   f'[socket]\npath = "{short_dir / "unused.sock"}"\n[log]\nformat = "json"\n')
    notify = NotifyListener(short_dir / "act.notify")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEAGENT_")}
    env.update(NOTIFY_SOCKET=str(notify.path), LISTEN_FDS="1")
    fd = listener.fileno()
    # The socket becomes fd 3, and LISTEN_PID must be the daemon's own pid: the shell
    # does both, then execs into Python (same pid).
    proc = subprocess.Popen(
        ["/bin/bash", "-c", f'exec 3<&{fd}; LISTEN_PID=$$ exec "$0" -m edgeagent run '
         '--config "$1"', sys.executable, str(cfg)],
        env=env, cwd=REPO, pass_fds=(fd,),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    listener.close()  # the daemon holds it now
    try:
        # Connected before READY: the kernel queues us on the inherited socket.
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(path)),
                          base_url="http://localhost", timeout=60) as client:
            assert client.get("/health").status_code in (200, 503)
            notify.wait_for("READY=1")
            assert client.get("/health").status_code == 200
        assert not (short_dir / "unused.sock").exists(), "no socket of its own was bound"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        if proc.stdout is not None:
            proc.stdout.close()
        notify.close()
