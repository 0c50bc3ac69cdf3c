"""The model manifest: what was built, from what, and the sha256 of every file.

A model folder built by ``edgeagent model build`` holds ``edgeagent-manifest.json`` next to
``genai_config.json``. The daemon checks it before loading (``model.verify``): a flipped
byte on the SD card, a truncated copy or a half-finished rsync refuses to start with a
one-line error instead of producing garbage. A plain onnxruntime-genai folder without a
manifest (for instance microsoft/Phi-4-mini-instruct-onnx cpu-int4) still loads, with a
warning.

Runtime module: only the standard library and structlog.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

import structlog

MANIFEST_FILE = "edgeagent-manifest.json"
GENAI_CONFIG_FILE = "genai_config.json"
MANIFEST_FORMAT = 1
CHUNK_SIZE = 1024 * 1024
REBUILD_HINT = "rebuild it with 'edgeagent model build --force'"

log = structlog.get_logger(__name__)

# ONNX TensorProto.DataType -> (name, bytes per element)
_ONNX_DTYPES: dict[int, tuple[str, int]] = {
    1: ("float32", 4),
    2: ("uint8", 1),
    3: ("int8", 1),
    10: ("float16", 2),
    11: ("float64", 8),
    16: ("bfloat16", 2),
    17: ("float8e4m3fn", 1),
}


class ModelIntegrityError(Exception):
    """A model folder that must not be loaded; the message is one line naming the problem."""

    def __init__(self, model_dir: Path, problem: str, *, file: str | None = None) -> None:
        self.model_dir = model_dir
        self.file = file
        super().__init__(f"model {model_dir}: {problem}")


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks (``hashlib.file_digest`` is 3.11+)."""
    digest = hashlib.sha256()
    buf = bytearray(CHUNK_SIZE)
    view = memoryview(buf)
    with path.open("rb", buffering=0) as fh:
        while True:
            n = fh.readinto(buf)
            if not n:
                break
            digest.update(view[:n])
    return digest.hexdigest()


def _model_files(model_dir: Path) -> list[Path]:
    """Every regular file under ``model_dir`` except the manifest and its temp files."""
    out = []
    for path in model_dir.rglob("*"):
        rel = path.relative_to(model_dir).as_posix()
        if rel == MANIFEST_FILE or rel.startswith(f".{MANIFEST_FILE}."):
            continue
        if path.is_file():
            out.append(path)
    return sorted(out, key=lambda p: p.relative_to(model_dir).as_posix())


def read_genai_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / GENAI_CONFIG_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelIntegrityError(
            model_dir, f"not an onnxruntime-genai model folder (no {GENAI_CONFIG_FILE})"
        ) from exc
    except (OSError, ValueError) as exc:
        raise ModelIntegrityError(
            model_dir, f"{GENAI_CONFIG_FILE} is unreadable ({exc})", file=GENAI_CONFIG_FILE
        ) from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("model"), dict):
        raise ModelIntegrityError(
            model_dir, f"{GENAI_CONFIG_FILE} has no 'model' section", file=GENAI_CONFIG_FILE
        )
    return doc


# -- a minimal protobuf walk, enough to read an ONNX graph's input types ---------------------


