"""Fleet configuration pushes: desired -> validated -> persisted -> applied -> reported.

A push is ``{"version": N, "target": {"device": id} | {"group": name}, "settings": {...},
"signature": "..."}`` on ``{prefix}/{device}/config/desired`` or
``{prefix}/group/{group}/config/desired`` (retained). ``settings`` is a JSON merge patch over
the TOML configuration; the device layer wins over the group layer. A push is validated in
memory with the same settings models, checked against an allow-list, against the topic it
came on (its ``target``) and, when ``fleet.trusted_keys`` is set, an Ed25519 signature over
everything but the signature; a push that changes the plan is planned before anything
changes. It is then persisted atomically as the overlay in ``state_dir`` and applied; a
model that fails to load rolls back to the last good overlay. The outcome is reported,
retained, on ``{prefix}/{device}/config/reported``.

A push may also name a model artifact, ``"model": {"url", "sha256", "size", "name"}``: it is
delivered in the background (``rollout.deliver``, with ``downloading`` progress reports),
then planned, activated with a canary (the root's ``apply(settings, canary=True)``) and
applied like any other push; a restart resumes it.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import os
import shutil
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgeagent import bus, rollout
from edgeagent.artifact import ArtifactError
from edgeagent.manifest import fsync_dir, write_json_atomic
from edgeagent.publisher import Publisher
from edgeagent.settings import ConfigError, Settings, load_settings, merge_patch

log = structlog.get_logger(__name__)

#: What a push may set: a section (ending in ".": every key under it) or one dotted setting.
#: Never paths the daemon would create or write outside its state (socket, spool, state dir),
#: nor how it reaches the broker.
ALLOWED = (
    "telemetry.interval_s", "telemetry.buffer_max", "limits.", "profiles.", "log.level",
    "drain_timeout_s", "model.path",
    "runtime.threads", "runtime.context_length", "runtime.max_batch",
    "runtime.auto_context_cap", "runtime.auto_max_batch_cap", "runtime.batch_window_ms",
    "runtime.memory_headroom_mb",
)
LAYERS = ("group", "device")
#: Reports that end a push; "downloading" and "activating" say how a rollout is going.
OUTCOMES = ("applied", "rejected", "stale", "rolled_back")
#: Where a push arrived, as its ``target`` names it: ("device", device id) or ("group", name).
Target = tuple[str, str]
#: Deepest nesting a push may have: the deepest setting is profiles.<name>.<field>, three
#: levels under ``settings``. A deeper push is refused before anything walks it recursively.
MAX_DEPTH = 8


class PushError(Exception):
    """A push that is refused; ``errors`` are ``path: message`` lines, ``version`` the
    push's version when it has a usable one (echoed in the report)."""

    def __init__(self, errors: list[str], version: int | str | None = None) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors
        self.version = version


