"""``edgeagent run`` as a real subprocess: its own config, state, socket and log, ready when
a real sd_notify datagram socket (as systemd has) gets READY=1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

import edgeagent

#: The source tree the daemon runs from (its working directory, as under ./scripts/run.sh).
SOURCE_ROOT = Path(edgeagent.__file__).resolve().parent.parent


def uds_client(path: Path, timeout: float = 120.0) -> httpx.Client:
    """An httpx client of the daemon's Unix socket (``http://localhost`` as the base)."""
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(path)),
                        base_url="http://localhost", timeout=timeout)


class NotifyListener:
    """A real sd_notify datagram socket, as systemd has."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def wait_for(self, field_: str, timeout: float = 120.0,
                 proc: subprocess.Popen[str] | None = None) -> str:
        """Block until a datagram carrying ``field_`` (e.g. READY=1) arrives; with ``proc``,
        give up as soon as that process has exited (it will send nothing more)."""
        deadline = time.monotonic() + timeout
        for msg in self.messages:
            if field_ in msg.split("\n"):
                return msg
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {field_} within {timeout}s; got {self.messages}")
            if proc is not None and proc.poll() is not None:
                raise ProcessLookupError(f"the daemon exited with {proc.returncode} before "
                                         f"{field_}; got {self.messages}")
            # Wake up each second to notice a process that died without a word.
            self.sock.settimeout(min(left, 1.0) if proc is not None else left)
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            self.messages.append(data)
            if field_ in data.split("\n"):
                return data

    def close(self) -> None:
        self.sock.close()


@dataclass
class DaemonProc:
    proc: subprocess.Popen[str]
    config: Path
    socket_path: Path
    notify: NotifyListener
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    device_id: str = "test-d"
    #: time.perf_counter() at launch, and the seconds from launch to READY=1 once seen.
    started: float = field(default_factory=time.perf_counter)
    ready_s: float | None = None

    def wait_ready(self, timeout: float = 120.0) -> None:
        try:
            self.notify.wait_for("READY=1", timeout, self.proc)
        except (TimeoutError, OSError) as exc:
            raise AssertionError(f"daemon not ready: {exc}\n{self.logs()}") from exc
        if self.ready_s is None:
            self.ready_s = time.perf_counter() - self.started

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def client(self, timeout: float = 120.0) -> httpx.Client:
        return uds_client(self.socket_path, timeout)

    def status_mb(self, key: str) -> float:
        """A size from /proc/PID/status (VmRSS, VmHWM, ...) in MB."""
        with open(f"/proc/{self.proc.pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def rss_mb(self) -> float:
        return self.status_mb("VmRSS")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


def launch_daemon(workdir: Path, sockdir: Path, model: Path, extra_toml: str = "",
                  env: dict[str, str] | None = None, name: str = "d",
                  socket_toml: str = "", log_level: str = "debug",
                  device_id: str | None = None) -> DaemonProc:
    """Start ``edgeagent run`` as a real subprocess with its own config, state and socket
    (in ``sockdir``: Unix socket paths are limited to about 100 bytes)."""
    sock = sockdir / f"{name}.sock"
    cfg = workdir / f"{name}.toml"
    device = device_id or f"test-{name}"
    cfg.write_text(
        f'state_dir = "{workdir / (name + "-state")}"\n'
        f'device_id = "{device}"\n'
        f"{extra_toml}\n"
        f'[model]\npath = "{model}"\n'
        f'[socket]\npath = "{sock}"\n{socket_toml}\n'
        f'[log]\nformat = "json"\nlevel = "{log_level}"\n'
    )
    notify = NotifyListener(sockdir / f"{name}-{uuid.uuid4().hex[:6]}.notify")
    log_path = workdir / f"{name}.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEAGENT_")}
    full_env.update({"NOTIFY_SOCKET": str(notify.path), "PYTHONUNBUFFERED": "1"})
    full_env.update(env or {})
    started = time.perf_counter()
    with log_path.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgeagent", "run", "--config", str(cfg)],
            stdout=out, stderr=subprocess.STDOUT, env=full_env, text=True, cwd=SOURCE_ROOT,
        )
    return DaemonProc(proc, cfg, sock, notify, log_path, full_env, device, started)


def reap(d: DaemonProc) -> None:
    """Kill the daemon if it still runs, and close its notify socket."""
    if d.proc.poll() is None:
        d.proc.kill()
        d.proc.wait(timeout=30)
    d.notify.close()


def exit_on_sigterm() -> None:
    """Make SIGTERM (a CI timeout, ``kill``) unwind like ^C: ``sys.exit(128 + SIGTERM)``
    from the main thread, so ``finally`` blocks and context managers run on the way out and
    the daemons a script started (``running_daemon``) are stopped, not left behind. For a
    script's ``main``; the exit status is the shell's for a death by that signal."""
    signal.signal(signal.SIGTERM, lambda sig, _frame: sys.exit(128 + sig))


@contextmanager
def running_daemon(workdir: Path, model: Path, extra_toml: str = "", name: str = "d",
                   device_id: str | None = None, log_level: str = "warning",
                   timeout: float = 180.0) -> Iterator[DaemonProc]:
    """A ready daemon for a script (bench, soak) with everything in ``workdir`` (keep it
    short: the sockets are there too), stopped with SIGTERM and reaped at the end. It logs
    warnings only: a debug line per token would weigh on what a script measures."""
    d = launch_daemon(workdir, workdir, model, extra_toml, name=name, log_level=log_level,
                      device_id=device_id)
    try:
        d.wait_ready(timeout)
        yield d
    finally:
        try:
            d.stop()
        finally:
            reap(d)