def _varint(buf: mmap.mmap | bytes, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("malformed varint")


def _fields(buf: mmap.mmap | bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """``(field number, wire type, value or start, end)`` of each field in ``buf[start:end]``.

    For a length-delimited field (wire type 2) the third item is the payload's start and the
    fourth its end; for a varint the third item is the value.
    """
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield field, wire, value, pos
        elif wire == 1:
            pos += 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise ValueError("truncated field")
            yield field, wire, pos, pos + length
            pos += length
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")


@dataclass(frozen=True)
class OnnxValue:
    """An ONNX graph input or output: element type and dimensions (a number or a name)."""

    elem_type: int | None
    dims: tuple[int | str, ...]


def _value_info(buf: mmap.mmap, start: int, end: int) -> tuple[str | None, OnnxValue]:
    """ValueInfoProto: name 1, type 2; TypeProto.tensor_type 1; Tensor.elem_type 1, shape 2;
    TensorShapeProto.dim 1; Dimension.dim_value 1 or dim_param 2."""
    name: str | None = None
    elem_type: int | None = None
    dims: list[int | str] = []
    for f_vi, w_vi, v_start, v_end in _fields(buf, start, end):
        if f_vi == 1 and w_vi == 2:
            name = bytes(buf[v_start:v_end]).decode("utf-8")
        elif f_vi == 2 and w_vi == 2:
            for f_t, w_t, t_start, t_end in _fields(buf, v_start, v_end):
                if f_t != 1 or w_t != 2:
                    continue
                for f_e, w_e, e_val, e_end in _fields(buf, t_start, t_end):
                    if f_e == 1 and w_e == 0:
                        elem_type = e_val
                    elif f_e == 2 and w_e == 2:
                        for f_d, w_d, d_start, d_end in _fields(buf, e_val, e_end):
                            if f_d != 1 or w_d != 2:
                                continue
                            dim: int | str = "?"
                            for f_x, w_x, x_val, x_end in _fields(buf, d_start, d_end):
                                if f_x == 1 and w_x == 0:
                                    dim = x_val
                                elif f_x == 2 and w_x == 2:
                                    dim = bytes(buf[x_val:x_end]).decode("utf-8")
                            dims.append(dim)
    return name, OnnxValue(elem_type, tuple(dims))


def onnx_graph_io(onnx_path: Path) -> tuple[dict[str, OnnxValue], dict[str, OnnxValue]]:
    """The graph's inputs and outputs by name, read without the ``onnx`` package.

    ModelProto.graph is field 7, GraphProto.input 11 and .output 12. The file is
    memory-mapped, so weights embedded in it are skipped, not read.
    """
    inputs: dict[str, OnnxValue] = {}
    outputs: dict[str, OnnxValue] = {}
    with onnx_path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        for field, wire, g_start, g_end in _fields(buf, 0, len(buf)):
            if field != 7 or wire != 2:
                continue
            for f_in, w_in, i_start, i_end in _fields(buf, g_start, g_end):
                if f_in in (11, 12) and w_in == 2:
                    name, value = _value_info(buf, i_start, i_end)
                    if name is not None:
                        (inputs if f_in == 11 else outputs)[name] = value
            break
    return inputs, outputs


def onnx_input_types(onnx_path: Path) -> dict[str, int]:
    """Graph input name -> ONNX element type."""
    inputs, _ = onnx_graph_io(onnx_path)
    return {name: v.elem_type for name, v in inputs.items() if v.elem_type is not None}


def logits_last_position_only(model_dir: Path, genai_config: Mapping[str, Any]) -> bool:
    """True when the decoder returns logits for the last position only (a pruned LM head,
    ``prune_lm_head``): then a prefill costs one vocabulary row, not one per prompt token.
    False when unknown."""
    decoder = genai_config.get("model", {}).get("decoder", {})
    filename = str(decoder.get("filename", "model.onnx"))
    name = str(decoder.get("outputs", {}).get("logits", "logits"))
    try:
        _, outputs = onnx_graph_io(model_dir / filename)
    except (OSError, ValueError, IndexError) as exc:
        log.debug("logits shape not readable from the onnx model", error=str(exc))
        return False
    logits = outputs.get(name)
    return logits is not None and len(logits.dims) == 3 and logits.dims[1] == 1


def _kv_dtype(model_dir: Path, decoder: Mapping[str, Any]) -> tuple[str, int, str]:
    """``(dtype name, bytes per element, how it was found)`` of the decoder's KV cache."""
    filename = str(decoder.get("filename", "model.onnx"))
    inputs = decoder.get("inputs", {})
    key_pattern = str(inputs.get("past_key_names", "past_key_values.%d.key"))
    try:
        key_name = key_pattern % 0
    except (TypeError, ValueError):
        key_name = key_pattern
    onnx_path = model_dir / filename
    try:
        elem = onnx_input_types(onnx_path).get(key_name)
        if elem is not None and elem in _ONNX_DTYPES:
            name, size = _ONNX_DTYPES[elem]
            return name, size, f"onnx input {key_name}"
    except (OSError, ValueError, IndexError) as exc:
        log.debug("kv dtype not readable from the onnx model", path=str(onnx_path), error=str(exc))
    # onnxruntime-genai's genai_config has no KV dtype. The model builder gives CPU models
    # float32 inputs and outputs (int4 only changes the weights), so that is the assumption.
    return "float32", 4, "assumed (cpu model builder default)"


def config_value(config: Mapping[str, Any], *keys: str) -> Any:
    """The value of ``genai_config.json`` at ``keys`` (``"model", "vocab_size"``), None when
    absent."""
    node: Any = config
    for key in keys:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def config_int(config: Mapping[str, Any], *keys: str, fallback: Any = None) -> int:
    """The positive integer at ``keys`` (``fallback`` when absent); a ValueError naming the
    keys otherwise."""
    value = config_value(config, *keys)
    if value is None:
        value = fallback
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{'.'.join(keys)} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class DecoderGeometry:
    """The decoder's shape, from ``genai_config.json``: what a token of KV cache costs."""

    num_hidden_layers: int
    num_key_value_heads: int
    head_size: int
    #: Query heads; 0 when the config does not say.
    num_attention_heads: int


def decoder_geometry(config: Mapping[str, Any]) -> DecoderGeometry:
    """The one reader of the decoder geometry (the planner's ModelMeta and the manifest's
    kv_layout): the KV heads default to the query heads, the head size to hidden_size /
    heads. A ValueError names a missing or invalid value."""
    heads = config_value(config, "model", "decoder", "num_attention_heads")
    hidden = config_value(config, "model", "decoder", "hidden_size")
    head_size_fallback = (
        hidden // heads
        if isinstance(hidden, int) and isinstance(heads, int) and heads > 0
        else None
    )
    return DecoderGeometry(
        num_hidden_layers=config_int(config, "model", "decoder", "num_hidden_layers"),
        num_key_value_heads=config_int(
            config, "model", "decoder", "num_key_value_heads", fallback=heads
        ),
        head_size=config_int(config, "model", "decoder", "head_size",
                             fallback=head_size_fallback),
        num_attention_heads=heads if isinstance(heads, int) and heads > 0 else 0,
    )


def manifest_kv_bytes(model_dir: Path) -> int | None:
    """``kv_layout.bytes_per_element`` of the model's manifest, None without a manifest or
    without that entry; a ValueError when it is unreadable or not a positive integer."""
    path = model_dir / MANIFEST_FILE
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} cannot be read: {exc}") from exc
    layout = manifest.get("kv_layout") if isinstance(manifest, dict) else None
    if not isinstance(layout, dict) or "bytes_per_element" not in layout:
        return None
    value = layout["bytes_per_element"]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"{path}: kv_layout.bytes_per_element must be a positive integer, got {value!r}"
        )
    return value


