"""Shared fixtures: the real default model, short socket paths, the daemon as a subprocess,
a real Mosquitto. The parts themselves are the harness package, edgeagent.testing."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeagent.settings import DEFAULT_MODEL_NAME
from edgeagent.testing.broker import Broker
from edgeagent.testing.daemon import DaemonProc, NotifyListener, launch_daemon
from edgeagent.testing.daemon import reap as _reap

# Importable from here as before (tests import them from tests.conftest).
__all__ = ["REPO", "DaemonProc", "NotifyListener", "_reap", "launch_daemon"]

REPO = Path(__file__).resolve().parent.parent


def _default_model_path() -> Path:
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "edgeagent" / "models" / DEFAULT_MODEL_NAME


#: Fixtures that need the model or a broker, and the marker a test that uses them gets.
NEEDS = {"default_model": "model", "broker": "broker"}


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test by what its fixtures need, so that the fast lane
    (``-m "not model and not broker"``) never selects one that needs the model or a
    broker, whether its module remembered the marker or not."""
    for item in items:
        for fixture, marker in NEEDS.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(marker)


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


def shared_daemon(tmp_path_factory: pytest.TempPathFactory, model: Path, toml: str,
                  name: str) -> Iterator[DaemonProc]:
    """A ready daemon for a module-scoped fixture (its tests must leave it idle)."""
    sockdir = Path(tempfile.mkdtemp(prefix="ea-", dir="/tmp"))
    d = launch_daemon(tmp_path_factory.mktemp(name), sockdir, model, toml)
    d.wait_ready()
    yield d
    _reap(d)
    shutil.rmtree(sockdir, ignore_errors=True)


@pytest.fixture(scope="module")
def api_daemon(tmp_path_factory: pytest.TempPathFactory, default_model: Path
               ) -> Iterator[DaemonProc]:
    """One ready daemon shared by a module's tests (they must leave it idle)."""
    yield from shared_daemon(tmp_path_factory, default_model,
                             "[runtime]\ncontext_length = 2048\n[limits]\nmax_queue = 8\n",
                             "api")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Any]:
    """A real Mosquitto on a free port, stopped at the end of the test."""
    b = Broker(tmp_path / "broker")
    b.start()
    yield b
    b.stop()
