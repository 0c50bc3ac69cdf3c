"""The local HTTP API: OpenAI-compatible, over a Unix socket (and optionally loopback TCP).

FastAPI on uvicorn serves the socket; the daemon, not uvicorn, owns the signals. The
socket is bound before the model loads (or inherited from systemd socket activation), so
clients connect at once and ``/health`` says 503 until the model is ready.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import grp
import json
import os
import socket
import stat
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import structlog
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from edgeagent import __version__, protocol
from edgeagent.engine import Finish
from edgeagent.scheduler import AdmissionError, Item, Job, JobError
from edgeagent.serving import ServingClient
from edgeagent.settings import Settings

#: The daemon's /health document, and its /metrics body with its content type.
Health = Callable[[], dict[str, Any]]
Metrics = Callable[[], tuple[bytes, str]]

log = structlog.get_logger(__name__)

SD_LISTEN_FDS_START = 3


class StartupSocketError(Exception):
    pass


# ------------------------------------------------------------------ sockets
def inherited_sockets() -> list[socket.socket]:
    """Sockets passed by systemd socket activation (``LISTEN_FDS``), if they are ours."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = int(os.environ.get("LISTEN_FDS", "0") or 0)
    socks = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)
        socks.append(socket.socket(fileno=fd))
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)
    return socks


def bind_unix(path: Path, mode: int, group: str | None) -> socket.socket:
    """Bind the API socket: replace a stale socket file, refuse a live one or a non-socket."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise StartupSocketError(f"{path} exists and is not a socket; refusing to replace")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale: nobody listens
            log.info("replaced a stale socket file", path=str(path))
        else:
            raise StartupSocketError(f"another daemon already listens on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~mode)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, mode)
    if group is not None:
        try:
            os.chown(path, -1, grp.getgrnam(group).gr_gid)
        except (KeyError, PermissionError) as exc:
            sock.close()
            path.unlink()
            raise StartupSocketError(f"cannot give {path} to group {group!r}: {exc}") from exc
    sock.listen(128)
    return sock


def bind_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


# ------------------------------------------------------------------ connection guards
class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the two guards it lacks.

    httptools buffers a request head of any size, and uvicorn times a connection out only
    between requests, so a client that sends a huge header, or connects and never finishes a
    request head, holds memory or a file descriptor for as long as it likes. Here a head
    larger than ``config.h11_max_incomplete_event_size`` (uvicorn's head cap for its h11
    parser, with the same meaning) gets 431 before more of it is read, and a connection
    without a complete head ``config.timeout_keep_alive`` seconds after it opened or after
    its last response is closed.
    """

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_seen: int | None = 0  # bytes of the head being read; None: in a request
        self._head_timer: asyncio.TimerHandle | None = None
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        cap = self.config.h11_max_incomplete_event_size or 0
        # A head is fed at most one byte past the cap: one that has not ended by then is
        # refused before httptools buffers more of it.
        while data and self._head_seen is not None:
            room = cap + 1 - self._head_seen
            chunk, data = data[:room], data[room:]
            self._head_seen += len(chunk)
            super().data_received(chunk)
            if self.transport.is_closing():
                return
            if self._head_seen is not None and self._head_seen > cap:
                self._refuse_head(cap)
                return
        if data:
            super().data_received(data)

    def on_headers_complete(self) -> None:
        self._head_seen = None
        self._stop_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._head_seen = 0  # what follows is the next request's head

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Not when a pipelined request, whose head is complete, has just been started.
        if not self.transport.is_closing() and self.cycle.response_complete:
            self._await_head()

    def _await_head(self) -> None:
        self._stop_head_timer()
        self._head_timer = self.loop.call_later(self.timeout_keep_alive,
                                                self.timeout_keep_alive_handler)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _refuse_head(self, cap: int) -> None:
        log.warning("refused a request head over limits.max_header_bytes", limit=cap)
        if self.cycle is None or self.cycle.response_complete:  # never inside a response
            body = json.dumps(protocol.error_body(
                f"request head larger than {cap} bytes (limits.max_header_bytes)",
                code="headers_too_large")).encode()
            self.transport.write(
                b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                b"content-type: application/json\r\nconnection: close\r\n"
                b"content-length: %d\r\n\r\n%b" % (len(body), body))
        self.transport.close()


