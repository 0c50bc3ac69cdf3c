"""The default model holds the GGUF's own weights (edgeagent.gguf_weights): Q4_1 blocks
written as MatMulNBits over the input and its block sums, Q8_0 as 8-bit, checked with the
real onnxruntime kernel and on the real default model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeagent import gguf_weights as gw
from edgeagent.convert import GGUF_WEIGHTS, fetch_gguf
from edgeagent.manifest import MANIFEST_FILE
from tests import quality

RNG = np.random.default_rng(7)


def _q4_1_raw(rows: int, cols: int) -> np.ndarray:
    """Random Q4_1 blocks as llama.cpp lays them out (d, m as float16, then 16 bytes)."""
    blocks = np.zeros((rows, cols // 32, 20), np.uint8)
    d = (RNG.random((rows, cols // 32)) * 0.02 + 0.001).astype(np.float16)
    # as in a real model: most blocks hold zero (-m/d in 0..15); one in 16 lies all on one
    # side, so that round(-m/d) leaves 0..15
    ratio = RNG.random((rows, cols // 32)) * 15
    ratio[RNG.random(ratio.shape) < 1 / 16] *= -0.3
    m = (-ratio * d.astype(np.float32)).astype(np.float16)
    blocks[..., 0:2] = d[..., None].view(np.uint8)
    blocks[..., 2:4] = m[..., None].view(np.uint8)
    blocks[..., 4:20] = RNG.integers(0, 256, (rows, cols // 32, 16), dtype=np.uint8)
    return blocks.reshape(rows, -1)


def _dequantize_like_llama_cpp(raw: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """llama.cpp's dequantize_row_q4_1, written out element by element."""
    out = np.zeros((rows, cols), np.float32)
    blocks = raw.reshape(rows, cols // 32, 20)
    for r in range(rows):
        for b in range(cols // 32):
            d = float(blocks[r, b, 0:2].view(np.float16)[0])
            m = float(blocks[r, b, 2:4].view(np.float16)[0])
            for j in range(16):
                byte = int(blocks[r, b, 4 + j])
                out[r, b * 32 + j] = (byte & 0x0F) * d + m
                out[r, b * 32 + j + 16] = (byte >> 4) * d + m
    return out


def test_q4_1_blocks_read_as_llama_cpp_lays_them_out() -> None:
    raw = _q4_1_raw(3, 64)
    np.testing.assert_allclose(gw.read_q4_1(raw, 3, 64).dense(),
                               _dequantize_like_llama_cpp(raw, 3, 64), rtol=0, atol=1e-6)


def test_llama_rows_undo_llama_cpp_rotary_permutation() -> None:
    heads, half, k = 3, 4, 5
    hf = RNG.random((heads * 2 * half, k)).astype(np.float32)
    # llama.cpp's convert_hf_to_gguf permute: each head's two rotary halves interleaved
    stored = hf.reshape(heads, 2, half, k).swapaxes(1, 2).reshape(hf.shape)
    np.testing.assert_array_equal(stored[gw.llama_rows(len(hf), heads)], hf)


def _run(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], x: np.ndarray,
         out: str) -> np.ndarray:
    """Run ``nodes`` in onnxruntime on a [1, 1, K] input ``x``."""
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, x.shape[-1]])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y: np.ndarray = session.run(None, {"x": x.reshape(1, 1, -1)})[0]
    return y.reshape(x.shape[0], -1)


def _run_matmul_nbits(joined: gw.Joined, x: np.ndarray, accuracy_level: int) -> np.ndarray:
    """The real onnxruntime kernel on the rewritten graph's ``[x, block sums of x, ...]``."""
    n, k = joined.b.shape[0], x.shape[-1]
    nodes, constants, xs = gw.block_sum_nodes("x", k, "/sums")
    nodes.append(helper.make_node("MatMulNBits", [xs, "b", "s"], ["y"], domain="com.microsoft",
                                  K=joined.k, N=n, bits=4, block_size=32,
                                  accuracy_level=accuracy_level))
    inits = [*constants, numpy_helper.from_array(joined.b, "b"),
             numpy_helper.from_array(joined.scales, "s")]
    return _run(nodes, inits, x, "y")


@pytest.mark.parametrize("cols", [576, 1536])  # the model's two K: 18 and 48 block sums
def test_joined_weight_computes_the_q4_1_product_in_onnxruntime(cols: int) -> None:
    rows = 40
    w = gw.read_q4_1(_q4_1_raw(rows, cols), rows, cols)
    x = RNG.standard_normal((1, cols)).astype(np.float32)
    exact = x @ w.dense().T
    joined = gw.join_q4_1(w)
    requantized_error = np.abs(x @ _symmetric_int4(w.dense()).T - exact).max()
    # fp32 activations: only the 4-bit residual columns differ from the exact product
    error = np.abs(_run_matmul_nbits(joined, x, accuracy_level=1) - exact).max()
    assert error < requantized_error / 5, (error, requantized_error)
    # int8 activations (the model's accuracy_level 4) stay well under the builder's error
    error8 = np.abs(_run_matmul_nbits(joined, x, accuracy_level=4) - exact).max()
    assert error8 < requantized_error / 4, (error8, requantized_error)


