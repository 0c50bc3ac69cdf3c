"""The serving interface: all that transports see of the model (as vLLM's ``EngineClient``).

A transport prepares a request (validated, tokenized by the engine that will run it,
sampling and guidance resolved), turns it into a job with its own sink
(:func:`edgeagent.protocol.to_job`), submits it, cancels it, and reads the status. It never
sees the scheduler's engine, the settings' files or the daemon. The daemon (the composition
root) builds one :class:`Serving`, moves it through its states and hands it to the
transports as a :class:`ServingClient`.
"""

from __future__ import annotations

from typing import Any, Protocol

from edgeagent import protocol
from edgeagent.engine import Engine
from edgeagent.planner import Plan
from edgeagent.scheduler import Job, Scheduler
from edgeagent.settings import Settings


class ServingClient(Protocol):
    """What a transport may do with the model."""

    @property
    def ready(self) -> bool:
        """The model is loaded and requests are served."""
        ...

    @property
    def stopping(self) -> bool:
        """The daemon has begun to stop: nothing new is admitted from now on."""
        ...

    @property
    def model_id(self) -> str: ...

    def model_ids(self) -> list[str]:
        """The names a request's ``model`` may take (``edgeagent``, its profiles)."""
        ...

    def prepare_chat(self, req: protocol.ChatCompletionRequest) -> protocol.Prepared:
        """Tokenized by the engine that will run it; AdmissionError (400, 404, 503)."""
        ...

    def prepare_completion(self, req: protocol.CompletionRequest) -> protocol.Prepared: ...

    def submit(self, job: Job) -> None:
        """Queue the job or raise AdmissionError (429, 400, 503); never blocks."""
        ...

    def cancel(self, job: Job) -> None:
        """Its sink gets Finish("cancelled") within one token step."""
        ...

    def status(self) -> dict[str, Any]:
        """State, model, plan and the scheduler's figures (what /health shows of them)."""
        ...


class Serving:
    """The serving state the daemon moves along: starting, loading, ready, draining."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state = "starting"
        self.plan: Plan | None = None
        self.manifest: dict[str, object] | None = None
        self._scheduler: Scheduler | None = None
        self._retry_after = 1

    # ------------------------------------------------------------ the root's side
    def loading(self, retry_after: int = 1) -> None:
        """A model loads (at start, or in place of the one unloaded for a swap): requests
        get 503 with ``retry_after`` seconds."""
        self.state = "loading"
        self._retry_after = retry_after

    def unload(self) -> None:
        """The scheduler is drained and stopped: let go of it, so that its engine's memory
        goes back before another model loads (``serve`` gives the next one)."""
        self._scheduler, self.plan = None, None

    def serve(self, scheduler: Scheduler, plan: Plan,
              manifest: dict[str, object] | None) -> None:
        """The model is loaded and ``scheduler`` runs it: ready."""
        self._scheduler, self.plan, self.manifest = scheduler, plan, manifest
        self.state = "ready"

    def swap(self, engine: Engine, plan: Plan, manifest: dict[str, object] | None) -> None:
        """A reloaded model: requests prepared from now on are tokenized by it."""
        assert self._scheduler is not None
        self._scheduler.swap_engine(engine, plan)
        self.plan, self.manifest = plan, manifest

    def update_settings(self, settings: Settings) -> None:
        self.settings = settings
        if self._scheduler is not None:
            self._scheduler.update_settings(settings)

    def draining(self) -> None:
        self.state = "draining"

    @property
    def stopping(self) -> bool:
        return self.state == "draining"

    # ------------------------------------------------------------ the transports' side
    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def model_id(self) -> str:
        """The manifest's model id, or the model folder's name."""
        if self.manifest and isinstance(self.manifest.get("model_id"), str):
            return str(self.manifest["model_id"])
        return self.settings.model_path.name

    def model_ids(self) -> list[str]:
        return protocol.model_ids(self.settings)

    def prepare_chat(self, req: protocol.ChatCompletionRequest) -> protocol.Prepared:
        engine, generation = self._engine_for_new()
        return protocol.prepare_chat(req, engine, self.settings, self.model_id, generation)

    def prepare_completion(self, req: protocol.CompletionRequest) -> protocol.Prepared:
        engine, generation = self._engine_for_new()
        return protocol.prepare_completion(req, engine, self.settings, self.model_id,
                                           generation)

    def submit(self, job: Job) -> None:
        self._running().submit(job)

    def cancel(self, job: Job) -> None:
        if self._scheduler is not None:
            self._scheduler.cancel(job)

    def status(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "status": self.state,
            "model": {"id": self.model_id, "path": str(self.settings.model_path),
                      "verified": self.manifest is not None},
            "plan": self.plan.to_dict() if self.plan else None,
        }
        if self._scheduler is not None:
            doc["serving"] = self._scheduler.snapshot()
        return doc

    def _running(self) -> Scheduler:
        if self._scheduler is None or not self.ready:
            # Loading: come back in a second (/health says when it is ready). Draining: no
            # Retry-After, for this process will not serve again; a client should go
            # elsewhere or wait for the next start.
            if self.state in ("starting", "loading"):
                raise protocol.ModelLoading("the model is still loading",
                                            retry_after=self._retry_after)
            raise protocol.ModelLoading("the daemon is shutting down")
        return self._scheduler

    def _engine_for_new(self) -> tuple[Engine, int]:
        return self._running().engine_for_new()
