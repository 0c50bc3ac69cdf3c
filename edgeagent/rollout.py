"""Model rollout: a push's ``model`` artifact from download to a verified folder, and the
model folders kept afterwards.

The fleet (``fleet.py``) drives it: ``deliver`` runs on a background thread while the old
model serves (check the disk, download resumably and rate-limited, verify the sha256, unpack
safely, verify the manifest); the root runs ``canary.check`` on the new engine before it
swaps; ``collect_garbage`` keeps the last ``fleet.keep_models`` folders. A rollout in
progress is recorded in ``<state_dir>/rollout.json``, so a daemon restarted mid-download
resumes it from its ``.part`` file at boot. Nothing here knows MQTT, the daemon or the
engine (``config push`` imports the fleet's push format without loading the model runtime).
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgeagent.artifact import ArtifactError, check_disk, fetch, unpack
from edgeagent.manifest import write_json_atomic

log = structlog.get_logger(__name__)

#: Unpacked bytes allowed per archive byte. INT4 weights barely compress (about 1.1:1), so
#: an archive that expands more than this is a decompression bomb, not a model.
MAX_EXPANSION = 4
#: Download attempts after a transient failure (a dropped connection), each resuming from
#: the ``.part`` file, waiting 1, 2, 4, 8 s in between.
ATTEMPTS = 5
RECORD_FILE = "rollout.json"
#: Artifacts refused here (sha256, version), so that the push delivered again (retained:
#: at every reconnect and start) is not downloaded again; the latest REFUSED_KEEP stay.
REFUSED_FILE = "rollout-refused.json"
REFUSED_KEEP = 32
DOWNLOADS = "downloads"
#: Progress reports at most this often, or at each PROGRESS_STEP percent: enough for a
#: live table, few enough for a thin uplink.
PROGRESS_PERIOD_S = 2.0
PROGRESS_STEP = 10.0


class ModelRef(BaseModel):
    """A push's ``model``: where the artifact is and what identifies it (``edgeagent model
    pack`` prints these). It is inside the signed part of the push."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    url: str = Field(description="http://, https:// or file:// URL of the archive.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the archive.")
    size: int = Field(gt=0, description="Size of the archive in bytes.")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
                      description="The model folder's name under <state_dir>/models.")

    @field_validator("url")
    @classmethod
    def _scheme(cls, url: str) -> str:
        if urlparse(url).scheme not in ("http", "https", "file"):
            raise ValueError("must be an http://, https:// or file:// URL")
        return url


def parse_ref(value: Any) -> ModelRef:
    """The push's ``model`` field, or ValueError with ``model.<field>: message`` lines."""
    try:
        return ModelRef.model_validate(value)
    except ValidationError as exc:
        raise ValueError("\n".join(
            f"model.{'.'.join(str(p) for p in e['loc'])}".rstrip(".") + f": {e['msg']}"
            for e in exc.errors())) from None


# ------------------------------------------------------------ the record of a rollout
def record_path(state_dir: Path) -> Path:
    return state_dir / RECORD_FILE


def record(state_dir: Path, layer: str, payload: bytes) -> None:
    """Remember the push being rolled out, so that a restart resumes it."""
    state_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(record_path(state_dir), {"layer": layer, "payload": payload.decode()})


def recorded(state_dir: Path) -> tuple[str, bytes] | None:
    """The push whose rollout a restart interrupted, if any."""
    try:
        doc = json.loads(record_path(state_dir).read_text(encoding="utf-8"))
        return str(doc["layer"]), str(doc["payload"]).encode()
    except (OSError, ValueError, KeyError, TypeError):
        return None


def forget(state_dir: Path) -> None:
    """The rollout is over: drop its record and its downloads (one rollout runs at a time,
    so what else is there was superseded)."""
    record_path(state_dir).unlink(missing_ok=True)
    shutil.rmtree(state_dir / DOWNLOADS, ignore_errors=True)


def remember_refused(state_dir: Path, sha256: str, version: int) -> None:
    """The artifact of push ``version`` was rejected or rolled back on this gateway."""
    entries = [e for e in _refused(state_dir) if e != [sha256, version]] + [[sha256, version]]
    state_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(state_dir / REFUSED_FILE, {"refused": entries[-REFUSED_KEEP:]})


def was_refused(state_dir: Path, sha256: str, version: int) -> bool:
    return [sha256, version] in _refused(state_dir)


