"""Model artifacts: one archive of a built model folder, fetched, checked and unpacked.

``pack`` makes a gzip'd tar of a verified model folder (its manifest included); its sha256
and size identify it in a fleet push. On the gateway ``check_disk`` refuses a rollout the
disk cannot hold, ``fetch`` downloads the archive (resumable, rate-limited, verified) and
``unpack`` extracts it safely and verifies the folder against its manifest. Every failure is
an ``ArtifactError`` whose ``reason`` is one line for the fleet report.

Pure of MQTT and of the daemon: only the standard library, structlog and ``manifest``.
"""

from __future__ import annotations

import gzip
import http.client
import io
import os
import shutil
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO
from urllib.parse import urlparse

from edgeagent.manifest import (
    MANIFEST_FILE,
    ModelIntegrityError,
    fsync_dir,
    read_manifest,
    sha256_file,
    verify_model,
)

MiB = 1024 * 1024
CHUNK = 64 * 1024
#: Seconds a connection may stay silent before the fetch gives up (transient: try again).
TIMEOUT_S = 30.0
#: Credit a stalled download may catch up at full speed, in seconds of the rate limit.
BURST_S = 1.0
#: Model weights barely compress (86 MB of int4 weights: -13 %); the tokenizer's JSON does.
#: Level 6 makes the default model 17 % smaller (90.1 -> 74.4 MB) for 0.6 s of gunzip.
GZIP_LEVEL = 6


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
    try:
        manifest = read_manifest(folder) if folder.is_dir() else None
        if folder.is_dir() and manifest is None:
            raise ArtifactError(
                f"model {folder} has no manifest: build it with 'edgeagent model build' "
                "(which writes one), then check it with 'edgeagent model verify'")
        manifest = verify_model(folder)
    except ModelIntegrityError as exc:
        raise ArtifactError(f"{exc}; check it with 'edgeagent model verify'") from exc
    assert manifest is not None  # verify_model returns None only without a manifest
    names = [*manifest["files"], MANIFEST_FILE]
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as raw:
            _write_archive(raw, folder, names)
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(out.parent)
    return ArtifactInfo(folder.name, sha256_file(out), out.stat().st_size, out)


def _write_archive(raw: BinaryIO, folder: Path, names: list[str]) -> None:
    """The tar.gz of ``names`` under ``folder.name``, byte-for-byte reproducible: gzip without
    a name or time, members sorted (folders included) with owner root, mode 0644/0755 and
    time 0."""
    entries = {folder.name: True}
    for name in names:
        parts = PurePosixPath(name).parts
        entries.update({"/".join((folder.name, *parts[:i])): True for i in range(1, len(parts))})
        entries[f"{folder.name}/{name}"] = False
    with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0,
                       compresslevel=GZIP_LEVEL) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for arcname in sorted(entries):
            info = tarfile.TarInfo(arcname)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if entries[arcname]:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
                continue
            path = folder / arcname.split("/", 1)[1]
            info.mode = 0o644
            with path.open("rb") as fh:  # a symlink in the folder is packed as its content
                info.size = os.fstat(fh.fileno()).st_size
                tar.addfile(info, fh)


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
    part = dest.with_name(dest.name + ".part")
    if dest.exists():
        if dest.stat().st_size == size and sha256_file(dest) == sha256:
            progress(size, size)
            return dest
        dest.unlink()
    if part.exists() and part.stat().st_size > size:
        part.unlink()
    limiter = (RateLimiter(rate_kbps * 125, clock=time.monotonic, sleep=stop.wait)
               if rate_kbps else None)
    try:
        _download(url, part, size, limiter, progress, stop)
        actual = sha256_file(part)
        if actual != sha256:
            raise ArtifactError(f"{url}: sha256 {actual} does not match the push's {sha256}")
    except ArtifactError as exc:
        if not exc.transient:
            part.unlink(missing_ok=True)
        raise
    os.replace(part, dest)
    fsync_dir(dest.parent)
    return dest


class RateLimiter:
    """Keeps a download's average at ``bytes_per_s``: after n bytes, not before
    start + n / rate. A stall earns at most ``BURST_S`` of credit, so a link that comes back
    is not flooded. ``sleep`` may be ``Event.wait`` (a stop ends the wait)."""

    def __init__(self, bytes_per_s: float, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], object] = time.sleep) -> None:
        self._rate = bytes_per_s
        self._clock = clock
        self._sleep = sleep
        self._start = clock()
        self._sent = 0

    def pace(self, n: int) -> None:
        """Account ``n`` bytes just received; sleep until the average allows them."""
        now = self._clock()
        if now - (self._start + self._sent / self._rate) > BURST_S:
            self._start = now - BURST_S - self._sent / self._rate
        self._sent += n
        due = self._start + self._sent / self._rate
        if due > now:
            self._sleep(due - now)