def canonical(doc: dict[str, Any]) -> bytes:
    """The bytes a signature covers: the push without its signature, canonical JSON."""
    body = {k: v for k, v in doc.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def sign(doc: dict[str, Any], key: Ed25519PrivateKey) -> str:
    return base64.b64encode(key.sign(canonical(doc))).decode()


def _leaves(patch: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in patch.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.extend(_leaves(value, path + "."))
        else:
            out.append(path)
    return out


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether JSON ``value`` nests objects and arrays more than ``limit`` levels (iterative:
    a hostile push must not exhaust the stack of whatever walks it)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(
            node, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


def _echo(version: Any) -> int | str | None:
    """The version to echo in a report: only what the operator can match and JSON can carry."""
    if isinstance(version, (int, str)) and not isinstance(version, bool):
        return version
    return None


def parse_push(payload: bytes, trusted: list[Path],
               arrived: Target) -> tuple[int, dict[str, Any]]:
    """(version, settings patch) of a push payload as it came off the wire on ``arrived``'s
    topic; else PushError."""
    version, patch, _ = _parse(payload, trusted, arrived)
    return version, patch


def _parse(payload: bytes, trusted: list[Path],
           arrived: Target) -> tuple[int, dict[str, Any], rollout.ModelRef | None]:
    """(version, settings patch, model artifact) of a push payload; else PushError."""
    try:
        doc = json.loads(payload.decode("utf-8"))
    except RecursionError:
        raise PushError([f"(push): nested deeper than {MAX_DEPTH} levels"]) from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise PushError([f"(push): not JSON: {exc}"]) from None
    return _check(doc, trusted, arrived)


def check_push(doc: Any, trusted: list[Path], arrived: Target) -> tuple[int, dict[str, Any]]:
    """(version, settings patch) of a well-formed, allowed, (signed) push meant for the topic
    it ``arrived`` on; else PushError."""
    version, patch, _ = _check(doc, trusted, arrived)
    return version, patch


def _check(doc: Any, trusted: list[Path],
           arrived: Target) -> tuple[int, dict[str, Any], rollout.ModelRef | None]:
    if not isinstance(doc, dict):
        raise PushError(["(push): must be a JSON object"])
    if _deeper_than(doc, MAX_DEPTH):
        raise PushError([f"(push): nested deeper than {MAX_DEPTH} levels"],
                        _echo(doc.get("version")))
    unknown = set(doc) - {"version", "target", "settings", "model", "signature"}
    errors = [f"{k}: unknown field" for k in sorted(unknown)]
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        errors.append("version: must be a non-negative integer")
    patch = doc.get("settings")
    if not isinstance(patch, dict):
        errors.append("settings: must be an object")
        patch = {}
    for path in _leaves(patch):
        if not any(path == a or (a.endswith(".") and path.startswith(a)) for a in ALLOWED):
            errors.append(f"settings.{path}: not settable by the fleet")
    ref = None
    if "model" in doc:  # an artifact to roll out; it names model.path itself
        try:
            ref = rollout.parse_ref(doc["model"])
        except ValueError as exc:
            errors.extend(str(exc).splitlines())
        if "path" in (patch.get("model") or {}):
            errors.append("settings.model.path: a push with a model artifact sets it")
    errors.extend(_target_errors(doc, arrived, required=bool(trusted)))
    if trusted:
        errors.extend(_signature_errors(doc, trusted))
    if errors:
        raise PushError(errors, _echo(version))
    assert isinstance(version, int)
    return version, patch, ref


def _target_errors(doc: dict[str, Any], arrived: Target, required: bool) -> list[str]:
    """Why ``doc`` is not meant for the topic it arrived on. The target is inside what the
    signature covers, so a push signed for one device (or for a group) cannot be replayed on
    another device's topic (or as a device layer)."""
    if "target" not in doc:  # unsigned pushes may omit it; a signed one must say
        return ["target: required (fleet.trusted_keys is set)"] if required else []
    target = doc["target"]
    if not (isinstance(target, dict) and len(target) == 1
            and all(k in LAYERS and isinstance(v, str) for k, v in target.items())):
        return ['target: must be {"device": "<device id>"} or {"group": "<group>"}']
    ((layer, name),) = target.items()
    if (layer, name) != arrived:
        return [f"target: this push is for {layer} {name!r}, but it arrived on the "
                f"{arrived[0]} topic of {arrived[1]!r}"]
    return []


def _signature_errors(doc: dict[str, Any], trusted: list[Path]) -> list[str]:
    signature = doc.get("signature")
    if not isinstance(signature, str):
        return ["signature: required (fleet.trusted_keys is set)"]
    try:
        raw = base64.b64decode(signature, validate=True)
    except ValueError:
        return ["signature: not base64"]
    for path in trusted:
        key = serialization.load_pem_public_key(path.read_bytes())
        if not isinstance(key, Ed25519PublicKey):
            continue
        try:
            key.verify(raw, canonical(doc))
            return []
        except InvalidSignature:
            continue
    return ["signature: does not verify with any trusted key"]


#: Applies settings (live, or by a model reload; with ``canary`` True the new model must
#: pass fleet.canary before it serves); None, or why the reload failed.
Apply = Callable[[Settings, bool], Awaitable[str | None]]


class _Rollout:
    """The model artifact being delivered in the background, and how far it got."""

    def __init__(self, layer: str, version: int, ref: rollout.ModelRef,
                 meter: rollout.Meter) -> None:
        self.key = (layer, version)
        self.ref = ref
        self.meter = meter
        self.stop = threading.Event()
        self.status = "downloading"


class Fleet:
    """Handles pushes for one daemon; runs on the daemon's event loop.

    It receives, never the daemon: the ``publisher`` it subscribes and reports through,
    ``settings`` (the running ones), the TOML ``config_path``, and from the daemon
    ``apply``, ``plan_error`` (why settings cannot be planned here, when they change the
    plan), ``config_status`` (version, hash, last apply) and ``record`` (the outcome of a
    push that ``apply`` did not see: the daemon keeps ``last_apply``)."""

    def __init__(self, publisher: Publisher, settings: Callable[[], Settings],
                 config_path: Path | None, loop: asyncio.AbstractEventLoop, *,
                 apply: Apply, plan_error: Callable[[Settings], str | None],
                 config_status: Callable[[], dict[str, object]],
                 record: Callable[[str], None]) -> None:
        self.publisher = publisher
        self.settings = settings
        self.config_path = config_path
        self.loop = loop
        self._apply_settings = apply
        self._plan_error = plan_error
        self._config_status = config_status
        self._record = record
        self._lock = asyncio.Lock()
        self._rollout: _Rollout | None = None
        #: pushes by outcome: applied, rejected, stale, rolled_back, ignored (no report)
        self.stats: dict[str, int] = collections.defaultdict(int)
        pending = self._pending_path()
        if pending.exists():  # killed while a push was being applied: it never took effect
            log.warning("a fleet push was interrupted before it was applied; the last good "
                        "configuration is in effect and the broker delivers the push again",
                        path=str(pending))
            pending.unlink(missing_ok=True)

    def _pending_path(self) -> Path:
        """Where a push waits while it is applied; it replaces the overlay once it works, so
        the overlay a restart replays is always one that was applied."""
        overlay = self.settings().overlay_path
        return overlay.with_name(overlay.stem + ".pending.json")

    def counters(self) -> dict[str, int]:
        return {f"fleet_{k}": v for k, v in self.stats.items()}

    def rollout_status(self) -> dict[str, Any] | None:
        """The model rollout in progress (for telemetry): version, layer, status, progress."""
        current = self._rollout
        if current is None:
            return None
        return {"version": current.key[1], "layer": current.key[0], "model": current.ref.name,
                "status": current.status, **(current.meter.latest or {})}

    def stop(self) -> None:
        """The daemon stops: end a download within one chunk; its ``.part`` and record stay,
        so the next start resumes it."""
        if self._rollout is not None:
            self._rollout.stop.set()

    def topics(self) -> dict[str, str]:
        return bus.config_topics(self.settings())

    def start(self) -> None:
        """Subscribe this device's (and group's) desired configuration topics."""
        topics = self.topics()
        for layer in LAYERS:
            if layer in topics:
                self.publisher.subscribe(topics[layer], self.on_message)
        interrupted = rollout.recorded(self.settings().state_dir)
        if interrupted is not None:  # a restart cut a rollout short: resume it now
            log.info("resuming the model rollout a restart interrupted")
            asyncio.run_coroutine_threadsafe(self._handle(*interrupted), self.loop)

    def on_message(self, topic: str, payload: bytes) -> None:
        """From the MQTT thread: hand the push to the event loop, one at a time."""
        layer = next((name for name, t in self.topics().items()
                      if t == topic and name in LAYERS), None)
        if layer is None:
            self.stats["ignored"] += 1
            return
        asyncio.run_coroutine_threadsafe(self._handle(layer, payload), self.loop)

    def _overlay_doc(self) -> dict[str, Any]:
        path = self.settings().overlay_path
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {"version": 0, "settings": {}, "layers": {}}
        return doc if isinstance(doc, dict) else {"version": 0, "settings": {}, "layers": {}}

    async def _handle(self, layer: str, payload: bytes,
                      delivered: Path | None = None) -> None:
        async with self._lock:
            try:
                report = await self._apply(layer, payload, delivered)
            except Exception as exc:  # a push must never vanish without a word
                log.exception("fleet push failed", layer=layer)
                report = {"version": None, "status": "rejected",
                          "errors": [f"(internal): {type(exc).__name__}: {exc}"]}
        if report is None:
            self.stats["ignored"] += 1
            return
        self._report(layer, report)

    def _report(self, layer: str, report: dict[str, Any]) -> None:
        """Publish ``report`` (retained: the latest says where this device is); count and
        record outcomes, not progress. On the event loop."""
        if report["status"] in OUTCOMES:
            self.stats[report["status"]] += 1
        if report["status"] in ("rejected", "rolled_back"):
            self._record(report["status"])
        report.update(layer=layer, ts=time.time(), hash=self._config_status()["hash"])
        self.publisher.publish(self.topics()["reported"], json.dumps(report), retain=True)
        log.info("fleet push", **{k: v for k, v in report.items() if k != "ts"})

    async def _apply(self, layer: str, payload: bytes,
                     delivered: Path | None) -> dict[str, Any] | None:
        """The report of a push. One with a model artifact passes twice: first validated
        and its download started in the background (``downloading``), then, ``delivered``
        into a verified folder, planned, activated with a canary and applied; that second
        pass ends the rollout, whatever its outcome."""
        state_dir = self.settings().state_dir
        current = self._rollout
        try:
            report = await self._decide(layer, payload, delivered)
        except Exception:
            if delivered is not None:
                await self._end_rollout("rejected", delivered, current)
            raise
        if delivered is not None:
            await self._end_rollout(report["status"] if report else None, delivered, current)
        elif (report is not None and report["status"] in OUTCOMES
              and rollout.recorded(state_dir) == (layer, payload)):
            await asyncio.to_thread(rollout.forget, state_dir)  # resumed, and over at once
        return report

    async def _decide(self, layer: str, payload: bytes,
                      delivered: Path | None) -> dict[str, Any] | None:
        settings = self.settings()
        if not payload:  # a retained push cleared by the operator: nothing to apply
            log.info("fleet push cleared; the applied configuration stays", layer=layer)
            return None
        arrived = (layer, settings.device_id if layer == "device" else settings.fleet.group or "")
        try:
            version, patch, ref = _parse(payload, settings.fleet.trusted_keys, arrived)
        except PushError as exc:
            return {"version": exc.version, "status": "rejected", "errors": exc.errors}
        if ref is not None:
            if delivered is None and self._rollout is not None \
                    and self._rollout.key == (layer, version):
                return None  # already rolling out (the broker delivered the push again)
            if delivered is None and rollout.was_refused(settings.state_dir, ref.sha256,
                                                         version):
                return None  # refused before: its report stands, no second download
            patch = merge_patch(patch, {"model": {"path": str(settings.models_dir / ref.name)}})
        current = self._overlay_doc()
        layers: dict[str, Any] = dict(current.get("layers") or {})
        applied = layers.get(layer) or {}
        if version <= int(applied.get("version", -1)):
            if version == applied.get("version") and patch == applied.get("settings"):
                return None  # the same retained push delivered again: nothing to say
            return {"version": version, "status": "stale",
                    "errors": [f"version {version} is not newer than the applied "
                               f"{applied.get('version')}"]}
        if delivered is None:
            self._supersede(layer)
        return await self._apply_new(layer, version, patch, layers, payload, ref, delivered)

    async def _apply_new(self, layer: str, version: int, patch: dict[str, Any],
                         layers: dict[str, Any], payload: bytes, ref: rollout.ModelRef | None,
                         delivered: Path | None) -> dict[str, Any]:
        settings = self.settings()
        layers[layer] = {"version": version, "settings": patch}
        effective: dict[str, Any] = {}
        for name in LAYERS:  # group first, the device layer wins
            if name in layers:
                effective = merge_patch(effective, layers[name]["settings"])
        try:
            new = load_settings(self.config_path, use_overlay=False, overrides=effective)
        except ConfigError as exc:
            return {"version": version, "status": "rejected",
                    "errors": [f"settings.{p}: {m}" for p, m in exc.errors]}
        model_error = _model_outside(new) if "path" in (effective.get("model") or {}) else None
        if model_error:
            return {"version": version, "status": "rejected", "errors": [model_error]}
        if ref is not None and delivered is None:
            if new.model_path.resolve() == settings.model_path.resolve():
                return {"version": version, "status": "rejected", "errors": [
                    f"model.name: {ref.name!r} is the folder of the model serving"]}
            return self._start_rollout(layer, version, payload, ref)
        if ref is not None:
            self._set_status("activating", layer, version)
        plan_error = await asyncio.to_thread(self._plan_error, new)
        if plan_error:
            return {"version": version, "status": "rejected", "errors": [plan_error]}
        new_doc = {"version": max(int(v["version"]) for v in layers.values()),
                   "settings": effective, "layers": layers}
        path, pending = settings.overlay_path, self._pending_path()
        try:  # written first, so that a full disk refuses the push before anything changes
            settings.state_dir.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(write_json_atomic, pending, new_doc)
        except OSError as exc:  # the atomic write left nothing behind
            return {"version": version, "status": "rejected",
                    "errors": [f"(persist): cannot write {pending}: {exc.strerror or exc}; "
                               "the previous configuration is kept"]}
        try:
            failure = await self._apply_settings(new, ref is not None)
        except Exception as exc:
            log.exception("fleet push failed while applying", version=version)
            failure = f"(apply): {type(exc).__name__}: {exc}"
        if failure is not None:  # the overlay on disk is still the last good one
            pending.unlink(missing_ok=True)
            return {"version": version, "status": "rolled_back", "errors": [failure]}
        try:
            await asyncio.to_thread(_promote, pending, path)
        except OSError as exc:  # applied live; a restart would replay the previous overlay
            return {"version": version, "status": "applied",
                    "errors": [f"(persist): cannot replace {path}: {exc.strerror or exc}; "
                               "a restart returns to the previous configuration"]}
        return {"version": version, "status": "applied", "errors": []}

    # ------------------------------------------------------------ model rollout
    def _start_rollout(self, layer: str, version: int, payload: bytes,
                       ref: rollout.ModelRef) -> dict[str, Any]:
        """Record the push (a restart resumes it) and deliver its artifact on a thread."""
        settings = self.settings()
        rollout.record(settings.state_dir, layer, payload)

        def progress(p: dict[str, Any]) -> None:  # on the download thread
            self.loop.call_soon_threadsafe(self._report, layer, {
                "version": version, "status": "downloading", "errors": [], "progress": p})

        current = self._rollout = _Rollout(layer, version, ref, rollout.Meter(progress))
        threading.Thread(target=self._deliver, args=(current, payload), daemon=True,
                         name=f"rollout-{ref.name}").start()
        return {"version": version, "status": "downloading", "errors": [],
                "progress": {"bytes": 0, "size": ref.size, "percent": 0.0, "eta_s": None}}

    def _deliver(self, current: _Rollout, payload: bytes) -> None:
        """On the rollout's thread: download, check and unpack, then hand the push back to
        the event loop with its verified folder (or report why not)."""
        settings = self.settings()
        layer = current.key[0]
        try:
            folder = rollout.deliver(
                current.ref, settings.state_dir, settings.models_dir,
                current_model=settings.model_path,
                rate_kbps=settings.fleet.download_rate_kbps, progress=current.meter,
                stop=current.stop)
        except ArtifactError as exc:
            if current.stop.is_set():  # superseded, or the daemon stops: no outcome yet
                log.info("model download stopped", model=current.ref.name, reason=exc.reason)
                return
            errors = [f"(artifact): {exc.reason}"]
            asyncio.run_coroutine_threadsafe(self._fail_rollout(current, errors, exc.transient),
                                             self.loop)
            return
        except Exception as exc:
            log.exception("model delivery failed", model=current.ref.name)
            errors = [f"(artifact): {type(exc).__name__}: {exc}"]
            asyncio.run_coroutine_threadsafe(self._fail_rollout(current, errors, False),
                                             self.loop)
            return
        asyncio.run_coroutine_threadsafe(self._handle(layer, payload, folder), self.loop)

    async def _fail_rollout(self, current: _Rollout, errors: list[str],
                            transient: bool) -> None:
        layer, version = current.key
        if transient:  # the link gave up: the .part and the record stay for the next try
            errors.append("the download resumes from where it stopped when the push is "
                          "delivered again or the daemon restarts")
            self._rollout = None
        else:
            await self._end_rollout("rejected", None, current)
        self._report(layer, {"version": version, "status": "rejected", "errors": errors})

    async def _end_rollout(self, status: str | None, delivered: Path | None,
                           current: _Rollout | None) -> None:
        """A rollout's outcome: drop its record and archive; keep its folder only once it
        serves, then keep fleet.keep_models folders. A refused artifact is remembered."""
        settings = self.settings()
        self._rollout = None
        await asyncio.to_thread(rollout.forget, settings.state_dir)
        if status in ("rejected", "rolled_back") and current is not None:
            await asyncio.to_thread(rollout.remember_refused, settings.state_dir,
                                    current.ref.sha256, current.key[1])
        if status == "applied":
            await asyncio.to_thread(rollout.collect_garbage, settings.models_dir,
                                    settings.fleet.keep_models, settings.model_path)
        elif (status is not None and delivered is not None
              and delivered.resolve() != settings.model_path.resolve()):
            # verified but refused: it must not stay behind looking like a usable model
            await asyncio.to_thread(shutil.rmtree, delivered, True)

    def _supersede(self, layer: str) -> None:
        """A newer push for ``layer``: a rollout it replaces stops downloading."""
        if self._rollout is not None and self._rollout.key[0] == layer:
            log.info("a newer push supersedes the model rollout", model=self._rollout.ref.name)
            self._rollout.stop.set()
            self._rollout = None

    def _set_status(self, status: str, layer: str, version: int) -> None:
        if self._rollout is not None:
            self._rollout.status = status
        self._report(layer, {"version": version, "status": status, "errors": []})


def _promote(pending: Path, path: Path) -> None:
    os.replace(pending, path)
    fsync_dir(path.parent)


def _model_outside(new: Settings) -> str | None:
    if new.model.path is None:
        return None
    models = new.models_dir.resolve()
    path = new.model.path.resolve()
    if models not in path.parents:
        return f"settings.model.path: must be inside {models}"
    return None

