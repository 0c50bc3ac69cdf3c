#!/usr/bin/env python3
"""CPU ms per token of onnxruntime-genai models, one intra-op thread, models alternated.

    .venv/bin/python scripts/cpu_per_token.py MODEL_DIR [MODEL_DIR ...] [--rounds 4]

The rows of ``scripts/compare_llama_cpp.py --cpu`` (greedy decode after a short prompt and
after 2,048 tokens, prefill of 512 tokens) plus the prefill of 2,048 tokens, measured the
same way (process CPU time, the engine's session options and prefill chunks), without
llama.cpp: for comparing builds of the model in the project's venv. The first round warms
up and is dropped; the table gives medians and (min-max) over the rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scripts.compare_llama_cpp import CPU_ROWS, PROMPT, genai_cpu_row  # noqa: E402

ROWS = (*CPU_ROWS, ("prefill 2,048 tokens", 2048, 0))


def main() -> int:
    import onnxruntime_genai as og

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", type=Path, nargs="+")
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    overlay = json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": 1, "session.intra_op.allow_spinning": "0"}}}})
    engines: dict[str, Any] = {}
    for path in args.models:
        config = og.Config(str(path))
        config.overlay(overlay)
        engines[str(path)] = og.Model(config)
    words = og.Tokenizer(next(iter(engines.values()))).encode((PROMPT + " ") * 400)
    prompts = {0: list(words[:12]), 512: list(words[:512]), 2048: list(words[:2048])}
    runs: dict[tuple[str, str], list[float]] = {}
    for round_ in range(args.rounds + 1):
        for name, model in engines.items():
            for row, length, tokens in ROWS:
                value = genai_cpu_row(model, prompts[length], tokens)
                runs.setdefault((name, row), []).append(value)
                print(f"round {round_} {name} {row}: {value:.2f}", file=sys.stderr, flush=True)
    print("| model | " + " | ".join(f"{row}, CPU ms/token" for row, _, _ in ROWS) + " |")
    print("|---" * (len(ROWS) + 1) + "|")
    for name in engines:
        cells = []
        for row, _, _ in ROWS:
            kept = runs[(name, row)][1:]
            cells.append(f"{statistics.median(kept):.2f} ({min(kept):.2f}-{max(kept):.2f})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\n{args.rounds} rounds after a warm-up; one thread.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