def _download(url: str, part: Path, size: int, limiter: RateLimiter | None,
              progress: Callable[[int, int], None], stop: threading.Event) -> None:
    """Fill ``part`` up to ``size`` bytes from ``url``, resuming what it holds."""
    have = part.stat().st_size if part.exists() else 0
    if have < size:
        with _open(url, have, size) as (body, start), \
                part.open("r+b" if start else "wb") as out:
            out.seek(start)
            out.truncate()
            done = _copy(url, body, out, start, size, limiter, progress, stop)
            out.flush()
            os.fsync(out.fileno())
        if done < size:
            raise ArtifactError(f"{url}: the connection ended at {done} of {size} bytes "
                                "(the download resumes from there)", transient=True)
    progress(size, size)


def _copy(url: str, body: io.BufferedIOBase, out: BinaryIO, done: int, size: int,
          limiter: RateLimiter | None, progress: Callable[[int, int], None],
          stop: threading.Event) -> int:
    """Copy ``body`` to ``out`` chunk by chunk; the bytes held at the end."""
    while not stop.is_set():
        try:
            chunk = body.read1(CHUNK)
        except (http.client.HTTPException, OSError) as exc:
            raise ArtifactError(f"{url}: the connection broke at {done} of {size} bytes "
                                f"({exc})", transient=True) from exc
        if not chunk:
            return done
        if done + len(chunk) > size:
            raise ArtifactError(f"{url}: the server sent more than the push's {size} bytes")
        out.write(chunk)
        done += len(chunk)
        progress(done, size)
        if limiter is not None:
            limiter.pace(len(chunk))
    raise ArtifactError(f"{url}: stopped at {done} of {size} bytes", transient=True)


@contextmanager
def _open(url: str, have: int, size: int) -> Iterator[tuple[io.BufferedIOBase, int]]:
    """The body of ``url`` from byte ``have`` when the server can, and where it starts."""
    scheme = urlparse(url).scheme
    if scheme == "file":
        path = Path(urllib.request.url2pathname(urlparse(url).path))
        try:
            fh = path.open("rb")
        except OSError as exc:
            raise ArtifactError(f"{url}: {exc.strerror}") from exc
        with fh:
            _check_total(url, os.fstat(fh.fileno()).st_size, size)
            fh.seek(have)
            yield fh, have
        return
    if scheme not in ("http", "https"):
        raise ArtifactError(f"{url}: unsupported URL scheme {scheme!r} (http, https or file)")
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        # Worth retrying: a timeout, a rate limit, a server error. Not: 404, 403, 416 ...
        transient = exc.code in (408, 429) or exc.code >= 500
        exc.close()
        raise ArtifactError(f"{url}: HTTP {exc.code} {exc.reason}", transient=transient) from exc
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ArtifactError(f"{url}: {reason}", transient=True) from exc
    with response:
        yield response, _start_of(url, response, have, size)


def _start_of(url: str, response: http.client.HTTPResponse, have: int, size: int) -> int:
    """Where the response's body starts in the file: ``have`` for a 206 that resumes, 0 for
    a 200 (a server that ignores Range sends it all). Checks the server's size too."""
    length = response.headers.get("Content-Length")
    if response.status != 206:
        if length is not None:
            _check_total(url, int(length), size)
        return 0
    content_range = response.headers.get("Content-Range", "")
    span, _, total = content_range.removeprefix("bytes ").partition("/")
    if not span.startswith(f"{have}-") or not total.isdigit():
        raise ArtifactError(f"{url}: asked for bytes {have}-, got Content-Range "
                            f"{content_range!r}")
    _check_total(url, int(total), size)
    return have


def _check_total(url: str, total: int, size: int) -> None:
    if total != size:
        raise ArtifactError(f"{url}: the server has {total} bytes, the push says {size} bytes")


