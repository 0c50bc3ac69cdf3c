"""Model artifacts: pack, fetch (resumable, rate-limited, verified), safe unpack, disk check.

Real parts: the default model packed and served by a local HTTP server with Range support
(edgeagent.testing.artifact_server), the CLI as a subprocess, archives made with tarfile.
Only the rate limiter's clock is fake (no timing assertions).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest

from edgeagent import artifact
from edgeagent.artifact import ArtifactError, RateLimiter, check_disk, fetch, pack, unpack
from edgeagent.manifest import MANIFEST_FILE, verify_model
from edgeagent.testing.artifact_server import serve_artifact
from tests.conftest import REPO

MiB = 1024 * 1024


# ---------------------------------------------------------------- helpers
def make_model(folder: Path, weights: bytes = b"w" * 4096) -> Path:
    """A small model folder with a manifest that verify_model accepts."""
    folder.mkdir(parents=True)
    (folder / "genai_config.json").write_text('{"model": {"type": "llama"}}')
    (folder / "model.onnx.data").write_bytes(weights)
    (folder / "sub").mkdir()
    (folder / "sub" / "tokenizer.json").write_text("{}")
    files = {
        p.relative_to(folder).as_posix(): {
            "sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "size": p.stat().st_size}
        for p in sorted(folder.rglob("*")) if p.is_file()
    }
    (folder / MANIFEST_FILE).write_text(json.dumps({"format": 1, "files": files}))
    return folder


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def blob(tmp_path: Path, size: int = 1 * MiB) -> Path:
    path = tmp_path / "blob.bin"
    path.write_bytes(os.urandom(size))
    return path


def get(url: str, dest: Path, expect: Path, *, sha: str | None = None, size: int | None = None,
        rate_kbps: float | None = None, stop: threading.Event | None = None) -> Path:
    return fetch(url, dest, sha256=sha or sha256(expect), size=expect.stat().st_size
                 if size is None else size, rate_kbps=rate_kbps,
                 progress=lambda done, total: None, stop=stop or threading.Event())


def part(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def evil_archive(path: Path, *members: tuple[tarfile.TarInfo, bytes | None],
                 model: Path | None = None) -> Path:
    """A tar.gz of ``model`` (under its name) plus ``members``."""
    with tarfile.open(path, "w:gz") as tar:
        if model is not None:
            tar.add(model, arcname=model.name)
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"x",
           linkname: str = "") -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        return info, data
    return info, None


@pytest.fixture(scope="module")
def packed_default(default_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("packed") / "default.tar.gz"
    pack(default_model, out)
    return out


# ---------------------------------------------------------------- pack
def test_pack_is_deterministic_sorted_and_holds_only_the_manifested_files(tmp_path: Path):
    model = make_model(tmp_path / "m1")
    (model / ".DS_Store").write_text("junk")  # not in the manifest: not packed
    a = pack(model, tmp_path / "a.tar.gz")
    os.utime(model / "model.onnx.data", (1, 1))  # another mtime: same archive
    b = pack(model, tmp_path / "b.tar.gz")
    assert (a.sha256, a.size, a.name) == (b.sha256, b.size, "m1")
    archive = tmp_path / "a.tar.gz"
    assert a.sha256 == sha256(archive) and a.size == archive.stat().st_size
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert names == ["m1", f"m1/{MANIFEST_FILE}", "m1/genai_config.json", "m1/model.onnx.data",
                     "m1/sub", "m1/sub/tokenizer.json"]


@pytest.mark.parametrize("damage", ["no manifest", "changed file"])
def test_pack_refuses_a_folder_that_does_not_verify(tmp_path: Path, damage: str):
    model = make_model(tmp_path / "m")
    if damage == "no manifest":
        (model / MANIFEST_FILE).unlink()
    else:
        (model / "model.onnx.data").write_bytes(b"v" * 4096)
    with pytest.raises(ArtifactError, match=r"edgeagent model (build|verify)"):
        pack(model, tmp_path / "out.tar.gz")
    assert not (tmp_path / "out.tar.gz").exists()
    assert os.listdir(tmp_path) == ["m"]  # no temp file left


def test_cli_model_pack(tmp_path: Path):
    model = make_model(tmp_path / "m")
    out = tmp_path / "m.tar.gz"
    run = subprocess.run([sys.executable, "-m", "edgeagent", "model", "pack", str(model), "-o",
                          str(out)], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert run.returncode == 0, run.stderr
    assert f"sha256 {sha256(out)}" in run.stdout and f"size {out.stat().st_size}" in run.stdout
    run = subprocess.run([sys.executable, "-m", "edgeagent", "model", "pack", str(model), "-o",
                          str(out), "--json"], capture_output=True, text=True, cwd=REPO,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {"name": "m", "sha256": sha256(out),
                                      "size": out.stat().st_size, "file": str(out)}
    (model / MANIFEST_FILE).unlink()
    run = subprocess.run([sys.executable, "-m", "edgeagent", "model", "pack", str(model), "-o",
                          str(tmp_path / "x.tar.gz")], capture_output=True, text=True, cwd=REPO,
                         timeout=60)
    assert run.returncode == 1
    assert "has no manifest" in run.stderr and "edgeagent model build" in run.stderr
    assert not (tmp_path / "x.tar.gz").exists()


# ---------------------------------------------------------------- fetch
def test_default_model_fetched_resumed_after_a_drop_and_unpacked(
        packed_default: Path, default_model: Path, tmp_path: Path):
    size = packed_default.stat().st_size
    dest = tmp_path / "dl" / "model.tar.gz"
    dest.parent.mkdir()
    seen: list[tuple[int, int]] = []
    with serve_artifact(packed_default, drop_after=size // 2) as server:
        with pytest.raises(ArtifactError) as err:
            fetch(server.url, dest, sha256=sha256(packed_default), size=size, rate_kbps=None,
                  progress=lambda done, total: seen.append((done, total)),
                  stop=threading.Event())
        assert err.value.transient
        assert part(dest).stat().st_size == size // 2
        got = fetch(server.url, dest, sha256=sha256(packed_default), size=size, rate_kbps=None,
                    progress=lambda done, total: seen.append((done, total)),
                    stop=threading.Event())
    assert got == dest and sha256(dest) == sha256(packed_default)
    assert not part(dest).exists()
    assert server.ranges == [None, f"bytes={size // 2}-"]
    assert server.sent == size  # resumed: each byte served once, not 1.5x
    assert seen[-1] == (size, size) and all(total == size for _, total in seen)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)

    models = tmp_path / "models"
    models.mkdir()
    folder = unpack(dest, models, max_bytes=512 * MiB)
    assert folder == models / default_model.name
    assert verify_model(folder) == verify_model(default_model)
    assert os.listdir(models) == [default_model.name]


def test_a_server_that_ignores_range_restarts_from_zero(tmp_path: Path):
    data = blob(tmp_path)
    dest = tmp_path / "a.bin"
    part(dest).write_bytes(data.read_bytes()[: MiB // 3])
    with serve_artifact(data, ignore_range=True) as server:
        get(server.url, dest, data)
    assert sha256(dest) == sha256(data)
    assert server.ranges == [f"bytes={MiB // 3}-"] and server.sent == MiB


def test_a_part_from_before_a_restart_resumes_over_file_urls(tmp_path: Path):
    data = blob(tmp_path)
    dest = tmp_path / "a.bin"
    part(dest).write_bytes(data.read_bytes()[:1000])
    assert get(data.as_uri(), dest, data) == dest
    assert sha256(dest) == sha256(data) and not part(dest).exists()


def test_a_finished_download_is_not_fetched_again(tmp_path: Path):
    data = blob(tmp_path)
    dest = tmp_path / "a.bin"
    shutil.copy(data, dest)
    with serve_artifact(data) as server:
        assert get(server.url, dest, data) == dest
    assert server.ranges == []


def test_wrong_sha256_removes_the_part(tmp_path: Path):
    data = blob(tmp_path)
    dest = tmp_path / "a.bin"
    with serve_artifact(data) as server, pytest.raises(ArtifactError, match="sha256") as err:
        get(server.url, dest, data, sha="0" * 64)
    assert not err.value.transient
    assert not dest.exists() and not part(dest).exists()


@pytest.mark.parametrize("send_length", [True, False])
@pytest.mark.parametrize("served", [MiB - 100, MiB + 100])
def test_a_file_of_another_size_is_refused(tmp_path: Path, served: int, send_length: bool):
    data = blob(tmp_path, served)
    dest = tmp_path / "a.bin"
    with serve_artifact(data, send_length=send_length) as server:
        if served < MiB and not send_length:
            # Without a length a short body looks like a dropped connection: the retry
            # learns the server's size (416 for the Range past its end).
            with pytest.raises(ArtifactError, match="connection ended") as err:
                get(server.url, dest, data, sha=sha256(data), size=MiB)
            assert err.value.transient
        with pytest.raises(ArtifactError, match=r"bytes|416") as err:
            get(server.url, dest, data, sha=sha256(data), size=MiB)
    assert not err.value.transient
    assert not dest.exists() and not part(dest).exists()


def test_http_errors_and_unreachable_servers(tmp_path: Path):
    data = blob(tmp_path, 1000)
    with serve_artifact(data) as server:
        with pytest.raises(ArtifactError, match="404") as err:
            get(server.url + "-missing", tmp_path / "a.bin", data)
        assert not err.value.transient
        url = server.url
    with pytest.raises(ArtifactError, match=r"127\.0\.0\.1") as err:
        get(url, tmp_path / "a.bin", data)  # the server is gone
    assert err.value.transient
    with pytest.raises(ArtifactError, match="scheme"):
        get("ftp://example.org/a", tmp_path / "a.bin", data)


def test_stop_keeps_the_part_and_the_next_fetch_resumes(tmp_path: Path):
    data = blob(tmp_path)
    dest = tmp_path / "a.bin"
    stop = threading.Event()

    def progress(done: int, total: int) -> None:
        stop.set()  # after the first chunk

    with serve_artifact(data) as server:
        with pytest.raises(ArtifactError, match="stopped") as err:
            fetch(server.url, dest, sha256=sha256(data), size=MiB, rate_kbps=None,
                  progress=progress, stop=stop)
        assert err.value.transient
        kept = part(dest).stat().st_size
        assert 0 < kept < MiB
        get(server.url, dest, data)
    assert sha256(dest) == sha256(data)
    assert server.ranges[-1] == f"bytes={kept}-"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> bool:
        self.slept.append(seconds)
        self.now += seconds
        return False  # as Event.wait: not stopped


def test_rate_limiter_paces_to_the_average_and_allows_no_burst_after_a_stall():
    clock = FakeClock()
    limiter = RateLimiter(1000.0, clock=clock, sleep=clock.sleep)
    for _ in range(10):
        limiter.pace(500)  # instantly received 500 bytes each
    assert clock.now == pytest.approx(105.0)  # 5000 bytes at 1000 B/s
    clock.now += 60  # a stalled connection: no credit for a minute of nothing
    clock.slept.clear()
    limiter.pace(2000)
    assert sum(clock.slept) == pytest.approx(1.0)  # BURST_S of credit, not 60 s


def test_fetch_paces_every_byte_at_the_rate_in_kilobits(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch):
    clock = FakeClock()
    made: list[float] = []

    class Recording(RateLimiter):
        def __init__(self, bytes_per_s: float, **_: object) -> None:
            made.append(bytes_per_s)
            super().__init__(bytes_per_s, clock=clock, sleep=clock.sleep)

    monkeypatch.setattr(artifact, "RateLimiter", Recording)
    data = blob(tmp_path)
    with serve_artifact(data) as server:
        get(server.url, tmp_path / "a.bin", data, rate_kbps=800)  # 100 000 bytes/s
    assert made == [100_000]
    assert clock.now - 100.0 == pytest.approx(MiB / 100_000, rel=0.1)


# ---------------------------------------------------------------- unpack
@pytest.mark.parametrize("evil", [
    member("/tmp/edgeagent-evil-abs"),
    member("m/../../edgeagent-evil-dotdot"),
    member("m/link", tarfile.SYMTYPE, linkname="/etc/passwd"),
    member("m/link", tarfile.SYMTYPE, linkname="../../outside"),
    member("m/hard", tarfile.LNKTYPE, linkname="../outside"),
    member("m/dev", tarfile.CHRTYPE),
    member("m/fifo", tarfile.FIFOTYPE),
    member("other/file"),  # a second top-level folder
], ids=["absolute", "dotdot", "symlink-abs", "symlink-out", "hardlink-out", "device", "fifo",
        "two-folders"])
def test_unsafe_archives_are_refused_and_leave_nothing(tmp_path: Path, evil):
    model = make_model(tmp_path / "src" / "m")
    archive = evil_archive(tmp_path / "evil.tar.gz", evil, model=model)
    dest = tmp_path / "deep" / "models"
    dest.mkdir(parents=True)
    with pytest.raises(ArtifactError, match=re.escape(evil[0].name)):
        unpack(archive, dest, max_bytes=MiB)
    assert os.listdir(dest) == []
    assert sorted(os.listdir(tmp_path)) == ["deep", "evil.tar.gz", "src"]
    assert not Path("/tmp/edgeagent-evil-abs").exists()


def test_an_archive_over_the_size_cap_is_refused(tmp_path: Path):
    model = make_model(tmp_path / "src" / "m", weights=os.urandom(200_000))
    archive = pack(model, tmp_path / "m.tar.gz").path
    dest = tmp_path / "models"
    dest.mkdir()
    with pytest.raises(ArtifactError, match="100000"):
        unpack(archive, dest, max_bytes=100_000)
    assert os.listdir(dest) == []
    assert unpack(archive, dest, max_bytes=300_000) == dest / "m"


def test_a_folder_that_does_not_match_its_manifest_is_refused(tmp_path: Path):
    model = make_model(tmp_path / "src" / "m")
    (model / "model.onnx.data").write_bytes(b"v" * 4096)  # same size, other bytes
    archive = evil_archive(tmp_path / "m.tar.gz", model=model)
    dest = tmp_path / "models"
    dest.mkdir()
    with pytest.raises(ArtifactError, match=r"model.onnx.data does not match its manifest"):
        unpack(archive, dest, max_bytes=MiB)
    assert os.listdir(dest) == []


@pytest.mark.parametrize("content", [b"", b"not an archive at all", b"\x1f\x8b\x08garbage"])
def test_not_an_archive(tmp_path: Path, content: bytes):
    archive = tmp_path / "x.tar.gz"
    archive.write_bytes(content)
    dest = tmp_path / "models"
    dest.mkdir()
    with pytest.raises(ArtifactError, match=r"x\.tar\.gz"):
        unpack(archive, dest, max_bytes=MiB)
    assert os.listdir(dest) == []


def test_unpack_never_replaces_an_existing_folder(tmp_path: Path):
    archive = pack(make_model(tmp_path / "src" / "m"), tmp_path / "m.tar.gz").path
    dest = tmp_path / "models"
    (dest / "m").mkdir(parents=True)  # even an empty one (rename would replace it)
    with pytest.raises(ArtifactError, match="already exists"):
        unpack(archive, dest, max_bytes=MiB)
    assert os.listdir(dest) == ["m"] and os.listdir(dest / "m") == []


def test_the_temp_folder_of_a_killed_unpack_goes_at_the_next(tmp_path: Path):
    archive = pack(make_model(tmp_path / "src" / "m"), tmp_path / "m[1].tar.gz").path
    dest = tmp_path / "models"
    (dest / ".m[1].tar.gz.unpack-abc123" / "m").mkdir(parents=True)
    assert unpack(archive, dest, max_bytes=MiB) == dest / "m"
    assert os.listdir(dest) == ["m"]


# ---------------------------------------------------------------- check_disk
def test_check_disk_refuses_with_the_numbers(tmp_path: Path):
    free = shutil.disk_usage(tmp_path).free
    check_disk(tmp_path, archive=MiB, unpacked=MiB, current=MiB)
    with pytest.raises(ArtifactError) as err:
        check_disk(tmp_path, archive=free, unpacked=90 * MiB, current=80 * MiB)
    reason = err.value.reason
    assert str(tmp_path) in reason
    assert re.search(r"archive [\d.]+ MiB \+ unpacked 90\.0 MiB \+ current model 80\.0 MiB",
                     reason)
    assert re.search(r"[\d.]+ MiB free", reason)
