"""``edgeagent doctor``: check a gateway's setup and say what to fix."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeagent.settings import existing_ancestor

OK, WARN, FAIL = "OK", "WARN", "FAIL"


@dataclass
class Result:
    status: str
    check: str
    detail: str
    fix: str = ""


def _config(config_path: Path | None) -> tuple[Result, Any]:
    from edgeagent.settings import ConfigError, load_settings

    try:
        settings = load_settings(config_path)
    except ConfigError as exc:
        errors = "; ".join(f"{p}: {m}" for p, m in exc.errors)
        return Result(FAIL, "configuration", f"{exc.source}: {errors}",
                      "correct the file ('edgeagent config validate FILE' lists every "
                      "error)"), None
    return Result(OK, "configuration", str(config_path or "defaults")), settings


def _model(settings: Any) -> list[Result]:
    from edgeagent.manifest import ModelIntegrityError, verify_model
    from edgeagent.planner import ModelMeta, PlanError, plan
    from edgeagent.probe import probe

    path = settings.model_path
    if not (path / "genai_config.json").exists():
        return [Result(FAIL, "model", f"{path} is not an onnxruntime-genai model folder",
                       "build it with 'edgeagent model build' or set model.path")]
    out = []
    try:
        manifest = verify_model(path)
    except ModelIntegrityError as exc:
        return [Result(FAIL, "model", str(exc), "rebuild or copy the model again")]
    if manifest is None:
        out.append(Result(WARN, "model", f"{path} has no manifest: loaded unverified"))
    else:
        out.append(Result(OK, "model", f"{path}: every file matches its sha256"))
    try:
        the_plan = plan(probe(settings.runtime.probe_root), ModelMeta.from_folder(path),
                        settings.runtime, settings.limits)
    except PlanError as exc:
        out.append(Result(FAIL, "memory plan", str(exc),
                          "lower runtime.context_length or runtime.max_batch, or free memory"))
    else:
        out.append(Result(OK, "memory plan", the_plan.summary()))
    return out


def _socket(settings: Any) -> Result:
    path: Path = settings.socket.path
    parent = existing_ancestor(path.parent)
    if path.exists():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
            return Result(OK, "socket", f"a daemon is listening on {path}")
        except OSError:
            pass
        finally:
            probe.close()
    if not os.access(parent, os.W_OK):
        return Result(FAIL, "socket", f"{parent} is not writable by this user",
                      f"run as the daemon's user, or set socket.path (now {path})")
    return Result(OK, "socket", f"{path} can be created")


def _state_dir(settings: Any) -> Result:
    path: Path = settings.state_dir
    probe = existing_ancestor(path)
    if not os.access(probe, os.W_OK):
        return Result(FAIL, "state directory", f"{probe} is not writable",
                      "fix its owner, or set state_dir")
    free = shutil.disk_usage(probe).free
    return Result(OK if free > 256 * 2**20 else WARN, "state directory",
                  f"{path}: {free // 2**20} MB free")


def _broker(settings: Any, timeout: float = 5.0) -> Result | None:
    if settings.mqtt.url is None:
        return None
    from edgeagent.bus import broker_address, make_client

    try:
        host, port = broker_address(settings.mqtt)
        client = make_client(settings, client_id=f"{settings.device_id}-doctor")
    except (ValueError, OSError) as exc:
        return Result(FAIL, "mqtt", str(exc), "check mqtt.url and the TLS files")
    answer: dict[str, str] = {}
    done = threading.Event()

    def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        answer["reason"] = str(reason)
        answer["failed"] = "yes" if reason.is_failure else ""
        done.set()

    client.on_connect = on_connect
    try:
        client.connect(host, port, 10)
    except OSError as exc:
        return Result(FAIL, "mqtt", f"broker {host}:{port} unreachable: {exc}",
                      "check mqtt.url, the network and the broker")
    client.loop_start()
    try:
        if not done.wait(timeout):
            return Result(FAIL, "mqtt", f"broker {host}:{port} did not answer in {timeout}s")
    finally:
        client.disconnect()
        client.loop_stop()
    if answer["failed"]:
        return Result(FAIL, "mqtt", f"broker {host}:{port} refused us: {answer['reason']}",
                      "check mqtt.username and the password (mqtt.password_file or the "
                      "mqtt_password credential)")
    return Result(OK, "mqtt", f"broker {host}:{port} accepted our credentials")


def _clock() -> Result:
    year = time.gmtime().tm_year
    if year < 2024:
        return Result(FAIL, "clock", f"the clock says {year}", "set the time (NTP): TLS "
                      "certificates and telemetry timestamps depend on it")
    if shutil.which("timedatectl"):
        res = subprocess.run(["timedatectl", "show", "-p", "NTPSynchronized", "--value"],
                             capture_output=True, text=True, timeout=10, check=False)
        if res.returncode == 0 and res.stdout.strip() == "no":
            return Result(WARN, "clock", "not synchronised by NTP",
                          "enable systemd-timesyncd or chrony")
    return Result(OK, "clock", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def _providers() -> Result:
    import onnxruntime

    providers = onnxruntime.get_available_providers()
    if "CPUExecutionProvider" not in providers:
        return Result(FAIL, "onnxruntime", f"no CPU provider in {providers}",
                      "reinstall onnxruntime")
    return Result(OK, "onnxruntime", f"{onnxruntime.__version__}: {', '.join(providers)}")


def run_doctor(config_path: Path | None, out: Callable[[str], None] = print) -> int:
    """Print every check as OK/WARN/FAIL; exit 1 when anything failed."""
    first, settings = _config(config_path)
    results = [first]
    if settings is not None:
        results += _model(settings)
        results += [_socket(settings), _state_dir(settings)]
        broker = _broker(settings)
        if broker is not None:
            results.append(broker)
    results += [_clock(), _providers()]
    for r in results:
        out(f"{r.status:4}  {r.check:16} {r.detail}")
    failed = [r for r in results if r.status == FAIL]
    if failed:
        out("\nTo fix:")
        for r in failed:
            out(f"- {r.check}: {r.fix or r.detail}")
        return 1
    return 0
