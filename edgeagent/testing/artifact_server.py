"""A local HTTP server for model artifacts, with Range support and faults on demand.

Serves one file from ``http.server`` on 127.0.0.1 in a thread. It counts the body bytes it
sends (to tell a resumed download from a restarted one) and can drop the connection after
N body bytes, ignore Range requests, or leave out Content-Length. Shared by the tests and
the rollout measurement.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_RANGE = re.compile(r"bytes=(\d+)-$")
_CHUNK = 64 * 1024


@dataclass
class ArtifactServer:
    """What to serve and how; ``sent`` and ``ranges`` record what happened."""

    path: Path
    drop_after: int | None = None  # close the connection after this many body bytes, once
    ignore_range: bool = False  # answer a Range request with 200 and the whole file
    send_length: bool = True  # False: no Content-Length, the body ends with the connection
    sent: int = 0
    ranges: list[str | None] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def _count(self, n: int) -> None:
        with self.lock:
            self.sent += n


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        spec = self.server.spec
        if self.path != f"/{spec.path.name}":
            self.send_error(404)
            return
        data_size = spec.path.stat().st_size
        header = self.headers.get("Range")
        spec.ranges.append(header)
        match = _RANGE.match(header or "")
        start = int(match.group(1)) if match and not spec.ignore_range else 0
        if start >= data_size > 0:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{data_size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if start:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{data_size - 1}/{data_size}")
        else:
            self.send_response(200)
        if spec.send_length:
            self.send_header("Content-Length", str(data_size - start))
        else:
            self.close_connection = True
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self._body(start)

    def _body(self, start: int) -> None:
        spec = self.server.spec
        with spec.path.open("rb") as fh:
            fh.seek(start)
            while chunk := fh.read(_CHUNK):
                if spec.drop_after is not None and spec.sent + len(chunk) >= spec.drop_after:
                    chunk = chunk[: max(0, spec.drop_after - spec.sent)]
                    spec.drop_after = None  # once: the next request is served whole
                    self.wfile.write(chunk)
                    spec._count(len(chunk))
                    self.close_connection = True
                    return
                self.wfile.write(chunk)
                spec._count(len(chunk))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    spec: ArtifactServer


@contextmanager
def serve_artifact(path: Path, *, drop_after: int | None = None, ignore_range: bool = False,
                   send_length: bool = True) -> Iterator[ArtifactServer]:
    """Serve ``path`` at ``spec.url`` until the block ends, with the faults asked for."""
    spec = ArtifactServer(path, drop_after=drop_after, ignore_range=ignore_range,
                          send_length=send_length)
    server = _Server(("127.0.0.1", 0), _Handler)
    server.spec = spec
    spec.url = f"http://127.0.0.1:{server.server_address[1]}/{path.name}"
    thread = threading.Thread(target=server.serve_forever, name="artifact-server", daemon=True)
    thread.start()
    try:
        yield spec
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
