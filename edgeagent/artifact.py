"""Model artifacts: one archive of a built model folder, fetched, checked and unpacked.

``pack`` makes a gzip'd tar of a verified model folder (its manifest included); its sha256
and size identify it in a fleet push. On the gateway ``check_disk`` refuses a rollout the
disk cannot hold, ``fetch`` downloads the archive (resumable, rate-limited, verified) and
``unpack`` extracts it safely and verifies the folder against its manifest. Every failure is
an ``ArtifactError`` whose ``reason`` is one line for the fleet report.

Pure of MQTT and of the daemon: only the standard library, structlog and ``manifest``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


class ArtifactError(Exception):
    """An artifact that cannot be used. ``reason`` is one line for the report; ``transient``
    is True when trying again later may succeed (a dropped connection, a stop request: the
    ``.part`` file is kept), False when it cannot (a wrong sha256, an unsafe archive)."""

    def __init__(self, reason: str, *, transient: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient


@dataclass(frozen=True)
class ArtifactInfo:
    """What identifies an archive made by ``pack``: the push's ``model`` fields but the URL."""

    name: str  # the model folder's name, the archive's one top-level folder
    sha256: str
    size: int
    path: Path


def pack(folder: Path, out: Path) -> ArtifactInfo:
    """Archive the verified model folder ``folder`` as ``out`` (tar.gz, written atomically).

    The archive holds one top-level folder named like ``folder`` with the files its manifest
    lists and the manifest, in sorted order with normalized owners, modes and times, so the
    same folder always gives the same bytes. A folder without a manifest, or that does not
    match it, is refused (ArtifactError).
    """
    raise NotImplementedError


def fetch(
    url: str,
    dest: Path,
    *,
    sha256: str,
    size: int,
    rate_kbps: float | None,
    progress: Callable[[int, int], None],
    stop: threading.Event,
) -> Path:
    """Download ``url`` (http, https or file) to ``dest`` and return ``dest``.

    Bytes go to ``dest`` + ``.part``; a fetch that finds one (a dropped connection, a
    restart) asks for the rest with an HTTP Range request and starts again from zero when the
    server answers with the whole file. ``rate_kbps`` caps the average speed in kilobits per
    second (1 kbps = 125 bytes/s; None: no cap). ``progress(done, size)`` is called after every
    chunk (from this thread; throttle there). Setting ``stop`` ends the fetch within one chunk
    with a transient ArtifactError, keeping the ``.part``. Once ``size`` bytes are in, their
    sha256 is checked and the file renamed to ``dest``; a ``dest`` already there with the
    right sha256 is returned at once. A wrong sha256 or size (the server's or the bytes')
    raises ArtifactError and removes the ``.part``; a dropped connection raises a transient
    one and keeps it.
    """
    raise NotImplementedError


def unpack(archive: Path, dest_dir: Path, *, max_bytes: int) -> Path:
    """Extract ``archive`` into ``dest_dir`` and return the model folder, verified.

    The archive must hold one top-level folder of regular files and folders only: no
    absolute paths, no ``..``, no links, no devices, at most ``max_bytes`` in all. It is
    extracted into a hidden temp folder of ``dest_dir``, checked against its manifest
    (``manifest.verify_model``), fsynced and renamed to ``dest_dir/<name>``, which must not
    exist yet. Any failure raises ArtifactError and leaves nothing behind.
    """
    raise NotImplementedError


def check_disk(dest_dir: Path, *, archive: int, unpacked: int, current: int) -> None:
    """Refuse (ArtifactError, with the numbers) when the filesystem of ``dest_dir`` has less
    free space than ``archive + unpacked + current`` bytes: the download (what is left of it
    when a ``.part`` is there), its unpacked folder, and a reserve the size of the current
    model, which stays on disk for rollback while the gateway keeps room to work."""
    raise NotImplementedError