class BodyLimit:
    """413 for a body larger than the limit, declared or chunked.

    The body is read here, bounded by the limit, before the app sees it: FastAPI turns an
    error raised while it reads a body into a 400.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await self._too_large(send)
                return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                break
            body += message.get("body", b"")
            if len(body) > self.limit:
                await self._too_large(send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # then http.disconnect, which handlers wait on
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, send: Send) -> None:
        body = json.dumps(protocol.error_body(
            f"request body larger than {self.limit} bytes", code="body_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


# ------------------------------------------------------------------ app
def _err(status: int, message: str, code: str | None = None,
         param: str | None = None) -> JSONResponse:
    return JSONResponse(protocol.error_body(message, protocol.error_type(status), code, param),
                        status_code=status)


def _job_error(err: JobError | AdmissionError) -> JSONResponse:
    retry_after = err.retry_after if isinstance(err, AdmissionError) else None
    return JSONResponse(protocol.job_error_body(err), status_code=err.status,
                        headers={"Retry-After": str(retry_after)} if retry_after else None)


def create_app(serving: ServingClient, health: Health, metrics: Metrics,
               created: int) -> FastAPI:
    """The API over ``serving``; ``health`` and ``metrics`` render the daemon's figures,
    ``created`` (Unix time) dates the model list."""
    app = FastAPI(title="edgeagent", version=__version__,
                  description="OpenAI-compatible API of an edgeagent gateway daemon.")

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = protocol.validation_message(exc.errors())
        return _err(400, message, "invalid_request", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _err(exc.status_code, str(exc.detail))

    @app.exception_handler(AdmissionError)
    async def _admission(_: Request, exc: AdmissionError) -> JSONResponse:
        return _job_error(exc)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in a request")
        return _err(500, "internal error", "internal_error")

    @app.get("/health")
    async def health_() -> JSONResponse:
        return JSONResponse(health(), status_code=200 if serving.ready else 503)

    @app.get("/metrics")
    async def metrics_() -> Response:
        body, content_type = metrics()
        return Response(body, media_type=content_type)

    def model(mid: str) -> dict[str, Any]:
        return {"id": mid, "object": "model", "created": created, "owned_by": "edgeagent"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model(mid) for mid in serving.model_ids()]}

    @app.get("/v1/models/{model_id:path}", response_model=None)
    async def model_(model_id: str) -> dict[str, Any] | JSONResponse:
        if model_id not in serving.model_ids():
            return _err(404, f"unknown model {model_id!r}; available: "
                        f"{', '.join(serving.model_ids())}", "model_not_found", "model")
        return model(model_id)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(
        body: protocol.ChatCompletionRequest, request: Request
    ) -> Response:
        prepared = serving.prepare_chat(body)
        return await _serve(serving, request, prepared, chat=True, stream=body.stream)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: protocol.CompletionRequest, request: Request) -> Response:
        prepared = serving.prepare_completion(body)
        return await _serve(serving, request, prepared, chat=False, stream=body.stream)

    return app


class _Bridge:
    """Carries scheduler items (from its thread) into this request's event loop.

    Items gather in a deque; the loop is woken once per batch, not once per token, and the
    consumer takes everything that has arrived in one go.
    """

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._items: collections.deque[Item] = collections.deque()
        self._ready = asyncio.Event()
        self._lock = threading.Lock()
        self._wake_pending = False

    def sink(self, item: Item) -> None:  # the scheduler's thread
        with self._lock:
            self._items.append(item)
            if self._wake_pending:
                return
            self._wake_pending = True
        self.loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        with self._lock:
            self._wake_pending = False
        self._ready.set()

    async def take(self) -> list[Item]:
        """Everything that has arrived, waiting for at least one item."""
        while True:
            with self._lock:
                if self._items:
                    items = list(self._items)
                    self._items.clear()
                    return items
                self._ready.clear()
            await self._ready.wait()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _serve(serving: ServingClient, request: Request, prepared: protocol.Prepared, *,
                 chat: bool, stream: bool) -> Response:
    bridge = _Bridge()
    job = protocol.to_job(prepared, bridge.sink, "http")
    serving.submit(job)  # AdmissionError -> its status via the handler
    if stream:
        return StreamingResponse(_sse(serving, job, bridge, prepared, chat),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    choices = protocol.Choices(prepared)
    try:
        while True:
            getter = asyncio.ensure_future(bridge.take())
            done, _ = await asyncio.wait({getter, watcher},
                                         return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                serving.cancel(job)  # the client went away
                return Response(status_code=499)
            for item in getter.result():
                if isinstance(item, JobError):
                    return _job_error(item)
                choices.add(item)
                if choices.done:
                    doc = protocol.answer(prepared, choices, chat)
                    return _job_error(doc) if isinstance(doc, JobError) else JSONResponse(doc)
    finally:
        watcher.cancel()


def _sse_line(doc: dict[str, Any]) -> str:
    return f"data: {json.dumps(doc, separators=(',', ':'))}\n\n"


async def _sse(serving: ServingClient, job: Job, bridge: _Bridge,
               prepared: protocol.Prepared, chat: bool) -> AsyncIterator[str]:
    """Server-sent events; a client that goes away cancels the job (the finally below)."""
    finished = False
    choices = protocol.Choices(prepared)
    try:
        for doc in protocol.first_chunks(prepared, chat):
            yield _sse_line(doc)
        while True:
            # What arrived together goes out as one event per choice.
            for item in protocol.coalesce(await bridge.take()):
                if isinstance(item, JobError):
                    finished = True
                    yield _sse_line(protocol.job_error_body(item))
                    yield "data: [DONE]\n\n"
                    return
                if isinstance(item, Finish):
                    held = choices.rows[item.index].parts  # a tool envelope, whole
                    for doc in protocol.final_chunks(prepared, item, held, chat, choices):
                        yield _sse_line(doc)
                elif prepared.tool_mode:  # parsed whole at the end, sent as one delta
                    choices.add(item)
                elif item.text or item.logprobs:
                    yield _sse_line(protocol.stream_delta(prepared, choices, item, chat))
                else:
                    choices.add(item)
            if choices.done:
                finished = True
                yield "data: [DONE]\n\n"
                return
    finally:
        if not finished:
            serving.cancel(job)


# ------------------------------------------------------------------ transport
class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the daemon owns the signals


class HttpTransport:
    """The API socket. Its settings (socket, HTTP limits) are read once, at start."""

    name = "http"

    def __init__(self, settings: Settings, serving: ServingClient, health: Health,
                 metrics: Metrics, created: int) -> None:
        self.settings = settings
        self.app = create_app(serving, health, metrics, created)
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._owned_path: Path | None = None

    def state(self) -> str:
        return "on"

    def counters(self) -> dict[str, int]:
        return {}

    def on_ready(self) -> None:
        """Nothing to do: requests that came while the model loaded already got 503."""

    async def start(self) -> None:
        settings = self.settings
        sockets = inherited_sockets()
        if sockets:
            log.info("using sockets from systemd socket activation", count=len(sockets))
        else:
            try:
                sockets.append(bind_unix(settings.socket.path, settings.socket.mode,
                                         settings.socket.group))
            except (StartupSocketError, OSError) as exc:
                raise StartupSocketError(f"socket {settings.socket.path}: {exc}") from exc
            self._owned_path = settings.socket.path
            if settings.socket.tcp_port is not None:
                sockets.append(bind_tcp(settings.socket.tcp_host, settings.socket.tcp_port))
        app = BodyLimit(self.app, settings.limits.max_body_bytes)
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=int(settings.drain_timeout_s) + 5,
                                server_header=False, http=GuardedHttpProtocol,
                                h11_max_incomplete_event_size=settings.limits.max_header_bytes,
                                timeout_keep_alive=settings.socket.idle_timeout_s,
                                # uvicorn counts the connection asking: N + 1 serves N.
                                limit_concurrency=settings.limits.max_connections + 1)
        self._server = _Server(config)
        self._task = asyncio.ensure_future(self._server.serve(sockets=sockets))
        # the addresses themselves: a socket handed over by systemd may not be socket.path
        log.info("listening", on=[str(s.getsockname()) for s in sockets])

    async def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.should_exit = True

    async def close(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout=10)
            except asyncio.TimeoutError:
                self._task.cancel()
        if self._owned_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self._owned_path.unlink()