def _refused(state_dir: Path) -> list[list[Any]]:
    try:
        entries = json.loads((state_dir / REFUSED_FILE).read_text(encoding="utf-8"))["refused"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [e for e in entries if isinstance(e, list)] if isinstance(entries, list) else []


# ------------------------------------------------------------ delivery
def archive_path(state_dir: Path, ref: ModelRef) -> Path:
    return state_dir / DOWNLOADS / f"{ref.sha256}.tar.gz"


class Meter:
    """Turns the download's progress calls into reports ``{bytes, size, percent, eta_s}``,
    handed to ``report`` at most every PROGRESS_PERIOD_S or PROGRESS_STEP percent."""

    def __init__(self, report: Callable[[dict[str, Any]], None]) -> None:
        self.report = report
        self.latest: dict[str, Any] | None = None
        self._start: tuple[float, int] | None = None  # when and where this session began
        self._last = (0.0, -PROGRESS_STEP)

    def __call__(self, done: int, size: int) -> None:
        now = time.monotonic()
        if self._start is None:
            self._start = (now, done)
        percent = round(100.0 * done / size, 1) if size else 100.0
        elapsed, fetched = now - self._start[0], done - self._start[1]
        # From this session's own speed: bytes resumed from a .part took no time now.
        eta = round((size - done) * elapsed / fetched, 1) if fetched > 0 and elapsed > 0 \
            else None
        self.latest = {"bytes": done, "size": size, "percent": percent, "eta_s": eta}
        if percent != self._last[1] and (done == size or percent - self._last[1] >= PROGRESS_STEP
                                         or now - self._last[0] >= PROGRESS_PERIOD_S):
            self._last = (now, percent)
            self.report(self.latest)


def deliver(ref: ModelRef, state_dir: Path, models_dir: Path, *, current_model: Path,
            rate_kbps: float | None, progress: Callable[[int, int], None],
            stop: threading.Event) -> Path:
    """Download, check and unpack ``ref``: its verified folder ``models_dir/<name>``, or an
    ArtifactError. The caller makes sure that folder is not the one serving; one already
    there (a rollout interrupted after unpacking) is replaced."""
    archive = archive_path(state_dir, ref)
    archive.parent.mkdir(parents=True, exist_ok=True)
    models_dir.mkdir(parents=True, exist_ok=True)
    part = archive.with_name(archive.name + ".part")
    have = _size(archive) or _size(part)
    check_disk(models_dir, archive=max(ref.size - have, 0), unpacked=ref.size,
               current=folder_bytes(current_model))
    _fetch(ref, archive, rate_kbps, progress, stop)
    target = models_dir / ref.name
    if target.exists():
        shutil.rmtree(target)
    folder = unpack(archive, models_dir, max_bytes=ref.size * MAX_EXPANSION)
    if folder.name != ref.name:
        shutil.rmtree(folder)
        raise ArtifactError(f"the archive holds the folder {folder.name!r}, the push names "
                            f"{ref.name!r}")
    return folder


def _fetch(ref: ModelRef, archive: Path, rate_kbps: float | None,
           progress: Callable[[int, int], None], stop: threading.Event) -> None:
    """fetch, resumed from its ``.part`` after a transient failure, ATTEMPTS times."""
    for attempt in range(ATTEMPTS):
        try:
            fetch(ref.url, archive, sha256=ref.sha256, size=ref.size, rate_kbps=rate_kbps,
                  progress=progress, stop=stop)
            return
        except ArtifactError as exc:
            if not exc.transient or stop.is_set() or attempt == ATTEMPTS - 1:
                raise
            log.warning("model download interrupted; resuming", reason=exc.reason,
                        attempt=attempt + 1)
            stop.wait(2 ** attempt)  # a backoff that a stop request cuts short


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def folder_bytes(folder: Path) -> int:
    return sum(_size(f) for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else 0


# ------------------------------------------------------------ garbage collection
def collect_garbage(models_dir: Path, keep: int, serving: Path) -> list[Path]:
    """Delete model folders beyond the ``keep`` most recently used (``serving`` always
    stays): what a rollback could still use is the folder served before. Returns those
    deleted. Hidden folders are unpacking leftovers of artifact.unpack, not models."""
    serving = serving.resolve()
    if serving.parent == models_dir.resolve():
        serving.touch(exist_ok=True)  # its mtime marks it the most recently used
    folders = sorted((p for p in models_dir.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and p.resolve() != serving),
                     key=lambda p: p.stat().st_mtime, reverse=True)
    gone = folders[max(keep - 1, 0):]
    for folder in gone:
        shutil.rmtree(folder, ignore_errors=True)
        log.info("old model folder removed", path=str(folder), keep_models=keep)
    return gone
