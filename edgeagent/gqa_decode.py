"""Put onnxruntime's CPU GroupQueryAttention on its faster path for long contexts.

onnxruntime 1.32 runs a float32 GroupQueryAttention on CPU through one of two kernels. Its
flash-attention kernel (MLAS ``MlasFlashAttentionGQA``: tiled online softmax, a GEMV loop
for one-token decode) is the default; the older kernel (one MLAS GEMM per head for QK',
a softmax, one GEMM for the probabilities times V) is taken when the node asks for
something the flash kernel does not do: a softcap, a smooth softmax or the QK output. On
this model, one thread, the older kernel decodes a token after 2,048 tokens in 24 ms of CPU
against the flash kernel's 31-33 (and prefills 3-7% faster), provided the softmax scale is
1: with M = 1 and alpha = 1 MLAS's SGEMM takes its one-row kernel, otherwise it packs K
for every head (30 ms). (docs/engine-notes.md, "The attention kernel".)

This step rewrites the built graph so that every GroupQueryAttention takes that path and
still computes plain attention:

* the softmax scale 1/sqrt(head_size) (a power of two for the head size 64) moves onto the
  query: a Mul of the packed q/k/v input by [scale] * q columns + [1] * k/v columns, exact
  (a power of two; rotary is linear), and the node gets ``scale = 1``. The weights stay the
  GGUF's blocks (folding the scale into the query rows' MatMulNBits scales measured the
  same);
* the node gets ``smooth_softmax = 1``, which selects the older kernel. A smooth softmax
  adds exp(0 - max) to the denominator; with every score shifted up by
  :data:`SCORE_SHIFT` (an ``attention_bias`` of that constant, [1, 1, S, T], made once per
  run from the node's own query and total-length inputs), that term is below float32's
  resolution against the sum (>= 1) and drops out, and softmax does not change under a
  shift. What is left is the rounding of the shifted scores: ~4e-6 relative in the
  probabilities, far below the INT4 weights' own.

The graph is checked, not assumed: every GroupQueryAttention must be the builder's packed,
rotary, float32 one, with no softcap, smooth softmax, attention bias or sink, and a scale
that is a power of two, or nothing is written.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

Progress = Callable[[str], None]

#: Added to every attention score. Large enough that exp(-(max score + shift)) is below
#: float32's epsilon for any row whose largest score is above -47 (scores are q.k/8:
#: some key always scores higher), small enough to cost little precision (scores
#: between 64 and 128 keep 7.6e-6 of absolute resolution).
SCORE_SHIFT = 64.0

_PREFIX = "/edgeagent/gqa_decode"
_MS_DOMAIN = "com.microsoft"
_BIAS_INPUT = 10


class GqaDecodeError(RuntimeError):
    """The built graph is not the builder's GroupQueryAttention graph this step knows."""


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _set_attr(node: onnx.NodeProto, name: str, value: float | int) -> None:
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend([*kept, helper.make_attribute(name, value)])


def _power_of_two(value: float) -> bool:
    return value > 0 and math.frexp(value)[0] == 0.5


def steer(model_dir: Path, progress: Progress) -> dict[str, Any]:
    """Rewrite ``model_dir``'s model.onnx (and its data file) as described above.

    Returns what was done (``attention_nodes``, ``scale``). Raises GqaDecodeError, without
    writing anything, when the graph is not the one expected.
    """
    model = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    new_nodes: list[onnx.NodeProto] = []
    scales: dict[tuple[float, int, int], str] = {}  # (scale, q columns, all) -> Mul vector
    bias = ""
    scale = 0.0
    count = 0
    for node in graph.node:
        if node.op_type != "GroupQueryAttention":
            new_nodes.append(node)
            continue
        head_size = _check(node, inits)
        scale = float(_attr(node, "scale", 0.0)) or 1.0 / math.sqrt(head_size)
        if not _power_of_two(scale):
            raise GqaDecodeError(f"{node.name}: softmax scale {scale} is not a power of two")
        heads, kv_heads = int(_attr(node, "num_heads")), int(_attr(node, "kv_num_heads"))
        key = (scale, heads * head_size, (heads + 2 * kv_heads) * head_size)
        if key not in scales:
            scales[key] = f"{_PREFIX}/query_scale/{len(scales)}"
            vector = np.ones(key[2], np.float32)
            vector[:key[1]] = scale
            graph.initializer.append(numpy_helper.from_array(vector, scales[key]))
        if not bias:
            bias = _bias_nodes(node, new_nodes, graph)
        scaled = f"{node.input[0]}/scaled"
        new_nodes.append(helper.make_node("Mul", [node.input[0], scales[key]], [scaled],
                                          name=f"{node.name}/ScaleQuery"))
        node.input[0] = scaled
        _set_attr(node, "scale", 1.0)
        _set_attr(node, "smooth_softmax", 1)
        while len(node.input) <= _BIAS_INPUT:
            node.input.append("")
        node.input[_BIAS_INPUT] = bias
        new_nodes.append(node)
        count += 1
    if not count:
        raise GqaDecodeError("no GroupQueryAttention in the graph")
    del graph.node[:]
    graph.node.extend(new_nodes)
    _save(model, model_dir)
    progress(f"    {count} attention nodes on onnxruntime's GEMM kernel (softmax scale {scale} "
             f"applied to the query, scores shifted by {SCORE_SHIFT:g})")
    return {"attention_nodes": count, "scale": scale}


