"""Shared fixtures: the real default model, short socket paths, the daemon as a subprocess."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from edgeagent.settings import DEFAULT_MODEL_NAME

REPO = Path(__file__).resolve().parent.parent


def _default_model_path() -> Path:
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "edgeagent" / "models" / DEFAULT_MODEL_NAME


@pytest.fixture(scope="session")
def default_model() -> Path:
    """The real default model, built once per machine (scripts/bootstrap.sh builds it)."""
    path = _default_model_path()
    if not (path / "genai_config.json").exists():
        from edgeagent.convert import build_model

        build_model(path)
    return path


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test sees the caller's EDGEAGENT_* or systemd variables; each has its state dir."""
    for key in list(os.environ):
        if key.startswith("EDGEAGENT_") or key in {
            "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
            "CREDENTIALS_DIRECTORY", "STATE_DIRECTORY", "RUNTIME_DIRECTORY",
        }:
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("EDGEAGENT_STATE_DIR", str(tmp_path / "state"))


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory for Unix sockets (paths are limited to about 100 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="ea-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class NotifyListener:
    """A real sd_notify datagram socket, as systemd has."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def wait_for(self, field_: str, timeout: float = 120.0) -> str:
        """Block until a datagram carrying ``field_`` (e.g. READY=1) arrives."""
        deadline = time.monotonic() + timeout
        for msg in self.messages:
            if field_ in msg.split("\n"):
                return msg
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {field_} within {timeout}s; got {self.messages}")
            self.sock.settimeout(left)
            data = self.sock.recv(4096).decode()
            self.messages.append(data)
            if field_ in data.split("\n"):
                return data

    def close(self) -> None:
        self.sock.close()


@dataclass
class DaemonProc:
    proc: subprocess.Popen[str]
    config: Path
    socket_path: Path
    notify: NotifyListener
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    def wait_ready(self, timeout: float = 120.0) -> None:
        try:
            self.notify.wait_for("READY=1", timeout)
        except (TimeoutError, OSError) as exc:
            raise AssertionError(f"daemon not ready: {exc}\n{self.logs()}") from exc

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


def write_config(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


def launch_daemon(workdir: Path, sockdir: Path, model: Path, extra_toml: str = "",
                  env: dict[str, str] | None = None, name: str = "d",
                  socket_toml: str = "") -> DaemonProc:
    """Start ``edgeagent run`` as a real subprocess with its own config, state and socket."""
    sock = sockdir / f"{name}.sock"
    cfg = workdir / f"{name}.toml"
    cfg.write_text(
        f'state_dir = "{workdir / (name + "-state")}"\n'
        f'device_id = "test-{name}"\n'
        f"{extra_toml}\n"
        f'[model]\npath = "{model}"\n'
        f'[socket]\npath = "{sock}"\n{socket_toml}\n'
        '[log]\nformat = "json"\nlevel = "debug"\n'
    )
    notify = NotifyListener(sockdir / f"{name}-{uuid.uuid4().hex[:6]}.notify")
    log_path = workdir / f"{name}.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEAGENT_")}
    full_env.update({"NOTIFY_SOCKET": str(notify.path), "PYTHONUNBUFFERED": "1"})
    full_env.update(env or {})
    with log_path.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgeagent", "run", "--config", str(cfg)],
            stdout=out, stderr=subprocess.STDOUT, env=full_env, text=True, cwd=REPO,
        )
    return DaemonProc(proc, cfg, sock, notify, log_path, full_env)


def _reap(d: DaemonProc) -> None:
    if d.proc.poll() is None:
        d.proc.kill()
        d.proc.wait(timeout=30)
    d.notify.close()


@pytest.fixture
def start_daemon(short_dir: Path, tmp_path: Path, default_model: Path) -> Iterator[Any]:
    """A factory: start_daemon(extra_toml=..., env=..., model_path=..., name=...)."""
    started: list[DaemonProc] = []

    def start(extra_toml: str = "", env: dict[str, str] | None = None,
              model_path: Path | None = None, name: str = "d",
              socket_toml: str = "") -> DaemonProc:
        d = launch_daemon(tmp_path, short_dir, model_path or default_model, extra_toml, env,
                          name, socket_toml)
        started.append(d)
        return d

    yield start
    for d in started:
        _reap(d)


@pytest.fixture(scope="module")
def api_daemon(tmp_path_factory: pytest.TempPathFactory, default_model: Path
               ) -> Iterator[DaemonProc]:
    """One ready daemon shared by a module's tests (they must leave it idle)."""
    sockdir = Path(tempfile.mkdtemp(prefix="ea-", dir="/tmp"))
    workdir = tmp_path_factory.mktemp("api")
    d = launch_daemon(workdir, sockdir, default_model,
                      "[runtime]\ncontext_length = 2048\n[limits]\nmax_queue = 8\n")
    d.wait_ready()
    yield d
    _reap(d)
    shutil.rmtree(sockdir, ignore_errors=True)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Any]:
    """A real Mosquitto on a free port, stopped at the end of the test."""
    from tests.broker import Broker

    b = Broker(tmp_path / "broker")
    b.start()
    yield b
    b.stop()
