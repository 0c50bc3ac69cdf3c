"""The default model's attention runs on onnxruntime's GEMM kernel (edgeagent.gqa_decode):
the softmax scale moved onto the query, a smooth softmax made exact by a shift of the
scores. Checked with the real onnxruntime kernels on a builder-shaped graph, and on a copy of
the real default model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeagent import gqa_decode
from edgeagent.convert import GQA_DECODE, SANITY_PROMPT
from edgeagent.manifest import MANIFEST_FILE
from tests import quality

RNG = np.random.default_rng(13)
HEADS, KV_HEADS, HIDDEN, BLOCK = 4, 2, 256, 32


def _rotary(positions: int, head_size: int) -> tuple[np.ndarray, np.ndarray]:
    inv = 1.0 / (10000 ** (np.arange(0, head_size, 2) / head_size))
    angles = np.outer(np.arange(positions), inv)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _builder_graph(folder: Path, head_size: int = 64) -> None:
    """What the model builder writes for one layer: a 4-bit MatMulNBits projecting packed
    q/k/v, then a rotary GroupQueryAttention on a float32 past/present KV cache; saved with
    its weights in model.onnx.data like the real model."""
    n = (HEADS + 2 * KV_HEADS) * head_size
    blocks = HIDDEN // BLOCK
    packed = RNG.integers(0, 256, size=(n, blocks, BLOCK // 2), dtype=np.uint8)
    scales = (RNG.random(n * blocks, dtype=np.float32) * 0.02 + 0.01).astype(np.float32)
    cos, sin = _rotary(64, head_size)
    inits = [numpy_helper.from_array(packed, "qkv.weight"),
             numpy_helper.from_array(scales, "qkv.scales"),
             numpy_helper.from_array(cos, "cos_cache"), numpy_helper.from_array(sin, "sin_cache")]
    nodes = [
        helper.make_node("MatMulNBits", ["x", "qkv.weight", "qkv.scales"], ["qkv"],
                         domain="com.microsoft", K=HIDDEN, N=n, bits=4, block_size=BLOCK,
                         accuracy_level=4, name="/model/layers.0/attn/qkv_proj/MatMul_Q4"),
        helper.make_node("GroupQueryAttention",
                         ["qkv", "", "", "past_key_values.0.key", "past_key_values.0.value",
                          "seqlens_k", "total_seq_len", "cos_cache", "sin_cache", "", "", ""],
                         ["attn", "present.0.key", "present.0.value"], domain="com.microsoft",
                         num_heads=HEADS, kv_num_heads=KV_HEADS,
                         scale=float(1 / np.sqrt(head_size)), local_window_size=-1, softcap=0.0,
                         do_rotary=1, rotary_interleaved=0,
                         name="/model/layers.0/attn/GroupQueryAttention"),
    ]
    kv = ["batch", KV_HEADS, "past", head_size]
    graph = helper.make_graph(
        nodes, "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", HIDDEN]),
         helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, kv),
         helper.make_tensor_value_info("past_key_values.0.value", TensorProto.FLOAT, kv),
         helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
         helper.make_tensor_value_info("total_seq_len", TensorProto.INT32, [])],
        [helper.make_tensor_value_info("attn", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("present.0.value", TensorProto.FLOAT, None)],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(folder / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0)


def _prompt_then_decode(folder: Path, x: np.ndarray, head_size: int = 64) -> list[np.ndarray]:
    """Attention outputs for a prompt (empty past), then one decode step on its present."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(folder / "model.onnx"), options,
                                   providers=["CPUExecutionProvider"])
    prompt = x.shape[1] - 1
    empty = np.zeros((1, KV_HEADS, 0, head_size), np.float32)
    out, key, value = session.run(None, {
        "x": x[:, :prompt], "past_key_values.0.key": empty, "past_key_values.0.value": empty,
        "seqlens_k": np.array([prompt - 1], np.int32),
        "total_seq_len": np.array(prompt, np.int32)})
    step, _, _ = session.run(None, {
        "x": x[:, prompt:], "past_key_values.0.key": key, "past_key_values.0.value": value,
        "seqlens_k": np.array([prompt], np.int32),
        "total_seq_len": np.array(prompt + 1, np.int32)})
    return [out, step]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_steered_attention_computes_the_same_attention(tmp_path: Path) -> None:
    """Prompt and decode outputs of the rewritten layer match the builder's to float32
    rounding, with the real kernels (the flash kernel before, the GEMM kernel after)."""
    _builder_graph(tmp_path / "built")
    shutil.copytree(tmp_path / "built", tmp_path / "steered")
    done = gqa_decode.steer(tmp_path / "steered", lambda _line: None)
    assert done == {"attention_nodes": 1, "scale": 0.125}
    x = RNG.standard_normal((1, 9, HIDDEN)).astype(np.float32)
    for want, got in zip(_prompt_then_decode(tmp_path / "built", x),
                         _prompt_then_decode(tmp_path / "steered", x), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_scale_moves_onto_the_query_and_the_weights_stay(tmp_path: Path) -> None:
    """The softmax scale multiplies the query columns only, the node's scale is 1, its
    smooth softmax is on, the shift feeds its bias input, and model.onnx.data (the weights)
    is not rewritten."""
    _builder_graph(tmp_path)
    data = (tmp_path / "model.onnx.data").read_bytes()
    gqa_decode.steer(tmp_path, lambda _line: None)
    assert (tmp_path / "model.onnx.data").read_bytes() == data
    after = onnx.load(str(tmp_path / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in after.graph.initializer}
    node = next(n for n in after.graph.node if n.op_type == "GroupQueryAttention")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["scale"] == 1.0 and attrs["smooth_softmax"] == 1
    producers = {out: n for n in after.graph.node for out in n.output}
    mul = producers[node.input[0]]
    assert mul.op_type == "Mul" and mul.input[0] == "qkv"
    q = HEADS * 64
    np.testing.assert_array_equal(inits[mul.input[1]],
                                  [0.125] * q + [1.0] * (2 * KV_HEADS * 64))
    shift = producers[node.input[10]]
    assert shift.op_type == "ConstantOfShape"
    value = numpy_helper.to_array(next(a.t for a in shift.attribute if a.name == "value"))
    assert value.tolist() == [gqa_decode.SCORE_SHIFT]


def test_the_shift_makes_the_smooth_softmax_a_softmax() -> None:
    """A smooth softmax adds exp(-max) to the denominator: after the shift it is below
    float32's resolution for any row whose best score is above -47."""
    scores = np.array([-47.0, -60.0, -80.0], np.float32) + np.float32(gqa_decode.SCORE_SHIFT)
    e = np.exp(scores - scores.max())
    assert np.float32(e.sum()) + np.float32(np.exp(-scores.max())) == np.float32(e.sum())


@pytest.mark.parametrize("head_size", [48, 64])
def test_an_unexpected_graph_is_left_alone(tmp_path: Path, head_size: int) -> None:
    """A scale that is no power of two (head size 48), or a graph already steered: an
    error, and not a byte written."""
    _builder_graph(tmp_path, head_size)
    if head_size == 64:
        gqa_decode.steer(tmp_path, lambda _line: None)
    before = _files(tmp_path)
    with pytest.raises(gqa_decode.GqaDecodeError):
        gqa_decode.steer(tmp_path, lambda _line: None)
    assert _files(tmp_path) == before


@pytest.mark.model
def test_steered_default_model_answers_and_reads_as_before(default_model: Path,
                                                          tmp_path: Path) -> None:
    """On a copy of the default model (steered here unless it already is): the sanity answer,
    and the perplexity of fixed prose within 1% of the default's."""
    import onnxruntime_genai as og

    copy = tmp_path / "model"
    shutil.copytree(default_model, copy)
    source = json.loads((default_model / MANIFEST_FILE).read_text())["source"]
    if source.get("attention") != GQA_DECODE:
        gqa_decode.steer(copy, lambda _line: None)

    def perplexity_and_answer(folder: Path) -> tuple[float, str]:
        model = og.Model(str(folder))
        tokenizer = og.Tokenizer(model)
        prompt = tokenizer.apply_chat_template(
            json.dumps([{"role": "user", "content": SANITY_PROMPT}]), add_generation_prompt=True)
        chat = tokenizer.encode(prompt)
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(chat) + 8, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(chat)
        tokens: list[int] = []
        while not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        return quality.perplexity(folder), str(tokenizer.decode(tokens))

    base_ppl, _ = perplexity_and_answer(default_model)
    ppl, answer = perplexity_and_answer(copy)
    assert "Paris" in answer
    assert abs(ppl - base_ppl) < 0.01 * base_ppl, (ppl, base_ppl)
