"""Deployment: the systemd units, the installer, `edgeagent doctor`."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgeagent import settings as settings_module
from edgeagent.settings import LimitsSettings, Settings
from tests.broker import free_port, password_broker

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "edgeagent.service"
SOCKET_UNIT = REPO / "systemd" / "edgeagent.socket"
needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")


@needs_systemd_analyze
def test_units_verify(tmp_path: Path) -> None:
    # verify checks that ExecStart exists: point a copy at this checkout's entry point.
    unit = tmp_path / "edgeagent.service"
    unit.write_text(UNIT.read_text().replace(
        "/opt/edgeagent/venv/bin/edgeagent", str(Path(sys.executable).parent / "edgeagent")))
    shutil.copy(SOCKET_UNIT, tmp_path / "edgeagent.socket")
    res = subprocess.run(["systemd-analyze", "verify", str(unit),
                          str(tmp_path / "edgeagent.socket")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip() == "", res.stderr


@needs_systemd_analyze
def test_security_exposure_at_most_1_5() -> None:
    res = subprocess.run(["systemd-analyze", "security", "--offline=true", str(UNIT)],
                         capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for edgeagent.service: ([0-9.]+)", res.stdout)
    assert match, res.stdout + res.stderr
    assert float(match.group(1)) <= 1.5


def test_unit_essentials() -> None:
    text = UNIT.read_text()
    for line in ("Type=notify", "WatchdogSec=", "Restart=on-failure",
                 "RestartPreventExitStatus=3", "TimeoutStopSec=45", "StateDirectory=edgeagent",
                 "ConfigurationDirectory=edgeagent",
                 "LoadCredential=mqtt_password:", "CapabilityBoundingSet=\n",
                 "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
                 "SystemCallFilter=@system-service", "ProtectSystem=strict"):
        assert line in text, line
    assert "ProcSubset=pid" not in text.replace("# ", "").split("Not used")[0]


def _unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A unit file as systemd reads it: sections of (key, value), keys may repeat."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
        else:
            key, _, value = line.partition("=")
            current.append((key.strip(), value.strip()))
    return sections


def _values(section: list[tuple[str, str]], key: str) -> list[str]:
    return [value for k, value in section if k == key]


#: Where each kind of directory a service may ask systemd for lives (systemd.exec(5)).
_MANAGED_DIRECTORIES = {"RuntimeDirectory": "/run", "StateDirectory": "/var/lib",
                        "CacheDirectory": "/var/cache", "LogsDirectory": "/var/log",
                        "ConfigurationDirectory": "/etc"}


def test_socket_modes_survive_the_service() -> None:
    """The socket unit creates the socket's directory and the socket; nothing in the service
    re-owns them (RuntimeDirectory= chowns its whole tree to the service's user, systemd
    issue 8635), so members of edgeagent-clients reach the socket."""
    sock = _unit(SOCKET_UNIT)["Socket"]
    listen = Path(_values(sock, "ListenStream")[0])
    assert _values(sock, "SocketUser") == ["edgeagent"]
    assert _values(sock, "SocketGroup") == ["edgeagent-clients"]
    assert _values(sock, "SocketMode") == ["0660"]
    # systemd creates the missing directory as root with DirectoryMode=; the clients'
    # group is not its group, so "other" must be able to traverse it, and only root writes.
    directory_mode = int(_values(sock, "DirectoryMode")[0], 8)
    assert directory_mode & 0o001, "the clients cannot traverse the socket's directory"
    assert not directory_mode & 0o022, "someone but root could replace the socket"

    service = _unit(UNIT)["Service"]
    for key, base in _MANAGED_DIRECTORIES.items():
        for value in _values(service, key):
            for name in value.split():
                managed = Path(base) / name.split(":")[0]
                assert not listen.is_relative_to(managed), f"{key}={value} re-owns {listen}"
    for key, value in service:
        assert "chown" not in value and str(listen.parent) not in value, f"{key}={value}"
    # the daemon's default socket path is the one the socket unit listens on
    assert listen == settings_module.SYSTEM_SOCKET


def test_default_socket_is_the_system_one_when_it_exists(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under the service (no $XDG_RUNTIME_DIR, no RuntimeDirectory=), and for `edgeagent ask`
    or `doctor` run by any user, the default socket is the socket unit's."""
    system = tmp_path / "system" / "api.sock"
    monkeypatch.setattr(settings_module, "SYSTEM_SOCKET", system)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    assert Settings().socket.path == tmp_path / "xdg" / "edgeagent" / "api.sock"
    system.parent.mkdir()
    system.touch()
    assert Settings().socket.path == system


def test_fd_budget() -> None:
    """Connections over limits.max_connections still take a descriptor until they are
    answered 503 or time out: the unit leaves room for many more than the limit."""
    limit_nofile = int(_values(_unit(UNIT)["Service"], "LimitNOFILE")[0])
    assert LimitsSettings().max_connections * 16 <= limit_nofile


def _install(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(REPO / "scripts" / "install.sh"), *args],
                          capture_output=True, text=True, timeout=300)


