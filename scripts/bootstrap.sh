#!/usr/bin/env bash
# Set up everything edgeagent needs on a fresh machine; quick when it is already done.
#   .venv with the package and its extras, the mosquitto binaries (Debian), the default model.
# Used by scripts/run.sh and scripts/test.sh; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[bootstrap] %s\n' "$*" >&2; }

# 1. Python virtual environment with the package (editable) and its extras.
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  log "creating .venv"
  "$python" -m venv .venv
fi
stamp=.venv/.edgeagent-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  log "installing edgeagent[convert,dev] into .venv"
  .venv/bin/pip install --quiet --disable-pip-version-check -e '.[convert,dev]'
  touch "$stamp"
fi

# 2. Mosquitto (broker and clients) from Debian's packages when missing.
need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v mosquitto_rr >/dev/null 2>&1 || need+=(mosquitto-clients)
command -v curl >/dev/null 2>&1 || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  log "installing ${need[*]} from Debian's packages"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

# 3. The default model (SmolLM2-135M-Instruct, INT4), built once per machine.
.venv/bin/edgeagent model build
