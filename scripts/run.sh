#!/usr/bin/env bash
# Set up (see bootstrap.sh) and run the daemon in the foreground with configs/edgeagent.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
exec .venv/bin/edgeagent run --config configs/edgeagent.toml "$@"
