"""The harness itself: the fast lane is honest, scripts stand on their own, and a daemon that
dies before READY is reported at once."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from edgeagent.testing.daemon import launch_daemon, reap

REPO = Path(__file__).resolve().parent.parent
FAST_LANE = "not model and not broker"


def test_the_fast_lane_selects_no_test_that_needs_the_model_or_a_broker() -> None:
    """``pytest -m "not model and not broker"`` runs on a machine without the model or
    Mosquitto: no test it selects may use the fixtures that need them."""
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "--fixtures-per-test", "-q", "-m", FAST_LANE,
         "-p", "no:cacheprovider", "--continue-on-collection-errors", "tests"],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert "fixtures used by" in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]
    offenders: list[str] = []
    test = "?"
    for line in res.stdout.splitlines():
        if m := re.match(r"-+ fixtures used by (\S+) -+$", line):
            test = m.group(1)
        elif re.match(r"(default_model|broker|start_daemon|api_daemon) -- ", line):
            offenders.append(f"{test}: {line.split()[0]}")
    assert not offenders, offenders


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "scripts").glob("*.py")))
def test_scripts_do_not_import_the_tests(script: str) -> None:
    """Scripts use the harness package (edgeagent.testing), never the tests' modules."""
    tree = ast.parse((REPO / "scripts" / script).read_text())
    imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names]
    imported += [node.module or "" for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom)]
    assert not [name for name in imported if name.split(".")[0] == "tests"], imported


def test_wait_ready_reports_a_daemon_that_exited(tmp_path: Path, short_dir: Path) -> None:
    """A daemon that exits before READY (here: no model, exit 3) fails wait_ready with its
    exit code and log, instead of a wait for the whole timeout."""
    d = launch_daemon(tmp_path, short_dir, tmp_path / "no-model", name="gone")
    try:
        with pytest.raises(AssertionError) as err:
            d.wait_ready(timeout=600)
        assert "exited with 3" in str(err.value)
        assert "model" in str(err.value)  # the log's one line says what is missing
        assert d.ready_s is None
    finally:
        reap(d)
