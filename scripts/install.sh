#!/usr/bin/env bash
# Install edgeagent on a gateway (run as root): a system user, a venv under /opt/edgeagent,
# the systemd units, /etc/edgeagent/edgeagent.toml, optionally a prebuilt model folder.
#
#   sudo ./scripts/install.sh [--model DIR]        install or upgrade, enable and start
#   sudo ./scripts/install.sh --uninstall [--purge] remove (keep data unless --purge)
#   ./scripts/install.sh --root DIR [--no-venv]   into a staging tree: no user, no systemctl
#
# Idempotent: running it again upgrades the package and the units, never overwrites an
# edited configuration (the new one is written beside it as edgeagent.toml.new).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
root=""
model=""
mode=install
purge=no
venv=yes
python=${PYTHON:-python3}

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --root) root=$(realpath -m "$2"); shift 2 ;;
    --model) model=$(realpath "$2"); shift 2 ;;
    --uninstall) mode=uninstall; shift ;;
    --purge) purge=yes; shift ;;
    --no-venv) venv=no; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
done

live=yes   # a real system: users, ownership, systemctl
[ -n "$root" ] && live=no
if [ "$live" = yes ] && [ "$(id -u)" -ne 0 ]; then
  echo "install.sh: run as root (or use --root DIR for a staging tree)" >&2
  exit 2
fi
have_systemd=no
[ "$live" = yes ] && [ -d /run/systemd/system ] && have_systemd=yes

say() { printf '[install] %s\n' "$*"; }
opt=$root/opt/edgeagent
etc=$root/etc/edgeagent
units=$root/etc/systemd/system
state=$root/var/lib/edgeagent

systemctl_() {
  if [ "$have_systemd" = yes ]; then systemctl "$@"; else say "(would run) systemctl $*"; fi
}

if [ "$mode" = uninstall ]; then
  systemctl_ disable --now edgeagent.service edgeagent.socket || true
  rm -f "$units/edgeagent.service" "$units/edgeagent.socket"
  systemctl_ daemon-reload
  rm -rf "$opt"
  if [ "$purge" = yes ]; then
    rm -rf "$etc" "$state"
    if [ "$live" = yes ]; then
      userdel edgeagent 2>/dev/null || true
      groupdel edgeagent-clients 2>/dev/null || true
    fi
    say "removed edgeagent, its configuration and its data"
  else
    say "removed edgeagent; kept $etc and $state (--purge removes them)"
  fi
  exit 0
fi

# 1. The user that runs the daemon, and the group of local socket clients.
if [ "$live" = yes ]; then
  getent group edgeagent-clients >/dev/null || groupadd --system edgeagent-clients
  id edgeagent >/dev/null 2>&1 || useradd --system --no-create-home --home-dir /var/lib/edgeagent \
    --shell /usr/sbin/nologin edgeagent
else
  say "(would create) system user edgeagent, group edgeagent-clients"
fi

# 2. The package, without the conversion extra, in its own venv.
mkdir -p "$opt"
if [ "$venv" = yes ]; then
  [ -x "$opt/venv/bin/python" ] || "$python" -m venv "$opt/venv"
  "$opt/venv/bin/pip" install --quiet --disable-pip-version-check --upgrade "$repo"
  say "installed $("$opt/venv/bin/edgeagent" --version) into $opt/venv"
else
  say "(skipped) venv and package (--no-venv)"
fi
cp "$repo/README.md" "$opt/README.md"

# 3. Configuration: never overwrite an edited file.
mkdir -p "$etc/credentials"
chmod 0700 "$etc/credentials"
if [ ! -e "$etc/edgeagent.toml" ]; then
  install -m 0644 "$repo/configs/edgeagent.toml" "$etc/edgeagent.toml"
elif ! cmp -s "$repo/configs/edgeagent.toml" "$etc/edgeagent.toml"; then
  install -m 0644 "$repo/configs/edgeagent.toml" "$etc/edgeagent.toml.new"
  say "kept your $etc/edgeagent.toml; the shipped one is edgeagent.toml.new"
fi
# LoadCredential= needs the file; an empty one means "no password".
[ -e "$etc/credentials/mqtt_password" ] || install -m 0600 /dev/null "$etc/credentials/mqtt_password"

# 4. The units.
mkdir -p "$units"
install -m 0644 "$repo/systemd/edgeagent.service" "$repo/systemd/edgeagent.socket" "$units/"

# 5. A prebuilt model, when given (the gateway has no conversion tools).
mkdir -p "$state/models"
if [ -n "$model" ]; then
  [ -f "$model/genai_config.json" ] || { echo "install.sh: $model is not an onnxruntime-genai model folder" >&2; exit 2; }
  name=$(basename "$model")
  [ "$name" = "$(basename "$(dirname "$model")")" ] && name=model
  rm -rf "$state/models/.$name.new"
  cp -a "$model" "$state/models/.$name.new"
  rm -rf "$state/models/$name"
  mv "$state/models/.$name.new" "$state/models/$name"
  say "model copied to /var/lib/edgeagent/models/$name"
  [ "$name" = smollm2-135m-instruct-int4 ] || \
    say "set [model] path = \"/var/lib/edgeagent/models/$name\" in /etc/edgeagent/edgeagent.toml"
fi
[ "$live" = yes ] && chown -R edgeagent:edgeagent "$state"

# 6. Start. An older service's RuntimeDirectory= left /run/edgeagent owned by edgeagent (mode
# 0750, the clients locked out) until reboot: stop the units and let the socket unit make it.
if [ "$live" = yes ] && [ -d /run/edgeagent ] && [ "$(stat -c %U /run/edgeagent)" != root ]; then
  systemctl_ stop edgeagent.service edgeagent.socket
  rm -rf /run/edgeagent
fi
systemctl_ daemon-reload
systemctl_ enable --now edgeagent.socket edgeagent.service
say "done: socket /run/edgeagent/api.sock (group edgeagent-clients); logs: journalctl -u edgeagent"