def unpack(archive: Path, dest_dir: Path, *, max_bytes: int) -> Path:
    """Extract ``archive`` into ``dest_dir`` and return the model folder, verified.

    The archive must hold one top-level folder of regular files and folders only: no
    absolute paths, no ``..``, no links, no devices, at most ``max_bytes`` in all. It is
    extracted into a hidden temp folder of ``dest_dir``, checked against its manifest
    (``manifest.verify_model``), fsynced and renamed to ``dest_dir/<name>``, which must not
    exist yet. Any failure raises ArtifactError and leaves nothing behind.
    """
    prefix = f".{archive.name}.unpack-"
    for leftover in dest_dir.iterdir():  # of a killed unpack
        if leftover.name.startswith(prefix):
            shutil.rmtree(leftover, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=dest_dir))
    try:
        name = _extract(archive, tmp, max_bytes)
        _verify(archive, tmp / name, name)
        _fsync_tree(tmp)
        target = dest_dir / name
        if target.exists() or target.is_symlink():  # rename would replace an empty folder
            raise ArtifactError(f"{archive.name}: {target} already exists")
        os.rename(tmp / name, target)
        fsync_dir(dest_dir)
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _extract(archive: Path, tmp: Path, max_bytes: int) -> str:
    """Extract ``archive`` into ``tmp`` in one pass, member by member once checked; the name
    of its one top-level folder."""
    top: str | None = None
    total = 0
    try:
        with tarfile.open(archive, "r:*") as tar:
            for info in tar:
                parts = _check_member(archive, info, top)
                if not parts:  # "." of an archive made with tar -C DIR .
                    continue
                top = parts[0]
                # Headers count too: a million empty files is no model either.
                total += info.size + tarfile.BLOCKSIZE
                if total > max_bytes:
                    raise ArtifactError(f"{archive.name}: more than the cap of {max_bytes} "
                                        f"bytes unpacked (at {info.name})")
                # Python's own checks as well (links, devices, modes): belt and braces.
                tar.extract(info, tmp, filter="data")
    except tarfile.FilterError as exc:
        raise ArtifactError(f"{archive.name}: unsafe member: {exc}") from exc
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise ArtifactError(f"{archive.name} is not a readable tar archive ({exc})") from exc
    if top is None:
        raise ArtifactError(f"{archive.name}: the archive is empty")
    return top


def _check_member(archive: Path, info: tarfile.TarInfo, top: str | None) -> tuple[str, ...]:
    """The parts of a member's path once it is known to be safe: relative, no ``..``, a
    regular file or folder (a model has no links nor devices), under the one top folder."""
    name = info.name
    pure = PurePosixPath(name)
    if pure.is_absolute():
        problem = "an absolute path"
    elif ".." in pure.parts:
        problem = "a path with '..'"
    elif not (info.isreg() or info.isdir()):
        problem = "not a regular file or folder (links and devices are refused)"
    elif top is not None and pure.parts and pure.parts[0] != top:
        problem = f"outside the archive's one top-level folder {top!r}"
    elif len(pure.parts) == 1 and not info.isdir():
        problem = "a file outside a folder (the archive holds one model folder)"
    else:
        return pure.parts
    raise ArtifactError(f"{archive.name}: member {name!r} is {problem}")


def _verify(archive: Path, folder: Path, name: str) -> None:
    try:
        manifest = verify_model(folder)
    except ModelIntegrityError as exc:
        problem = str(exc).removeprefix(f"model {folder}: ")
        raise ArtifactError(f"{archive.name}: model {name}: {problem}") from exc
    if manifest is None:
        raise ArtifactError(f"{archive.name}: model {name} has no {MANIFEST_FILE} "
                            "(make artifacts with 'edgeagent model pack')")


def _fsync_tree(root: Path) -> None:
    """Make the extracted files durable before the rename publishes them."""
    for dirpath, _, filenames in os.walk(root):
        for filename in filenames:
            fd = os.open(os.path.join(dirpath, filename), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def check_disk(dest_dir: Path, *, archive: int, unpacked: int, current: int) -> None:
    """Refuse (ArtifactError, with the numbers) when the filesystem of ``dest_dir`` has less
    free space than ``archive + unpacked + current`` bytes: the download (what is left of it
    when a ``.part`` is there), its unpacked folder, and a reserve the size of the current
    model, which stays on disk for rollback while the gateway keeps room to work."""
    free = shutil.disk_usage(dest_dir).free
    need = archive + unpacked + current
    if free < need:
        raise ArtifactError(
            f"not enough disk in {dest_dir}: need {_mib(need)} (archive {_mib(archive)} + "
            f"unpacked {_mib(unpacked)} + current model {_mib(current)}), {_mib(free)} free")


def _mib(n: int) -> str:
    return f"{n / MiB:.1f} MiB"