def test_install_into_a_staging_tree(tmp_path: Path, default_model: Path) -> None:
    root = tmp_path / "root"
    res = _install("--root", str(root), "--no-venv", "--model", str(default_model))
    assert res.returncode == 0, res.stderr
    for rel in ("etc/systemd/system/edgeagent.service", "etc/systemd/system/edgeagent.socket",
                "etc/edgeagent/edgeagent.toml", "etc/edgeagent/credentials/mqtt_password",
                "opt/edgeagent/README.md",
                "var/lib/edgeagent/models/smollm2-135m-instruct-int4/genai_config.json",
                "var/lib/edgeagent/models/smollm2-135m-instruct-int4/edgeagent-manifest.json"):
        assert (root / rel).exists(), rel
    assert (root / "etc/edgeagent/credentials").stat().st_mode & 0o777 == 0o700
    assert "(would run) systemctl enable --now edgeagent.socket edgeagent.service" in res.stdout

    # idempotent, and an edited configuration is kept
    config = root / "etc/edgeagent/edgeagent.toml"
    config.write_text(config.read_text() + '\ndevice_id = "gw-7"\n')
    again = _install("--root", str(root), "--no-venv")
    assert again.returncode == 0, again.stderr
    assert 'device_id = "gw-7"' in config.read_text()
    assert (root / "etc/edgeagent/edgeagent.toml.new").exists()

    gone = _install("--root", str(root), "--uninstall")
    assert gone.returncode == 0, gone.stderr
    assert not (root / "etc/systemd/system/edgeagent.service").exists()
    assert not (root / "opt/edgeagent").exists()
    assert config.exists() and (root / "var/lib/edgeagent/models").exists()

    purged = _install("--root", str(root), "--uninstall", "--purge")
    assert purged.returncode == 0, purged.stderr
    assert not (root / "etc/edgeagent").exists()
    assert not (root / "var/lib/edgeagent").exists()


def test_install_with_a_venv(tmp_path: Path) -> None:
    """The real package install into the staging tree's venv (no conversion extra)."""
    root = tmp_path / "root"
    res = _install("--root", str(root))
    assert res.returncode == 0, res.stderr
    edgeagent = root / "opt/edgeagent/venv/bin/edgeagent"
    assert subprocess.run([str(edgeagent), "--version"], capture_output=True,
                          timeout=60).returncode == 0
    torch = subprocess.run([str(root / "opt/edgeagent/venv/bin/python"), "-c", "import torch"],
                           capture_output=True, timeout=60)
    assert torch.returncode != 0, "the gateway install has no conversion dependencies"


def _doctor(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgeagent", "doctor", "--config", str(config)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def _config(tmp_path: Path, model: Path, extra: str = "") -> Path:
    cfg = tmp_path / "doctor.toml"
    cfg.write_text(f'state_dir = "{tmp_path / "state"}"\n{extra}\n[model]\npath = "{model}"\n'
                   f'[socket]\npath = "{tmp_path / "api.sock"}"\n')
    return cfg


@pytest.mark.model
def test_doctor_on_a_good_setup(tmp_path: Path, default_model: Path) -> None:
    res = _doctor(_config(tmp_path, default_model))
    assert res.returncode == 0, res.stdout
    assert "FAIL" not in res.stdout
    assert "every file matches its sha256" in res.stdout


@pytest.mark.model
def test_doctor_on_broken_setups(tmp_path: Path, default_model: Path) -> None:
    res = _doctor(_config(tmp_path, tmp_path / "no-model"))
    assert res.returncode == 1
    assert re.search(r"FAIL\s+model", res.stdout)
    assert "edgeagent model build" in res.stdout

    copy = tmp_path / "model"
    shutil.copytree(default_model, copy)
    data = copy / "model.onnx.data"
    with data.open("r+b") as fh:
        fh.seek(1000)
        byte = fh.read(1)
        fh.seek(1000)
        fh.write(bytes([byte[0] ^ 1]))
    res = _doctor(_config(tmp_path, copy))
    assert res.returncode == 1
    assert "model.onnx.data" in res.stdout

    bad = tmp_path / "bad.toml"
    bad.write_text("[runtime]\nthreads = \"many\"\n")
    res = _doctor(bad)
    assert res.returncode == 1
    assert "runtime.threads" in res.stdout

    port = free_port()  # nothing listens there
    res = _doctor(_config(tmp_path, default_model, f'[mqtt]\nurl = "mqtt://127.0.0.1:{port}"'))
    assert res.returncode == 1
    assert re.search(r"FAIL\s+mqtt\s+broker 127\.0\.0\.1:\d+ unreachable", res.stdout)


@pytest.mark.broker
def test_doctor_checks_broker_credentials(tmp_path: Path, default_model: Path) -> None:
    broker = password_broker(tmp_path / "auth", "gw", "right")
    try:
        secret = tmp_path / "secret"
        for password, ok in (("wrong", False), ("right", True)):
            secret.write_text(password + "\n")
            res = _doctor(_config(tmp_path, default_model, (
                f'[mqtt]\nurl = "{broker.url}"\nusername = "gw"\n'
                f'password_file = "{secret}"')))
            if ok:
                assert res.returncode == 0, res.stdout
                assert "accepted our credentials" in res.stdout
            else:
                assert res.returncode == 1
                assert re.search(r"refused us: (Not authorized|Bad user name or password)",
                                 res.stdout), res.stdout
    finally:
        broker.stop()
