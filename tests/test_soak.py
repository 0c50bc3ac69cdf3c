"""A short soak in CI: scripts/soak.py with mixed traffic, RSS flat after warm-up."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.model, pytest.mark.broker, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent


def test_short_soak(default_model: Path) -> None:
    res = subprocess.run(
        # Issue 7's target is < 5 MB (scripts/soak.py's default); measured ~1 MB here as a
        # trend (median of the last fifth less the first fifth after warm-up). CI allows 8 MB
        # for the bounded caches (MQTT replies kept for duplicates, TTFT samples) filling on
        # a slow run; a leak shows far above.
        [sys.executable, "scripts/soak.py", "--seconds", "150", "--warmup", "75",
         "--max-growth-mb", "8", "--model", str(default_model)],
        capture_output=True, text=True, timeout=400, cwd=REPO)
    report = json.loads(res.stdout[res.stdout.index("{"):])
    assert res.returncode == 0, report
    assert report["total"] > 200  # enough for a trend; ~2,000 on a quiet 2-core host
    assert report["rss_growth_after_warmup_mb"] < 8
    assert report["fd_growth"] <= 2
    assert report["active_sequences_at_end"] == 0
