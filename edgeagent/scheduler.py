"""The scheduler: the one owner of the engine, fed by every transport.

Transports build a :class:`Job` and ``submit`` it. A bounded queue holds jobs until a batch
slot frees; one thread admits them into the engine (from idle, when requests have lately
come in bursts, it waits ``runtime.batch_window_ms`` so that requests arriving together
share a batch; while idle it lets the engine make ready what a request would otherwise wait
for, ``Engine.prepare``), steps the
engine and hands each job its tokens through ``job.sink`` — called on the
scheduler thread, so a sink must only hand the item over (``call_soon_threadsafe``, a
non-blocking MQTT publish), never block.

Admission is checked at ``submit``: queue full (429), prompt or total too long for the plan
(400), available memory below the plan's headroom (503), not accepting (503). A job's
deadline (408) and cancellation are checked before every step, so a cancelled or expired
job leaves the batch within one token step.

A job asking for ``n`` choices runs as ``n`` sequences of one batch sharing the prompt; each
counts against the capacity and the queue, and its items carry their choice's ``index``.

A job admitted while others run starts at the engine's next step, beside them (the engine
steps its batches in turn): it waits for a free sequence slot, never for a batch to end.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog

from edgeagent.backpressure import DrainRate
from edgeagent.engine import Delta, Engine, Finish, Sampling, Sequence
from edgeagent.planner import Plan
from edgeagent.probe import available_memory
from edgeagent.settings import Settings

log = structlog.get_logger(__name__)


class AdmissionError(Exception):
    """A job refused before it ran; ``status`` is the HTTP status transports map it to."""

    status = 400
    code = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None, *,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param  # the request field at fault, when there is one
        self.retry_after = retry_after  # seconds after which a retry may succeed


class PromptTooLong(AdmissionError):
    status = 400
    code = "context_length_exceeded"


class QueueFull(AdmissionError):
    status = 429
    code = "queue_full"


class Unavailable(AdmissionError):
    status = 503
    code = "unavailable"


class ModelChanged(Unavailable):
    code = "model_changed"

    def __init__(self) -> None:
        super().__init__(MODEL_CHANGED, retry_after=1)  # the new model already serves


MODEL_CHANGED = "the model changed after this request was prepared; retry"


@dataclass
class JobError:
    """A job that failed after admission: deadline passed (408) or an engine failure (500)."""

    status: int
    code: str
    message: str


Item = Delta | Finish | JobError
Sink = Callable[[Item], None]

_ids = itertools.count(1)

#: How long the scheduler remembers how many jobs were in the system at once.
CONCURRENCY_MEMORY_S = 10.0


@dataclass(eq=False)
class Job:
    prompt_tokens: np.ndarray
    sampling: Sampling
    sink: Sink
    deadline: float  # time.monotonic()
    guidance: tuple[str, str] | None = None
    transport: str = "local"
    id: str = field(default_factory=lambda: f"job-{next(_ids)}")
    submitted: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    cancelled: bool = False
    #: The engine generation that tokenized the prompt (None: any engine).
    generation: int | None = None
    #: Choices: sequences started together from the one prompt.
    n: int = 1
    #: A completions request with several prompts: each row's own (``prompt_tokens`` is
    #: then the longest, for the length checks).
    row_prompts: list[np.ndarray] | None = None
    #: A JobError went to the sink: the job's other rows end without a word.
    failed: bool = False


def bursty(arrivals: list[float], window: float) -> bool:
    """Whether requests come in bursts: at least half of them (``arrivals``: submit times,
    oldest first) within ``window`` seconds of the one before. Requests from clients acting
    apart rarely are: at 2.4 a second at random, one in five is within 100 ms; waiting for
    another would cost the other four their window."""
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    return bool(gaps) and 2 * sum(gap <= window for gap in gaps) >= len(gaps)


@dataclass(frozen=True)
class _Row:
    """A running sequence: its job and the choice it is."""

    job: Job
    seq: Sequence
    index: int


def row_sampling(sampling: Sampling, index: int) -> Sampling:
    """The sampling of choice ``index``: with a seed, row 0 keeps it (n=1 reproduces as
    before) and row i > 0 gets one derived from (seed, i), so choices differ but repeat."""
    if index == 0 or sampling.seed is None:
        return sampling
    digest = hashlib.sha256(f"{sampling.seed}:{index}".encode()).digest()
    return dataclasses.replace(sampling, seed=int.from_bytes(digest[:8], "big") >> 1)


@dataclass
class Stats:
    """Counters the scheduler keeps; /metrics and telemetry read these, never recompute."""

    submitted: int = 0
    completed: int = 0
    cancelled: int = 0
    rejected: dict[str, int] = field(default_factory=lambda: collections.defaultdict(int))
    errors: dict[str, int] = field(default_factory=lambda: collections.defaultdict(int))
    prompt_tokens: int = 0
    generated_tokens: int = 0
    ttft_s: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=1024)
    )
    decode_tps: float = 0.0  # exponential moving average of per-job decode tokens/s
    #: Sequences that started from the prefix cache, and the prompt tokens it spared them.
    prefix_cache_hits: int = 0
    prefix_cache_tokens_saved: int = 0


class Scheduler:
    def __init__(self, engine: Engine, plan: Plan, settings: Settings) -> None:
        self._engine = engine
        self.plan = plan
        self.settings = settings
        self.stats = Stats()
        #: what a refused client is told to wait (Retry-After)
        self.drain_rate = DrainRate()
        self._queue: collections.deque[Job] = collections.deque()
        self._running: dict[int, _Row] = {}  # id(seq) -> its row
        self._cond = threading.Condition()
        self._accepting = True
        self._stop = False
        # Each engine has a generation; a job runs only on the one that tokenized it.
        self._generations = itertools.count(1)
        self._generation = 0
        self._pending_swap: tuple[Engine, Plan, int] | None = None
        #: (time, jobs in the system) at each submit, for the last CONCURRENCY_MEMORY_S
        self._levels: collections.deque[tuple[float, int]] = collections.deque()
        #: time.monotonic() of the loop's last step or idle wait; the watchdog reads it
        self.last_progress = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)

    # ----------------------------------------------------------- properties
    @property
    def engine(self) -> Engine:
        return self._engine

    def engine_for_new(self) -> tuple[Engine, int]:
        """The engine a job prepared now will run on (the one a swap waits to bring in),
        and its generation, for ``Job.generation``."""
        with self._cond:
            if self._pending_swap is not None:
                engine, _, generation = self._pending_swap
                return engine, generation
            return self._engine, self._generation

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def active(self) -> int:
        """Sequences running (a job of n choices runs n)."""
        return len(self._running)

    def _queued_rows(self) -> int:
        return sum(job.n for job in self._queue)

    def _jobs_running(self) -> list[Job]:
        return list({id(row.job): row.job for row in self._running.values()}.values())

    # ------------------------------------------------------------ admission
    def check_prompt(self, prompt_len: int, max_tokens: int, plan: Plan | None = None) -> None:
        """400 with the numbers when a prompt or its total does not fit the plan."""
        plan = plan or self.plan
        if prompt_len > plan.max_prompt_tokens:
            raise PromptTooLong(
                f"the prompt has {prompt_len} tokens; this daemon accepts at most "
                f"{plan.max_prompt_tokens} (context length {plan.context_length})"
            )
        if prompt_len + max_tokens > plan.context_length:
            raise PromptTooLong(
                f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) is "
                f"{prompt_len + max_tokens} tokens; the context length is "
                f"{plan.context_length}"
            )

    def submit(self, job: Job) -> None:
        """Queue a job or raise an AdmissionError; never blocks."""
        try:
            self._admit(job)
        except AdmissionError as exc:
            self.stats.rejected[exc.code] += 1
            raise

    def _admit(self, job: Job) -> None:
        if not self._accepting:
            raise Unavailable("the daemon is shutting down")
        with self._cond:
            plan = self._plan_of(job)
        if plan is None:
            raise ModelChanged()
        if job.n > self._engine.capacity:
            raise AdmissionError(f"n ({job.n}) is above the {self._engine.capacity} "
                                 "sequences this daemon runs at once", "n")
        self.check_prompt(len(job.prompt_tokens), job.sampling.max_tokens, plan)
        headroom = self.plan.headroom_bytes
        avail = available_memory(self.settings.runtime.probe_root)
        if avail is not None and avail < headroom:
            log.warning("memory guard: refusing work", available_mb=avail // 2**20,
                        headroom_mb=headroom // 2**20)
            raise Unavailable(
                f"available memory ({avail // 2**20} MB) is below the planned headroom "
                f"({headroom // 2**20} MB); try again later",
                retry_after=self.drain_rate.retry_after(self.queue_depth),
            )
        with self._cond:
            # Sequences count; an empty queue takes any job that fits a batch.
            queued = self._queued_rows()
            if queued and queued + job.n > self.settings.limits.max_queue:
                raise QueueFull(
                    f"the queue is full ({self.settings.limits.max_queue} requests waiting); "
                    "retry later", retry_after=self.drain_rate.retry_after(self.queue_depth)
                )
            self._queue.append(job)
            self._levels.append((time.monotonic(), queued + job.n + len(self._running)))
            self._recent_peak()  # prunes: under sustained load the loop never gathers
            self.stats.submitted += 1
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Cancel a job wherever it is; its sink gets Finish('cancelled') within a step."""
        with self._cond:
            job.cancelled = True
            self._cond.notify()

    def cancel_all(self) -> None:
        with self._cond:
            for job in itertools.chain(self._queue, self._jobs_running()):
                job.cancelled = True
            self._cond.notify()

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._thread.start()

    def drain(self, timeout: float) -> int:
        """Stop accepting; wait for queued and running jobs up to ``timeout``, then cancel
        what is left. Returns how many jobs were cancelled."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._accepting = False
            while (self._queue or self._running) and self.alive:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(timeout=min(left, 0.5))
            unfinished = len(self._queue) + len(self._running)
        if unfinished:
            self.cancel_all()
            with self._cond:
                end = time.monotonic() + 5.0
                while (self._queue or self._running) and self.alive:
                    if not self._cond.wait(timeout=max(0.0, end - time.monotonic())):
                        break
        return unfinished

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)

    def swap_engine(self, engine: Engine, plan: Plan) -> None:
        """Use a newly loaded engine once the jobs the old one tokenized have run on it:
        those running and those ahead in the queue; jobs prepared from now on are for the
        new one (``engine_for_new``)."""
        with self._cond:
            self._pending_swap = (engine, plan, next(self._generations))
            self._cond.notify()

    def update_settings(self, settings: Settings) -> None:
        self.settings = settings

    # ------------------------------------------------------------ the loop
    def _loop(self) -> None:
        while True:
            if self._idle() and self._engine.prepare():
                self.last_progress = time.monotonic()  # made a spare generator: look again
                continue
            with self._cond:
                self._maybe_swap()
                while not self._stop and not self._running and not self._queue_ready():
                    self.last_progress = time.monotonic()  # idle, nothing to do
                    self._cond.wait(timeout=1.0)
                    self._maybe_swap()
                if not self._running:
                    self._gather()
                if self._stop:
                    self._fail_all("the daemon stopped")
                    return
                self._maybe_swap()
                # Started under the lock: a job is always in the queue or running, so
                # drain() never sees it in between.
                for job in self._admit_from_queue():
                    self._start(job)
                self._apply_cancels()
            if self._running:
                try:
                    events = self._engine.step()
                except Exception as exc:  # the engine fails a batch by events; not this
                    log.exception("engine step failed")
                    events = []
                    self._fail_running(f"engine failure: {exc}")
                self.last_progress = time.monotonic()
                self._dispatch(events)
                self._fail_lost()
            with self._cond:
                self._cond.notify_all()  # drain() waits on this

    def _idle(self) -> bool:
        """Nothing to run, and nothing to make ready for: not a daemon that stops, not an
        engine on its way out."""
        if self._running:  # changes on this thread only: read without the lock, so that
            return False   # a step costs no more
        with self._cond:
            return self._accepting and not (self._stop or self._queue_ready()
                                            or self._pending_swap)

    def _gather(self) -> None:
        """From idle, wait a moment (``runtime.batch_window_ms``) for more arrivals.

        Requests that start together share a batch, which costs less per token than the
        batches of their own that later arrivals get; clients fired by one event send
        theirs tens of milliseconds apart. It waits only when requests have lately come in
        such bursts (:func:`bursty`), and only until as many jobs are queued as were in the
        system at once lately (the active clients): a lone client's requests, and clients
        sending at unrelated moments, start at once.
        """
        window = self.settings.runtime.batch_window_ms / 1000
        if not self._queue or window <= 0:
            return
        if not bursty([t for t, _ in self._levels], window):
            return
        expected = min(self._engine.capacity, self._recent_peak())
        until = self._queue[0].submitted + window
        while (not self._stop and self._queued_rows() < expected
               and (left := until - time.monotonic()) > 0):
            self._cond.wait(timeout=left)

    def _recent_peak(self) -> int:
        """The most jobs in the system at once in the last CONCURRENCY_MEMORY_S (under the
        lock); older levels are dropped."""
        horizon = time.monotonic() - CONCURRENCY_MEMORY_S
        while self._levels and self._levels[0][0] < horizon:
            self._levels.popleft()
        return max((n for _, n in self._levels), default=1)

    def _plan_of(self, job: Job) -> Plan | None:
        """The plan of the engine ``job`` was tokenized by; None when that engine is gone
        (under the lock)."""
        if job.generation is None or job.generation == self._generation:
            return self.plan
        if self._pending_swap is not None and job.generation == self._pending_swap[2]:
            return self._pending_swap[1]
        return None

    def _runs_now(self, job: Job) -> bool:
        """Whether ``job`` runs on the current engine (a job for a pending one waits)."""
        return job.generation is None or job.generation == self._generation

    def _queue_ready(self) -> bool:
        return bool(self._queue) and self._runs_now(self._queue[0])

    def _maybe_swap(self) -> None:
        """Swap once the old engine has nothing running and nothing next in the queue."""
        if (self._pending_swap is not None and not self._running
                and not self._queue_ready()):
            self._engine, self.plan, self._generation = self._pending_swap
            self._pending_swap = None
            log.info("scheduler now uses the reloaded engine")

    def _admit_from_queue(self) -> list[Job]:
        admitted: list[Job] = []
        now = time.monotonic()
        if any(job.cancelled or now >= job.deadline or self._plan_of(job) is None
               for job in self._queue):
            waiting: collections.deque[Job] = collections.deque()
            for job in self._queue:
                if job.cancelled:
                    self.stats.cancelled += 1
                    self._deliver(job, Finish("cancelled", len(job.prompt_tokens), 0))
                elif now >= job.deadline:
                    self._expire(job)
                elif self._plan_of(job) is None:  # tokenized by an engine swapped out
                    self.stats.errors["model_changed"] += 1
                    self._deliver(job, JobError(503, "model_changed", MODEL_CHANGED))
                else:
                    waiting.append(job)
            self._queue = waiting
        rows = len(self._running)
        while (self._queue and self._runs_now(self._queue[0])
               and rows + self._queue[0].n <= self._engine.capacity):
            rows += self._queue[0].n
            admitted.append(self._queue.popleft())
        return admitted

    def _start(self, job: Job) -> None:
        """Hand a job's rows to the engine (cheap: the engine only queues them), one after
        the other so that they share a batch; under the lock."""
        try:
            seqs = [self._engine.start(job.prompt_tokens if job.row_prompts is None
                                       else job.row_prompts[i],
                                       row_sampling(job.sampling, i), job.guidance)
                    for i in range(job.n)]
        except Exception as exc:  # the same prompt for every row: the first one fails
            log.warning("job refused by the engine", job=job.id, error=str(exc))
            self.stats.errors["engine"] += 1
            self._deliver(job, JobError(400, "invalid_request_error", str(exc)))
            return
        for index, seq in enumerate(seqs):
            self._running[id(seq)] = _Row(job, seq, index)

    def _apply_cancels(self) -> None:
        now = time.monotonic()
        for row in self._running.values():
            if row.job.cancelled or now >= row.job.deadline:
                self._engine.cancel(row.seq)

    def _dispatch(self, events: list[tuple[Sequence, Delta | Finish]]) -> None:
        for seq, item in events:
            row = self._running.get(id(seq))
            if row is None:
                continue
            job = row.job
            item.index = row.index
            if isinstance(item, Delta):
                if job.first_token is None:
                    job.first_token = time.monotonic()
                    self.stats.ttft_s.append(job.first_token - job.submitted)
                if not job.failed:
                    self._deliver(job, item)
                continue
            with self._cond:
                del self._running[id(seq)]
            self._account(job, item)
            if job.failed:
                continue
            if item.reason == "cancelled" and not job.cancelled:
                self._expire(job)  # cancelled by us because its deadline passed
            elif item.reason == "error":
                self.stats.errors["engine"] += 1
                self._fail(job, JobError(500, "engine_error",
                                         item.error or "generation failed"))
            else:
                self._deliver(job, item)

    def _fail(self, job: Job, err: JobError) -> None:
        """The job's one error; its other rows are cancelled and end unheard."""
        job.failed = True
        for row in list(self._running.values()):
            if row.job is job:
                self._engine.cancel(row.seq)
        self._deliver(job, err)

    def _account(self, job: Job, fin: Finish) -> None:
        self.drain_rate.finished(job.submitted)
        self.stats.prompt_tokens += fin.prompt_tokens
        self.stats.generated_tokens += fin.completion_tokens
        if fin.cached_tokens:
            self.stats.prefix_cache_hits += 1
            self.stats.prefix_cache_tokens_saved += fin.cached_tokens
        if fin.reason == "cancelled":
            self.stats.cancelled += 1
        else:
            self.stats.completed += 1
        if job.first_token is not None and fin.completion_tokens > 1:
            elapsed = time.monotonic() - job.first_token
            if elapsed > 0:
                tps = (fin.completion_tokens - 1) / elapsed
                prev = self.stats.decode_tps
                self.stats.decode_tps = tps if prev == 0 else 0.8 * prev + 0.2 * tps

    def _expire(self, job: Job) -> None:
        self.stats.errors["timeout"] += 1
        waited = time.monotonic() - job.submitted
        self._fail(job, JobError(408, "timeout",
                                 f"the request's deadline passed after {waited:.1f}s"))

    def _deliver(self, job: Job, item: Item) -> None:
        try:
            job.sink(item)
        except Exception:
            log.exception("sink failed", job=job.id, transport=job.transport)

    def _fail_running(self, message: str) -> None:
        with self._cond:
            jobs = self._jobs_running()
            rows = list(self._running.values())
            self._running.clear()
        for row in rows:
            self._engine.cancel(row.seq)  # the engine drops it at its next step
        for job in jobs:
            self.stats.errors["engine"] += 1
            self._deliver(job, JobError(500, "engine_error", message))

    def _fail_lost(self) -> None:
        """Fail the running jobs the engine no longer holds and will never finish: their
        slots free, and the loop waits instead of stepping an engine with nothing to do."""
        with self._cond:
            lost = [key for key, row in self._running.items()
                    if not self._engine.holds(row.seq)]
            jobs = {id(row.job): row.job for row in map(self._running.pop, lost)}
        for job in jobs.values():
            log.error("the engine lost a job", job=job.id)
            self.stats.errors["engine"] += 1
            if not job.failed:
                self._fail(job, JobError(500, "engine_error", "the engine lost the request"))

    def _fail_all(self, message: str) -> None:
        jobs = list(self._queue) + self._jobs_running()
        self._queue.clear()
        self._running.clear()
        for job in jobs:
            self._deliver(job, JobError(503, "unavailable", message))

    def snapshot(self) -> dict[str, Any]:
        """Figures for /health, /metrics and telemetry."""
        ttft = sorted(self.stats.ttft_s)

        def pct(p: float) -> float | None:
            return round(ttft[min(len(ttft) - 1, int(p * len(ttft)))], 4) if ttft else None

        return {
            "queue_depth": self.queue_depth,
            "active_sequences": self.active,
            "capacity": self._engine.capacity,
            "submitted": self.stats.submitted,
            "completed": self.stats.completed,
            "cancelled": self.stats.cancelled,
            "rejected": dict(self.stats.rejected),
            "errors": dict(self.stats.errors),
            "prompt_tokens": self.stats.prompt_tokens,
            "generated_tokens": self.stats.generated_tokens,
            "decode_tokens_per_s": round(self.stats.decode_tps, 2),
            "ttft_p50_s": pct(0.5),
            "ttft_p95_s": pct(0.95),
            "prefix_cache_hits": self.stats.prefix_cache_hits,
            "prefix_cache_tokens_saved": self.stats.prefix_cache_tokens_saved,
            "prefix_cache_entries": self._engine.prefix_cache.entries,
            "prefix_cache_bytes": self._engine.prefix_cache.bytes,
        }
