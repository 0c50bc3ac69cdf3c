#!/usr/bin/env bash
# Set up (see bootstrap.sh), check style, types and layering, then run the whole test suite.
# Extra arguments go to pytest, e.g. ./scripts/test.sh -k planner
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
.venv/bin/ruff check .
.venv/bin/mypy
.venv/bin/lint-imports  # the layering: pyproject.toml's [tool.importlinter] contracts
exec .venv/bin/pytest "$@"
