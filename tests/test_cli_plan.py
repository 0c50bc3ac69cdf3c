"""``edgeagent plan`` shows the running daemon's plan (from its /health) when one answers on
the configured socket, the computed one otherwise or with ``--offline``; ``config show``
prints the socket mode in octal. The CLI and the daemon as real subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import REPO, DaemonProc

RUNNING = "a daemon is running"


def _edgeagent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgeagent", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=120)


def _context_row(out: str) -> int:
    """The context_length that ``edgeagent plan`` printed."""
    for line in out.splitlines():
        if line.startswith("context_length"):
            return int(line.split()[1])
    raise AssertionError(f"no context_length row in:\n{out}")


def _client_config(tmp_path: Path, socket_path: Path, model: Path) -> Path:
    """A configuration that shares the daemon's socket and model but not its context."""
    cfg = tmp_path / "client.toml"
    cfg.write_text(f'[model]\npath = "{model}"\n[socket]\npath = "{socket_path}"\n')
    return cfg


def test_config_show_prints_the_socket_mode_in_octal(tmp_path: Path) -> None:
    cfg = tmp_path / "edgeagent.toml"
    cfg.write_text("[socket]\nmode = 0o640\n")
    res = _edgeagent("config", "show", "--config", str(cfg))
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["socket"]["mode"] == "0o640"


def test_plan_without_a_daemon_is_computed(tmp_path: Path, short_dir: Path,
                                           default_model: Path) -> None:
    cfg = _client_config(tmp_path, short_dir / "nobody.sock", default_model)
    res = _edgeagent("plan", "--config", str(cfg))
    assert res.returncode == 0, res.stderr
    assert RUNNING not in res.stdout
    assert _context_row(res.stdout) > 0


def test_plan_shows_the_running_daemons_plan(start_daemon: Any, tmp_path: Path,
                                             default_model: Path) -> None:
    d: DaemonProc = start_daemon(extra_toml="[runtime]\ncontext_length = 512\n")
    d.wait_ready()
    cfg = _client_config(tmp_path, d.socket_path, default_model)

    res = _edgeagent("plan", "--config", str(cfg))
    assert res.returncode == 0, res.stderr
    assert RUNNING in res.stdout
    assert _context_row(res.stdout) == 512  # the daemon's, not this configuration's

    offline = _edgeagent("plan", "--offline", "--config", str(cfg))
    assert offline.returncode == 0, offline.stderr
    assert RUNNING not in offline.stdout
    assert _context_row(offline.stdout) != 512

    doc = json.loads(_edgeagent("plan", "--json", "--config", str(cfg)).stdout)
    assert (doc["source"], doc["plan"]["context_length"]) == ("daemon", 512)
    offline_doc = json.loads(_edgeagent("plan", "--json", "--offline", "--config",
                                        str(cfg)).stdout)
    assert offline_doc["source"] == "computed"
    assert offline_doc["plan"]["context_length"] != 512