def _symmetric_int4(w: np.ndarray) -> np.ndarray:
    """What the model builder does to the dequantized weights: symmetric INT4 RTN per 32."""
    b = w.reshape(-1, 32)
    peak = b[np.arange(len(b)), np.abs(b).argmax(1)][:, None]
    scale = np.where(peak == 0, 1.0, peak / -8)
    out: np.ndarray = (np.clip(np.round(b / scale), -8, 7) * scale).reshape(w.shape)
    return out


def test_the_residual_columns_hold_the_minimums() -> None:
    rows, cols = 8, 576
    w = gw.read_q4_1(_q4_1_raw(rows, cols), rows, cols)
    dense = gw.join_q4_1(w).dense()
    # The integer part, d * (q - 8), is the weight up to one constant per block ...
    main = dense[:, :cols]
    residual = (w.dense() - main).reshape(rows, cols // 32, 32)
    assert np.ptp(residual, axis=-1).max() < 1e-6
    # ... which the coarse and the fine extra columns hold between them, to 1/196 of the
    # row's largest (coarse scale <= peak / 7, fine scale <= coarse / 14, error <= fine / 2)
    width = gw.sum_columns(cols)
    coarse, fine = dense[:, cols:cols + 18], dense[:, cols + width:cols + width + 18]
    peak = np.abs(residual[..., 0]).max(axis=1, keepdims=True)
    assert np.all(np.abs(coarse + fine - residual[..., 0]) <= peak / 196 + 1e-7)
    assert np.abs(coarse - residual[..., 0]).max() > peak.min() / 196  # the fine part counts
    # ... and the padding to whole blocks weighs exactly nothing.
    assert dense.shape[1] == cols + 2 * 32
    assert not dense[:, cols + 18:cols + width].any()
    assert not dense[:, cols + width + 18:].any()


@pytest.mark.parametrize(("cols", "padded"), [(576, 32), (1536, 64)])
def test_block_sums_fill_whole_blocks(cols: int, padded: int) -> None:
    x = RNG.standard_normal((1, cols)).astype(np.float32)
    nodes, constants, out = gw.block_sum_nodes("x", cols, "/sums")
    got = _run(nodes, constants, x, out)  # the rewritten graph's nodes, in onnxruntime
    assert gw.sum_columns(cols) == padded and got.shape[1] == cols + 2 * padded
    np.testing.assert_array_equal(got[:, :cols], x)
    sums = got[:, cols:]
    want = x.reshape(1, -1, 32).sum(-1)
    for copy in (0, padded):  # the sums, then zeros, twice
        np.testing.assert_allclose(sums[:, copy:copy + cols // 32], want, atol=1e-4)
        assert not sums[:, copy + cols // 32:copy + padded].any()


@pytest.mark.model
def test_default_model_holds_the_ggufs_weights(default_model: Path) -> None:
    """Every layer weight of the built model, decoded from model.onnx, is the GGUF's block
    for block, and lm_head is its Q8_0 table at 8 bits."""
    manifest = json.loads((default_model / MANIFEST_FILE).read_text())
    assert manifest["source"]["weights"] == GGUF_WEIGHTS
    source = gw._Gguf(fetch_gguf(default_model.parent / ".cache", lambda _line: None))
    model = onnx.load(str(default_model / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    for layer in (0, 17, 29):
        for proj, names in (("attn/qkv_proj", ("attn_q", "attn_k", "attn_v")),
                            ("mlp/down_proj", ("ffn_down",))):
            node = nodes[f"/model/layers.{layer}/{proj}/MatMul_Q4"]
            n = next(a.i for a in node.attribute if a.name == "N")
            k = next(a.i for a in node.attribute if a.name == "K")
            assert len(node.input) == 3  # no zero points: onnxruntime's fastest kernel
            joined = gw.Joined(inits[node.input[1]], inits[node.input[2]], k)
            want = np.concatenate([source.q4_1(f"blk.{layer}.{name}.weight").dense()
                                   for name in names])
            cols = want.shape[1]
            dense = joined.dense()
            width = gw.sum_columns(cols)
            assert dense.shape == (n, cols + 2 * width)
            # main columns plus the block's residual columns give the GGUF's weight, but for
            # the residuals' own rounding: 10x closer than the builder's re-quantization
            residual = dense[:, cols:cols + cols // 32] + dense[:, cols + width:][:, :cols // 32]
            got = dense[:, :cols] + np.repeat(residual, 32, axis=1)
            error = np.abs(got - want).mean()
            assert error < np.abs(_symmetric_int4(want) - want).mean() / 10, (layer, proj)
    head = nodes["/lm_head/MatMul_Q4"]
    assert next(a.i for a in head.attribute if a.name == "bits") == 8
    raw, rows, cols = source.tensor("token_embd.weight", "Q8_0")
    d, q = gw.read_q8_0(raw, rows, cols)
    np.testing.assert_array_equal(inits[head.input[1]].reshape(rows, cols).astype(np.int16) - 128,
                                  q)
    np.testing.assert_array_equal(inits[head.input[2]].reshape(d.shape), d)


@pytest.mark.model
def test_default_model_is_as_good_as_its_gguf(default_model: Path) -> None:
    """Perplexity on fixed prose: the GGUF's own weights give 43.6 here (an INT8 build of
    the same GGUF 43.6), the builder's re-quantized INT4 gave 49.9 (and 89.7 against
    llama.cpp's 64.2 on 1,024 tokens of docs: docs/tool-calling.md)."""
    perplexity = quality.perplexity(default_model)
    assert perplexity < 46.5, perplexity
