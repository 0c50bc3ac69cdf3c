#!/usr/bin/env bash
# Set up (see bootstrap.sh), check style and types, then run the whole test suite.
# Extra arguments go to pytest, e.g. ./scripts/test.sh -k planner
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
.venv/bin/ruff check .
.venv/bin/mypy
exec .venv/bin/pytest "$@"