def _check(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> int:
    """head_size of the builder's packed, rotary, float32 GroupQueryAttention."""
    if node.domain != _MS_DOMAIN:
        raise GqaDecodeError(f"{node.name}: not com.microsoft's GroupQueryAttention")
    inputs = list(node.input) + [""] * (12 - len(node.input))
    if inputs[1] or inputs[2]:
        raise GqaDecodeError(f"{node.name}: q, k and v are not packed in one input")
    if _attr(node, "do_rotary", 0) != 1 or inputs[7] not in inits or inputs[8] not in inits:
        raise GqaDecodeError(f"{node.name}: no rotary cos/sin caches on the node")
    if any(inputs[9:]) or _attr(node, "k_quant_type", b"NONE") not in (b"NONE", "NONE"):
        raise GqaDecodeError(f"{node.name}: already has position ids, a bias, a sink or a "
                             "quantized cache")
    if float(_attr(node, "softcap", 0.0)) != 0.0 or int(_attr(node, "smooth_softmax", 0)) \
            or int(_attr(node, "qk_output", 0)):
        raise GqaDecodeError(f"{node.name}: softcap, smooth softmax or QK output already set")
    if inits[inputs[7]].data_type != TensorProto.FLOAT:
        raise GqaDecodeError(f"{node.name}: not a float32 attention")
    return 2 * int(inits[inputs[7]].dims[-1])  # cos_cache: [positions, head_size / 2]


def _bias_nodes(node: onnx.NodeProto, nodes: list[onnx.NodeProto],
                graph: onnx.GraphProto) -> str:
    """The [1, 1, S, T] attention bias of SCORE_SHIFT, S from the node's query input
    ([B, S, hidden]) and T from its total_sequence_length input (an int32 scalar)."""
    p = _PREFIX
    graph.initializer.extend([
        numpy_helper.from_array(np.array([1], np.int64), f"{p}/one"),
        numpy_helper.from_array(np.array([2], np.int64), f"{p}/two"),
        numpy_helper.from_array(np.array([1, 1], np.int64), f"{p}/ones"),
    ])
    nodes.extend([
        helper.make_node("Shape", [node.input[0]], [f"{p}/query_shape"], name=f"{p}/Shape"),
        helper.make_node("Slice", [f"{p}/query_shape", f"{p}/one", f"{p}/two"], [f"{p}/S"],
                         name=f"{p}/Slice"),
        helper.make_node("Cast", [node.input[6]], [f"{p}/T_int64"], to=TensorProto.INT64,
                         name=f"{p}/Cast"),
        helper.make_node("Reshape", [f"{p}/T_int64", f"{p}/one"], [f"{p}/T"],
                         name=f"{p}/Reshape"),
        helper.make_node("Concat", [f"{p}/ones", f"{p}/S", f"{p}/T"], [f"{p}/bias_shape"],
                         axis=0, name=f"{p}/Concat"),
        helper.make_node("ConstantOfShape", [f"{p}/bias_shape"], [f"{p}/score_shift"],
                         value=numpy_helper.from_array(np.array([SCORE_SHIFT], np.float32)),
                         name=f"{p}/ConstantOfShape"),
    ])
    return f"{p}/score_shift"


def _save(model: onnx.ModelProto, model_dir: Path) -> None:
    """model.onnx, written beside it and moved over; the weights' data file is untouched
    (the new tensors are small and stay inside model.onnx)."""
    tmp = model_dir / ".model.onnx.gqa-decode"
    onnx.save_model(model, str(tmp))
    tmp.replace(model_dir / "model.onnx")
