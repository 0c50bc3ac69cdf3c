"""HTTP limits of the local socket: head size (431), idle connections, connection count
(503), chunked bodies (413). Real sockets, curl and the daemon as a subprocess."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DaemonProc

pytestmark = pytest.mark.model

WAIT_S = 30.0  # a bound on every wait below, never a delay


def _connect(d: DaemonProc) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(WAIT_S)
    sock.connect(str(d.socket_path))
    return sock


def _read_response(sock: socket.socket) -> tuple[int, bytes]:
    """Status and body of one response (Content-Length framed), as far as it arrives."""
    data = b""
    with contextlib.suppress(ConnectionResetError):  # a closed peer with unread input
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    assert data.startswith(b"HTTP/1.1 "), data[:200]
    return int(data.split(b" ", 2)[1]), body


def _wait_eof(sock: socket.socket) -> bytes:
    """Everything the daemon sends until it closes the connection (bounded by WAIT_S)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _vm_hwm_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def _curl(d: DaemonProc, *args: str) -> tuple[int, str]:
    res = subprocess.run(["curl", "-s", "-o", "-", "-w", "\n%{http_code}", "--unix-socket",
                          str(d.socket_path), *args], capture_output=True, text=True,
                         timeout=WAIT_S)
    body, _, code = res.stdout.rpartition("\n")
    return int(code), body


def test_oversized_head_is_431_before_it_is_buffered(start_daemon: Any) -> None:
    d: DaemonProc = start_daemon(extra_toml="[limits]\nmax_header_bytes = 8192\n")
    d.wait_ready()
    with _connect(d) as ok:  # a head under the cap is served
        ok.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Fill: " + b"a" * 6000 + b"\r\n\r\n")
        assert _read_response(ok)[0] == 200
    # The peak RSS from here on: 8 MB of header must not show up in it.
    Path(f"/proc/{d.proc.pid}/clear_refs").write_text("5")
    before = _vm_hwm_kb(d.proc.pid)
    with _connect(d) as big:
        big.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for _ in range(128):  # 8 MB, until the daemon hangs up
                big.sendall(b"a" * 65536)
            big.sendall(b"\r\n\r\n")
        status, body = _read_response(big)
    grown_kb = _vm_hwm_kb(d.proc.pid) - before
    assert grown_kb < 4096, f"peak RSS grew by {grown_kb} kB"
    assert status == 431
    assert json.loads(body)["error"]["code"] == "headers_too_large"
    assert _curl(d, "http://localhost/health")[0] == 200  # the daemon is still up


def test_chunked_body_over_the_limit_is_413(start_daemon: Any, tmp_path: Path) -> None:
    d: DaemonProc = start_daemon(extra_toml="[limits]\nmax_body_bytes = 4096\n")
    d.wait_ready()
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"messages": [{"role": "user", "content": "x" * 20000}]}))
    code, body = _curl(d, "-H", "Content-Type: application/json", "-H",
                       "Transfer-Encoding: chunked", "--data-binary", f"@{big}",
                       "http://localhost/v1/chat/completions")
    assert code == 413, body
    assert json.loads(body)["error"]["code"] == "body_too_large"


def test_idle_and_slow_connections_are_closed(start_daemon: Any) -> None:
    d: DaemonProc = start_daemon(socket_toml="idle_timeout_s = 1\n")
    d.wait_ready()
    with _connect(d) as silent, _connect(d) as slow, _connect(d) as kept:
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # a head that never ends
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_response(kept)[0] == 200
        assert _wait_eof(silent) == b""
        assert _wait_eof(slow) == b""
        assert _wait_eof(kept) == b""  # keep-alive ends after the same idle time


@contextlib.contextmanager
def _held(d: DaemonProc, count: int) -> Iterator[list[socket.socket]]:
    """``count`` keep-alive connections, each served once and then left open."""
    socks = [_connect(d) for _ in range(count)]
    try:
        for sock in socks:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _read_response(sock)[0] == 200
        yield socks
    finally:
        for sock in socks:
            sock.close()


def test_connections_over_the_limit_get_503(start_daemon: Any) -> None:
    d: DaemonProc = start_daemon(extra_toml="[limits]\nmax_connections = 2\n",
                                 socket_toml="idle_timeout_s = 600\n")
    d.wait_ready()
    with _held(d, 2):
        code, _ = _curl(d, "http://localhost/health")
        assert code == 503
    # Once they are gone, a normal client is served again (the daemon sees the closes a
    # moment later: poll, bounded).
    deadline = time.monotonic() + WAIT_S
    while (code := _curl(d, "http://localhost/health")[0]) != 200:
        assert code == 503
        assert time.monotonic() < deadline, "never served again"