def read_kv_layout(
    model_dir: Path, genai_config: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The KV cache geometry from ``genai_config.json`` and the ONNX model's input type.

    ``bytes_per_token`` = 2 (key and value) x layers x kv heads x head size x element size:
    what one token of context costs per sequence. Note that onnxruntime-genai with
    ``search.past_present_share_buffer`` allocates it for ``max_length`` tokens up front.
    """
    config = genai_config if genai_config is not None else read_genai_config(model_dir)
    try:
        geometry = decoder_geometry(config)
    except ValueError as exc:
        raise ModelIntegrityError(
            model_dir,
            f"{GENAI_CONFIG_FILE} lacks the decoder geometry ({exc})",
            file=GENAI_CONFIG_FILE,
        ) from exc
    dtype, size, dtype_source = _kv_dtype(model_dir, config["model"].get("decoder", {}))
    layers, kv_heads, head_size = (
        geometry.num_hidden_layers, geometry.num_key_value_heads, geometry.head_size
    )
    return {
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "head_size": head_size,
        "dtype": dtype,
        "dtype_source": dtype_source,
        "bytes_per_element": size,
        "bytes_per_token": 2 * layers * kv_heads * head_size * size,
    }


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, doc: Mapping[str, Any]) -> None:
    """Write ``doc`` as JSON to ``path`` atomically (``write_text_atomic``)."""
    write_text_atomic(path, json.dumps(doc, indent=2, sort_keys=False) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file in the same folder, fsync, os.replace,
    fsync of the folder: a reader sees the old file or the new one, never a part."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_manifest(
    model_dir: Path, *, model_id: str, source: dict[str, Any], precision: str
) -> dict[str, Any]:
    """Hash every file of ``model_dir`` and write its manifest; returns the manifest."""
    config = read_genai_config(model_dir)
    model = config["model"]
    files = {
        path.relative_to(model_dir).as_posix(): {
            "sha256": sha256_file(path),
            "size": path.stat().st_size,
        }
        for path in _model_files(model_dir)
    }
    provider = "cpu"
    options = model.get("decoder", {}).get("session_options", {}).get("provider_options", [])
    if options and isinstance(options[0], dict) and options[0]:
        provider = str(next(iter(options[0])))
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "model_id": model_id,
        "source": source,
        "precision": precision,
        "execution_provider": provider,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "context_length": int(model.get("context_length") or 0) or None,
        "kv_layout": read_kv_layout(model_dir, config),
        "files": files,
    }
    write_json_atomic(model_dir / MANIFEST_FILE, manifest)
    return manifest


def _safe_relpath(name: str) -> bool:
    pure = PurePosixPath(name)
    return bool(name) and not pure.is_absolute() and ".." not in pure.parts


def read_manifest(model_dir: Path) -> dict[str, Any] | None:
    """The manifest of ``model_dir``, None when it has none; malformed: ModelIntegrityError."""
    path = model_dir / MANIFEST_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ModelIntegrityError(
            model_dir, f"{MANIFEST_FILE} is unreadable ({exc}); {REBUILD_HINT}", file=MANIFEST_FILE
        ) from exc
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("sha256"), str) and isinstance(v.get("size"), int)
        for v in files.values()
    ):
        raise ModelIntegrityError(
            model_dir, f"{MANIFEST_FILE} is malformed; {REBUILD_HINT}", file=MANIFEST_FILE
        )
    if doc.get("format") != MANIFEST_FORMAT:
        raise ModelIntegrityError(
            model_dir,
            f"{MANIFEST_FILE} has format {doc.get('format')!r}, this edgeagent reads "
            f"{MANIFEST_FORMAT}; {REBUILD_HINT}",
            file=MANIFEST_FILE,
        )
    bad = next((name for name in files if not _safe_relpath(name)), None)
    if bad is not None:
        raise ModelIntegrityError(
            model_dir, f"{MANIFEST_FILE} lists a path outside the folder: {bad!r}", file=bad
        )
    manifest: dict[str, Any] = doc
    return manifest


def verify_model(model_dir: Path, *, check_hashes: bool = True) -> dict[str, Any] | None:
    """Check ``model_dir`` against its manifest before it is loaded.

    Returns the manifest when every listed file is present with its size (and, with
    ``check_hashes``, its sha256); None, with a warning, for an onnxruntime-genai folder
    that has no manifest. Raises ModelIntegrityError otherwise. Files not listed in the
    manifest are ignored.
    """
    if not model_dir.is_dir():
        what = "does not exist" if not model_dir.exists() else "is not a folder"
        raise ModelIntegrityError(
            model_dir, f"not an onnxruntime-genai model folder (the path {what})"
        )
    if not (model_dir / GENAI_CONFIG_FILE).is_file():
        raise ModelIntegrityError(
            model_dir, f"not an onnxruntime-genai model folder (no {GENAI_CONFIG_FILE})"
        )
    manifest = read_manifest(model_dir)
    if manifest is None:
        log.warning("model has no manifest; loading it unverified", model=str(model_dir))
        return None
    files: dict[str, dict[str, Any]] = manifest["files"]
    names = sorted(files)
    # Cheap checks first: a missing or truncated file fails before anything is hashed.
    for name in names:
        path = model_dir / name
        try:
            size = path.stat().st_size
        except FileNotFoundError as exc:
            raise ModelIntegrityError(
                model_dir, f"file {name} listed in its manifest is missing; {REBUILD_HINT}",
                file=name,
            ) from exc
        if size != files[name]["size"]:
            raise ModelIntegrityError(
                model_dir,
                f"file {name} does not match its manifest (size {size}, expected "
                f"{files[name]['size']}); {REBUILD_HINT}",
                file=name,
            )
    if check_hashes:
        for name in names:
            actual = sha256_file(model_dir / name)
            expected = files[name]["sha256"]
            if actual != expected:
                raise ModelIntegrityError(
                    model_dir,
                    f"file {name} does not match its manifest (sha256 {actual[:12]}…, "
                    f"expected {expected[:12]}…); {REBUILD_HINT}",
                    file=name,
                )
    return manifest


def fingerprint(manifest: Mapping[str, Any]) -> str:
    """A short id of the model's exact bytes: the first 12 hex of the sha256 of its
    ``sha256sum``-style listing (``<sha256>  <path>\\n`` per file, sorted by path)."""
    files: Mapping[str, Mapping[str, Any]] = manifest.get("files", {})
    listing = "".join(f"{files[name]['sha256']}  {name}\n" for name in sorted(files))
    return hashlib.sha256(listing.encode("utf-8")).hexdigest()[:12]


def manifest_summary(manifest: Mapping[str, Any] | None) -> dict[str, Any]:
    """What telemetry and /health report about the model; all None for an unverified one."""
    if manifest is None:
        return {"model_id": None, "sha256": None, "precision": None}
    return {
        "model_id": manifest.get("model_id"),
        "sha256": fingerprint(manifest),
        "precision": manifest.get("precision"),
    }
