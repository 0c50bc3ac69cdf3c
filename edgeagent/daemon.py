"""``edgeagent run``: the composition root and the daemon's lifecycle.

:class:`Daemon` builds every component from the settings (serving, the transports,
telemetry, fleet configuration), wires them with explicit arguments (each gets a narrow
interface or a callable, never the daemon) and owns their start and stop order. Only the
command line imports this module (an import-linter contract, in pyproject.toml).

start -> load (probe, plan, verify, load the model) -> READY -> serve -> drain -> exit.

- SIGTERM / SIGINT: stop accepting, let in-flight work finish within ``drain_timeout_s``,
  cancel what is left, exit 0. A second SIGINT exits at once.
- SIGHUP: reload the configuration; what can change live changes live, a model or plan
  change reloads the model in the background while the old one keeps serving.
- A startup failure (bad configuration, missing or tampered model, a plan that cannot fit)
  exits with ``STARTUP_FAILURE`` and one clear log line, so systemd stops restarting.
- sd_notify: ``READY=1`` once serving, ``STATUS=``, ``WATCHDOG=1`` from the main loop tick
  while healthy (the scheduler made progress within ``stall_timeout_s``), ``STOPPING=1``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import hashlib
import json
import math
import signal
import time
from pathlib import Path
from typing import Any, Protocol

import structlog

from edgeagent import log as logsetup
from edgeagent.canary import check as check_canary
from edgeagent.engine import Engine
from edgeagent.fleet import Fleet
from edgeagent.manifest import ModelIntegrityError, verify_model
from edgeagent.metrics import Figures, render_metrics
from edgeagent.planner import ModelMeta, Plan, PlanError, plan
from edgeagent.probe import Hardware, probe
from edgeagent.scheduler import Scheduler
from edgeagent.sdnotify import Notifier, watchdog_interval
from edgeagent.serving import Serving
from edgeagent.settings import ConfigError, Settings, changed_settings, load_settings
from edgeagent.telemetry import Telemetry, Vitals
from edgeagent.transports.http import HttpTransport
from edgeagent.transports.mqtt import MqttTransport

log = structlog.get_logger(__name__)

STARTUP_FAILURE = 3


class StartupError(Exception):
    """The daemon cannot start and restarting will not help."""


class Transport(Protocol):
    """A way in for requests (the Unix socket, MQTT). Started before the model loads."""

    name: str

    def state(self) -> str: ...

    def counters(self) -> dict[str, int]: ...

    async def start(self) -> None: ...

    def on_ready(self) -> None:
        """The model is loaded (requests held meanwhile may run)."""
        ...

    async def stop_accepting(self) -> None: ...

    async def close(self) -> None: ...


def plan_for(settings: Settings) -> Plan:
    """The plan ``settings`` get on this machine, from the model's metadata alone (nothing
    is loaded or verified), or a PlanError: also how a fleet push is checked in advance."""
    meta = ModelMeta.from_folder(settings.model_path)
    return plan(probe(settings.runtime.probe_root), meta, settings.runtime, settings.limits)


def activation(new: Settings, serving: Plan | None) -> tuple[bool, Plan]:
    """Whether the model of ``new`` loads beside the one ``serving`` (True) or only after it
    is unloaded (False), and its plan: the plan it gets on its own, with the memory the
    serving plan counts (weights, KV cache, prefill) given back. It loads beside when that
    plan fits in the memory available now, with the serving model loaded, so that it is the
    same plan either way. A PlanError when it does not fit even on its own."""
    hw = probe(new.runtime.probe_root)
    held = serving.total_bytes - serving.headroom_bytes if serving is not None else 0
    alone = plan(_freed(hw, held), ModelMeta.from_folder(new.model_path), new.runtime,
                 new.limits)
    available = hw.effective_available_bytes
    return available is None or alone.total_bytes <= available, alone


def _freed(hw: Hardware, held: int) -> Hardware:
    """``hw`` once this process has given back ``held`` bytes."""
    return dataclasses.replace(
        hw,
        mem_available_bytes=None if hw.mem_available_bytes is None
        else hw.mem_available_bytes + held,
        cgroup_memory_usage_bytes=None if hw.cgroup_memory_usage_bytes is None
        else max(hw.cgroup_memory_usage_bytes - held, 0))


def needs_reload(old: Settings, new: Settings) -> bool:
    """Whether going from ``old`` to ``new`` changes the model or its plan: a changed
    setting whose liveness is ``reload``."""
    return "reload" in changed_settings(old, new)


def load_engine(settings: Settings, the_plan: Plan | None = None
                ) -> tuple[Engine, Plan, dict[str, object] | None]:
    """Probe, plan (unless ``the_plan`` is given), verify and load: everything a (re)load
    needs, or a StartupError. The engine comes with its spare generators made (the plan's
    KV cache in memory), so that a ready daemon has its memory in place."""
    path = settings.model_path
    if not path.exists():
        hint = (
            " (build it with 'edgeagent model build')" if settings.model.path is None else ""
        )
        raise StartupError(f"model folder {path} does not exist{hint}")
    try:
        manifest = verify_model(path, check_hashes=settings.model.verify)
        the_plan = the_plan or plan_for(settings)
    except (ModelIntegrityError, PlanError) as exc:
        raise StartupError(str(exc)) from exc
    try:
        engine = Engine(path, the_plan)
        while engine.prepare():
            pass
    except Exception as exc:  # onnxruntime-genai raises plain RuntimeErrors
        raise StartupError(f"model {path} failed to load: {_runtime_message(exc)}") from exc
    return engine, the_plan, manifest


def _runtime_message(exc: Exception) -> str:
    """onnxruntime's error on one line, without the C++ call chain that precedes its point
    ("... [ONNXRuntimeError] : 1 : FAIL : what went wrong")."""
    text = " ".join(str(exc).split())
    marker = "[ONNXRuntimeError] : "
    if marker in text:
        parts = text.rsplit(marker, 1)[1].split(" : ", 2)
        if len(parts) == 3 and parts[2]:
            text = parts[2]
    return text


class Daemon:
    """The composition root. Serving and the transports exist from the start (the socket
    answers 503 while the model loads); the scheduler once the model is loaded; telemetry
    and fleet configuration once ready, when MQTT is on. Stop order: telemetry, the
    transports stop accepting, the scheduler drains, the transports close."""

    def __init__(self, settings: Settings, config_path: Path | None = None) -> None:
        self.settings = settings
        self.config_path = config_path
        self.notifier = Notifier()
        self.started_at = time.monotonic()
        self.serving = Serving(settings)
        self.scheduler: Scheduler | None = None
        self.mqtt = MqttTransport(settings, self.serving)
        self.transports: list[Transport] = [
            HttpTransport(settings, self.serving, self.health, self.metrics,
                          created=int(time.time())),
            self.mqtt,
        ]
        self._exit = asyncio.Event()
        self._force_exit = False
        self._reload_task: asyncio.Task[None] | None = None
        self.telemetry: Telemetry | None = None
        self.fleet: Fleet | None = None
        self.last_apply = "boot"
        #: seconds from start to ready: how long a model takes to load here
        self.load_s = 0.0
        #: a model swap unloaded the serving model: not ready, but not stuck either
        self._swapping = False
        self._exit_code = 0

    @property
    def ready(self) -> bool:
        return self.serving.ready

    def uptime(self) -> float:
        return time.monotonic() - self.started_at

    def counters(self) -> dict[str, int]:
        """Counters of every component (e.g. MQTT reconnects), for /metrics and telemetry."""
        out: dict[str, int] = {}
        for transport in self.transports:
            out.update(transport.counters())
        for part in (self.fleet, self.telemetry):
            if part is not None:
                out.update(part.counters())
        return out

    def metrics(self) -> tuple[bytes, str]:
        """The /metrics body and its content type."""
        status = self.serving.status()
        return render_metrics(Figures(self.ready, self.uptime(), self.counters(),
                                      status.get("serving")))

    def config_status(self) -> dict[str, object]:
        """The configuration in effect: fleet overlay version, a hash, the last apply."""
        effective = json.dumps(self.settings.model_dump(mode="json"), sort_keys=True)
        version = None
        with contextlib.suppress(OSError, ValueError, AttributeError):
            version = json.loads(self.settings.overlay_path.read_text()).get("version")
        doc: dict[str, object] = {
            "version": version, "hash": hashlib.sha256(effective.encode()).hexdigest()[:16],
            "last_apply": self.last_apply}
        progress = self.fleet.rollout_status() if self.fleet is not None else None
        if progress is not None:  # a model being rolled out: telemetry shows how far
            doc["rollout"] = progress
        return doc

    def health(self) -> dict[str, Any]:
        """What /health reports: state, plan, model, versions, transports, serving figures."""
        import onnxruntime
        import onnxruntime_genai

        from edgeagent import __version__

        status = self.serving.status()
        doc: dict[str, Any] = {
            "status": status["status"],
            "device_id": self.settings.device_id,
            "uptime_s": round(self.uptime(), 1),
            "versions": {"edgeagent": __version__, "onnxruntime": onnxruntime.__version__,
                         "onnxruntime_genai": onnxruntime_genai.__version__},
            "model": status["model"],
            "plan": status["plan"],
            "transports": {t.name: t.state() for t in self.transports},
        }
        if "serving" in status:
            doc["serving"] = status["serving"]
        return doc

    # ------------------------------------------------------------ signals
    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_signal_handler(signal.SIGTERM, self.request_exit, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self.request_exit, "SIGINT")
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)

    def _restore_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)

    def request_exit(self, why: str = "request") -> None:
        if self._exit.is_set():
            if why == "SIGINT":
                log.warning("second SIGINT: exiting without drain")
                self._force_exit = True
                if self.scheduler is not None:
                    self.scheduler.cancel_all()
            return
        log.info("shutdown requested", signal=why)
        self._exit.set()

    def _on_sighup(self) -> None:
        if self._reload_task is not None and not self._reload_task.done():
            log.warning("reload already in progress; SIGHUP ignored")
            return
        self._reload_task = asyncio.get_running_loop().create_task(self.reload())

    # ------------------------------------------------------------ lifecycle
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._install_signals(loop)
        try:
            return await self._run()
        finally:
            self._restore_signals(loop)
            self.notifier.close()

    async def _run(self) -> int:
        log.info("starting", device_id=self.settings.device_id, model=str(
            self.settings.model_path), config=str(self.config_path or "(default)"))
        self.notifier.send("STATUS=starting")
        try:
            for transport in self.transports:
                await transport.start()
        except Exception as exc:
            log.error("startup failed", error=str(exc))
            await self._close_transports()
            return STARTUP_FAILURE
        self.serving.loading()
        self.notifier.send("STATUS=loading model")
        load = asyncio.ensure_future(asyncio.to_thread(load_engine, self.settings))
        exit_wait = asyncio.ensure_future(self._exit.wait())
        await asyncio.wait({load, exit_wait}, return_when=asyncio.FIRST_COMPLETED)
        if not load.done():
            log.info("shutdown during model load; exiting once it finishes")
            with contextlib.suppress(Exception):
                await load
            await self._close_transports()
            return 0
        exit_wait.cancel()
        try:
            engine, the_plan, manifest = load.result()
        except StartupError as exc:
            log.error("startup failed", error=str(exc))
            self.notifier.send(f"STATUS=startup failed: {exc}")
            await self._close_transports()
            return STARTUP_FAILURE
        self.scheduler = Scheduler(engine, the_plan, self.settings)
        self.scheduler.start()
        self.serving.serve(self.scheduler, the_plan, manifest)
        for transport in self.transports:
            transport.on_ready()
        self._start_upstream()
        self.load_s = time.monotonic() - self.started_at
        log.info("ready", load_s=round(self.load_s, 2), plan=the_plan.summary())
        self.notifier.send("READY=1", f"STATUS=ready: {the_plan.summary()}")
        await self._main_loop()
        await self.shutdown()
        return self._exit_code

    def _start_upstream(self) -> None:
        """Telemetry and fleet configuration ride on the MQTT transport, when it is on."""
        if not self.mqtt.enabled:
            return
        self.telemetry = Telemetry(self.mqtt, lambda: self.settings, self.vitals)
        self.telemetry.start()
        self.fleet = Fleet(self.mqtt, lambda: self.settings, self.config_path,
                           asyncio.get_running_loop(), apply=self.apply,
                           plan_error=self._plan_error, config_status=self.config_status,
                           record=self._record_apply)
        self.fleet.start()

    def vitals(self) -> Vitals:
        """What a telemetry document reports beyond the machine's own figures."""
        return Vitals(self.uptime(), self.ready, self.serving.model_id, self.serving.manifest,
                      self.serving.plan, self.serving.status().get("serving"),
                      self.counters(), self.config_status())

    def _plan_error(self, new: Settings) -> str | None:
        """Why ``new`` cannot be planned here (runtime.threads above the CPUs, a context that
        does not fit, a folder that is no model), checked before a fleet push is persisted
        or applied. Only when it changes the plan; a model that fits only once the running
        one is unloaded is no error (see ``activation``)."""
        if not needs_reload(self.settings, new):
            return None
        try:
            activation(new, self.serving.plan)
        except PlanError as exc:
            return f"(plan): {exc}"
        return None

    def _canary(self, engine: Engine, new: Settings, baseline: float | None) -> str | None:
        """Run the canary prompts on the new ``engine`` (not yet serving) against the serving
        model's recent decode speed, ``baseline``."""
        try:
            return check_canary(engine, new.fleet.canary, baseline)
        except Exception as exc:  # a model that cannot even answer is a failed canary
            return f"{type(exc).__name__}: {exc}"

    def _record_apply(self, outcome: str) -> None:
        """A fleet push's outcome that ``apply`` did not see (rejected before it)."""
        self.last_apply = outcome

    async def _main_loop(self) -> None:
        interval = watchdog_interval()
        tick = min(interval, 1.0) if interval else 1.0
        last_check = 0.0
        while not self._exit.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._exit.wait(), timeout=tick)
            now = time.monotonic()
            if interval and now - last_check >= interval:
                last_check = now
                if self.healthy(now):
                    self.notifier.send("WATCHDOG=1")
                else:  # once per interval, until systemd restarts the daemon
                    log.error("watchdog withheld: the scheduler made no progress",
                              stall_timeout_s=self.settings.stall_timeout_s)

    def healthy(self, now: float | None = None) -> bool:
        """The watchdog is pinged only while this holds: ready, and the scheduler alive and
        making progress (a step or an idle wait within ``stall_timeout_s``): a thread
        wedged in the engine is not healthy."""
        scheduler = self.scheduler
        if self._swapping:  # the old model is unloaded while the new one loads
            return True
        if not self.ready or scheduler is None or not scheduler.alive:
            return False
        now = time.monotonic() if now is None else now
        return now - scheduler.last_progress < self.settings.stall_timeout_s

    async def shutdown(self) -> None:
        self.serving.draining()
        if self.fleet is not None:
            self.fleet.stop()  # a model download ends; the next start resumes it
        if self.telemetry is not None:
            await asyncio.to_thread(self.telemetry.stop)
        self.notifier.send("STOPPING=1", "STATUS=draining")
        for transport in self.transports:
            await transport.stop_accepting()
        if self.scheduler is not None:
            timeout = 0.0 if self._force_exit else self.settings.drain_timeout_s
            left = await asyncio.to_thread(self.scheduler.drain, timeout)
            if left:
                log.warning("drain timeout: cancelled unfinished requests", cancelled=left)
            self.scheduler.stop()
        await self._close_transports()
        log.info("stopped")

    async def _close_transports(self) -> None:
        for transport in self.transports:
            try:
                await transport.close()
            except Exception:
                log.exception("transport close failed", transport=transport.name)

    # ------------------------------------------------------------ reload
    async def reload(self) -> None:
        """SIGHUP: read the configuration again and apply it."""
        try:
            new = load_settings(self.config_path)
        except ConfigError as exc:
            log.error("reload rejected; keeping the running configuration",
                      errors=[f"{p}: {m}" for p, m in exc.errors])
            return
        await self.apply(new)

    async def apply(self, new: Settings, canary: bool = False) -> str | None:
        """Apply new settings as each changed setting's liveness says (settings.py): live
        and scheduler settings at once, a background model reload for reload ones, and
        restart ones kept for the next start (logged as ``after_restart``).

        With ``canary`` (a model rollout), the new model answers ``fleet.canary`` before it
        serves. Returns None when applied, restart settings included, or why the model
        reload or its canary failed (the running model and configuration are kept)."""
        if self._swapping:  # a SIGHUP while a fleet push swaps the model after an unload
            log.warning("configuration not applied: a model swap is in progress")
            return "a model swap is in progress; apply again once it is over"
        changes = changed_settings(self.settings, new)
        logsetup.configure(new.log.level, new.log.format)
        if "reload" in changes and self.scheduler is not None:
            log.info("configuration needs a model reload", settings=changes["reload"])
            failure = await self._reload(new, canary)
            if failure is not None:
                self.last_apply = "rolled_back"
                return failure
        self.settings = new
        self.serving.update_settings(new)
        if self.telemetry is not None:
            self.telemetry.interval_changed()
        self.last_apply = "applied"
        # Restart settings are kept (config show, the overlay) but the running sockets and
        # broker connection still use the old values: say so rather than pretend.
        log.info("configuration applied", changed=changes,
                 after_restart=changes.get("restart", []))
        return None


    async def _reload(self, new: Settings, canary: bool) -> str | None:
        """Load the model of ``new``, run its canary when asked, and swap it in: beside the
        serving model when both fit (that one serves meanwhile), else after unloading it
        (then loaded again when the new one fails). None, or why not: the old model serves."""
        try:
            beside, new_plan = await asyncio.to_thread(activation, new, self.serving.plan)
        except PlanError as exc:
            return f"(plan): {exc}"
        old_plan = self.serving.plan
        snapshot = self.serving.status().get("serving") or {}
        baseline = snapshot.get("decode_tokens_per_s")  # the serving model's, before it goes
        if not beside:
            log.warning("unloading the serving model: the new one does not fit beside it",
                        plan=new_plan.summary())
            await self._unload()
        loaded, failure = await asyncio.to_thread(self._load_checked, new, new_plan, canary,
                                                  baseline)
        if loaded is not None:
            if beside:
                self.serving.swap(*loaded)
                self.mqtt.publish_status()  # the new model and plan, retained
            else:
                self._serve(*loaded, new)
            log.info("model reloaded", plan=loaded[1].summary())
            return None
        log.error("model reload failed; keeping the running model", error=failure)
        if not beside:
            await self._load_again(old_plan)
        return failure

    def _load_checked(self, new: Settings, the_plan: Plan, canary: bool,
                      baseline: float | None
                      ) -> tuple[tuple[Engine, Plan, dict[str, object] | None] | None,
                                 str | None]:
        """On a thread: the new model loaded and, with ``canary``, passing it; or why not
        (its engine is dropped here, so that its memory goes back)."""
        started = time.monotonic()
        try:
            engine, the_plan, manifest = load_engine(new, the_plan)
        except StartupError as exc:
            return None, str(exc)
        log.info("new model loaded", seconds=round(time.monotonic() - started, 2))
        if not canary:
            return (engine, the_plan, manifest), None
        started = time.monotonic()
        failure = self._canary(engine, new, baseline)
        log.info("canary run", seconds=round(time.monotonic() - started, 2), failure=failure)
        if failure is not None:
            return None, f"(canary): {failure}"
        return (engine, the_plan, manifest), None

    async def _unload(self) -> None:
        """Stop serving and give the model's memory back: new requests get 503 with a
        Retry-After of about a model load (MQTT holds them until a model serves), those
        running finish within drain_timeout_s."""
        scheduler = self.scheduler
        assert scheduler is not None
        self._swapping = True
        self.serving.loading(retry_after=min(60, max(1, math.ceil(self.load_s))))
        left = await asyncio.to_thread(scheduler.drain, self.settings.drain_timeout_s)
        if left:
            log.warning("model swap: cancelled requests still running", cancelled=left)
        await asyncio.to_thread(scheduler.stop)
        self.serving.unload()
        self.scheduler = None
        del scheduler
        gc.collect()  # onnxruntime frees the weights once the last reference goes
        self.mqtt.publish_status()  # loading: no model, no plan

    def _serve(self, engine: Engine, the_plan: Plan, manifest: dict[str, object] | None,
               settings: Settings) -> None:
        """A model loaded after an unload serves: a scheduler of its own, and the transports
        told (MQTT answers what it held and republishes the status)."""
        self.scheduler = Scheduler(engine, the_plan, settings)
        self.scheduler.start()
        self.serving.serve(self.scheduler, the_plan, manifest)
        self._swapping = False
        for transport in self.transports:
            transport.on_ready()

    async def _load_again(self, old_plan: Plan | None) -> None:
        """The new model failed after the old one was unloaded: load the old one again, with
        its plan. If even that fails the daemon exits (status 1): systemd restarts it with
        the last good configuration."""
        gc.collect()  # the failed engine's memory first
        try:
            loaded = await asyncio.to_thread(load_engine, self.settings, old_plan)
        except StartupError as exc:
            log.critical("the serving model cannot be loaded again; exiting", error=str(exc))
            self._swapping = False
            self._exit_code = 1
            self.request_exit("model lost")
            return
        self._serve(*loaded, self.settings)
        log.warning("the serving model is loaded again", model=str(self.settings.model_path))


def run(config_path: Path | None) -> int:
    """Entry point of ``edgeagent run``: returns the process exit code."""
    try:
        settings = load_settings(config_path)
    except ConfigError as exc:
        logsetup.configure()
        log.error("invalid configuration", source=exc.source,
                  errors=[f"{p}: {m}" for p, m in exc.errors])
        return STARTUP_FAILURE
    logsetup.configure(settings.log.level, settings.log.format)
    daemon = Daemon(settings, config_path)
    try:
        import uvloop  # a faster event loop where it is installed
    except ImportError:
        return asyncio.run(daemon.run())
    return int(uvloop.run(daemon.run()))
