#!/usr/bin/env python3
"""Quality of an onnxruntime-genai build against the GGUF it was converted from, on the same
tokens: perplexity, greedy next-token agreement and the KL divergence of their next-token
distributions (GGUF || ONNX).

    # 1. the ONNX side (the project's venv): tokenizes the text, one token per step
    .venv/bin/python scripts/compare_quality.py genai MODEL_DIR --out /tmp/q/int4.npz
    # 2. the GGUF side (a venv with llama-cpp-python), on the very same token ids
    /path/to/llama-venv/bin/python scripts/compare_quality.py gguf FILE.gguf \\
        --ids /tmp/q/int4.npz --out /tmp/q/gguf.npz
    # 3. the figures (either venv: numpy only)
    python scripts/compare_quality.py compare /tmp/q/gguf.npz /tmp/q/int4.npz ...

The first file of ``compare`` is the reference. The text defaults to this repository's
docs (English prose about the gateway); ``--text`` takes another. The default model
returns logits for the last position only (``prune_lm_head``), so the ONNX side feeds one
token per step: the same computation as decoding.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
TEXTS = [REPO / "docs" / "architecture.md", REPO / "docs" / "engine-notes.md"]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    out: np.ndarray = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return out


def save(out: Path, ids: np.ndarray, logits: np.ndarray) -> None:
    """Token ids and, per position, the log-distribution of the next token (float16: the
    KL only needs it to a few digits)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, ids=ids, logp=log_softmax(logits).astype(np.float16))


def genai(args: argparse.Namespace) -> None:
    import onnxruntime_genai as og

    model = og.Model(str(args.model))
    tok = og.Tokenizer(model)
    text = "\n\n".join(p.read_text() for p in args.text)
    ids = np.array(tok.encode(text)[: args.tokens], dtype=np.int32)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 1)
    gen = og.Generator(model, params)
    rows = []
    for t in ids:  # one token per step: the pruned head gives the last position only
        gen.append_tokens(np.array([t], dtype=np.int32))
        rows.append(np.array(gen.get_logits(), dtype=np.float32).reshape(-1))
    save(args.out, ids, np.stack(rows))


def gguf(args: argparse.Namespace) -> None:
    # Only in the llama-cpp-python venv, never in the project's.
    from llama_cpp import Llama  # type: ignore[import-not-found,unused-ignore]

    ids = np.load(args.ids)["ids"]
    llm = Llama(model_path=str(args.model), n_ctx=len(ids) + 8, logits_all=True,
                n_threads=args.threads, n_batch=512, verbose=False)
    llm.eval([int(t) for t in ids])
    save(args.out, ids, np.array(llm.scores[: len(ids)], dtype=np.float32))


def figures(ref: dict[str, Any], other: dict[str, Any]) -> dict[str, float]:
    ids = ref["ids"]
    if not np.array_equal(ids, other["ids"]):
        raise SystemExit("the two files hold different tokens")
    nxt = ids[1:]
    p, q = ref["logp"][:-1].astype(np.float64), other["logp"][:-1].astype(np.float64)
    pos = np.arange(len(nxt))
    kl = (np.exp(p) * (p - q)).sum(axis=-1)
    return {
        "ppl": float(np.exp(-q[pos, nxt].mean())),
        "agree": float((p.argmax(-1) == q.argmax(-1)).mean()),
        "kl": float(kl.mean()),
    }


def compare(args: argparse.Namespace) -> None:
    ref = dict(np.load(args.files[0]))
    print(f"{len(ref['ids'])} tokens; reference {args.files[0].name}")
    print("| model | perplexity | greedy agreement with ref | KL(ref‖model) nats/token |")
    print("|---|---|---|---|")
    for path in args.files:
        f = figures(ref, dict(np.load(path)))
        print(f"| {path.stem} | {f['ppl']:.3f} | {f['agree']:.3f} | {f['kl']:.4f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("genai", help="the ONNX model's distributions")
    g.add_argument("model", type=Path)
    g.add_argument("--text", type=Path, nargs="+", default=TEXTS)
    g.add_argument("--tokens", type=int, default=1024)
    g.add_argument("--out", type=Path, required=True)
    f = sub.add_parser("gguf", help="the GGUF's distributions on the same tokens")
    f.add_argument("model", type=Path)
    f.add_argument("--ids", type=Path, required=True, help="an output of genai")
    f.add_argument("--threads", type=int, default=1)
    f.add_argument("--out", type=Path, required=True)
    c = sub.add_parser("compare", help="the figures, the first file as the reference")
    c.add_argument("files", type=Path, nargs="+")
    args = ap.parse_args(argv)
    {"genai": genai, "gguf": gguf, "compare": compare}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
