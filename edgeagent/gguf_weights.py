"""Put the GGUF's own quantized weights into the built model: no second quantization.

The default model comes from a Q4_1 GGUF. The model builder can only take it dequantized to
float32 and quantizes it again (symmetric INT4, round to nearest): the second grid does not
hold the first, every weight moves a second time, and the model loses 40% in perplexity
(89.7 against the GGUF's 64.2; docs/tool-calling.md). This step replaces the builder's
weights, MatMulNBits by MatMulNBits, with the GGUF's blocks as they are:

* Q4_1 (the layers): a block of 32 weights is ``d * q + m`` (``q`` in 0..15, a scale ``d``
  and a minimum ``m``). MatMulNBits without zero points computes ``s * (q - 8)``, on
  onnxruntime's fastest CPU kernel (integer zero points cost 15-20% more CPU per call, float
  ones take a path 60x slower), so ``q`` and ``s = d`` are kept and what is left,
  ``r = m + 8 * d``, is one constant per block: its share of the product is
  ``r * sum(x over the block)``. The input gets those block sums as extra columns
  (:func:`block_sum_nodes`: a Reshape to blocks, a ReduceSum, a small MatMul that places
  them, a Concat) and the weight row gets ``r`` there, so one MatMulNBits still computes
  the whole product. ``r`` is written at 4 bits in two blocks of its own, a coarse one and
  the rest of its rounding, each beside its own copy of the sums (the error is at most
  1/196 of the row's largest ``r``, about 30 times smaller than the builder's
  re-quantization). The sums fill whole blocks of 32 (zero columns): with a K that ends
  in a partial block, MatMulNBits spent ~10% more CPU per decoded token for the same
  result, bit for bit (docs/engine-notes.md).
* Q8_0 (the tied embedding and ``lm_head``): ``d * q`` with ``q`` in -127..127 is exactly an
  8-bit MatMulNBits (zero point 128 by default) and an 8-bit GatherBlockQuantized.

The builder's graph is checked, not assumed: every MatMulNBits must map to GGUF tensors of
the same shape, and :func:`restore` compares the result with the float32 weights the
builder was given (the dequantized folder) before it writes anything.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import onnx
from onnx import helper, numpy_helper

BLOCK = 32

Progress = Callable[[str], None]

_LAYER = re.compile(r"^/model/layers\.(\d+)/(attn|mlp)/(\w+)/MatMul_Q4$")
_SOURCES = {
    "qkv_proj": ("attn_q", "attn_k", "attn_v"),
    "q_proj": ("attn_q",), "k_proj": ("attn_k",), "v_proj": ("attn_v",),
    "o_proj": ("attn_output",),
    "gate_proj": ("ffn_gate",), "up_proj": ("ffn_up",), "down_proj": ("ffn_down",),
}


class GgufWeightsError(RuntimeError):
    """The built graph or the GGUF is not what this step knows how to join."""


@dataclass
class Q41:
    """Q4_1 blocks of a [rows, cols] weight: ``d * q + m`` per block of 32."""

    d: np.ndarray  # [rows, cols / 32] float32
    m: np.ndarray  # [rows, cols / 32] float32
    q: np.ndarray  # [rows, cols] uint8, 0..15

    def rows(self, order: np.ndarray) -> Q41:
        return Q41(self.d[order], self.m[order], self.q[order])

    def dense(self) -> np.ndarray:
        scale = np.repeat(self.d, BLOCK, axis=1)
        dense: np.ndarray = self.q.astype(np.float32) * scale + np.repeat(self.m, BLOCK, axis=1)
        return dense


def read_q4_1(raw: np.ndarray, rows: int, cols: int) -> Q41:
    """GGUF Q4_1: per block, float16 d and m, then 16 bytes: element j in the low nibble of
    byte j, element j + 16 in its high nibble."""
    blocks = raw.reshape(rows, cols // BLOCK, 20)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., 4:20]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(rows, cols)
    return Q41(d, m, q.astype(np.uint8))


def read_q8_0(raw: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """GGUF Q8_0: per block, float16 d, then 32 int8: ``d * q``. Returns (d, q)."""
    blocks = raw.reshape(rows, cols // BLOCK, 34)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    q = blocks[..., 2:34].copy().view(np.int8).reshape(rows, cols)
    return d, q


def llama_rows(rows: int, heads: int) -> np.ndarray:
    """The GGUF row of each Hugging Face row of a q or k projection: llama.cpp's converter
    interleaves each head's rotary halves (``permute``), transformers' loader undoes it."""
    half = rows // heads // 2
    # Hugging Face row (head h, half t, j) is GGUF row (h, j, t).
    order: np.ndarray = np.arange(rows).reshape(heads, half, 2).swapaxes(1, 2).reshape(rows)
    return order


def pack4(values: np.ndarray) -> np.ndarray:
    """[rows, n] of 0..15, n even -> [rows, n / 2] bytes, element 2j in the low nibble."""
    packed: np.ndarray = (values[:, 0::2] | (values[:, 1::2] << 4)).astype(np.uint8)
    return packed


def quantize4(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """4-bit around 8 (MatMulNBits without zero points: ``s * (q - 8)``), round to nearest,
    per block of 32 along axis 1 (padded with zeros): (q [rows, blocks * 32], scale
    [rows, blocks], the values q gives back [rows, n])."""
    rows, n = values.shape
    blocks = -(-n // BLOCK)
    padded = np.zeros((rows, blocks * BLOCK), dtype=np.float32)
    padded[:, :n] = values
    b = padded.reshape(rows, blocks, BLOCK)
    scale = np.maximum(b.max(-1) / 7, -b.min(-1) / 8)
    scale[scale == 0] = 1.0
    q = np.clip(np.round(b / scale[..., None]) + 8, 0, 15)
    back = ((q - 8) * scale[..., None]).reshape(rows, -1)[:, :n]
    return q.reshape(rows, -1).astype(np.uint8), scale.astype(np.float32), back


@dataclass
class Joined:
    """One MatMulNBits, rewritten: the weight with its residual columns appended."""

    b: np.ndarray  # [N, blocks, 16] uint8
    scales: np.ndarray  # [N * blocks] float32
    k: int  # K + 2 * sum_columns(K)

    def dense(self) -> np.ndarray:
        """The [N, k] weights this encodes (for the check)."""
        n, blocks, _ = self.b.shape
        q = np.empty((n, blocks * BLOCK), dtype=np.float32)
        q[:, 0::2] = (self.b & 0x0F).reshape(n, -1)
        q[:, 1::2] = (self.b >> 4).reshape(n, -1)
        s = self.scales.reshape(n, blocks)
        w: np.ndarray = (q - 8) * np.repeat(s, BLOCK, axis=1)
        return w[:, : self.k]


def sum_columns(k: int) -> int:
    """How many columns one copy of the block sums of a K-wide input takes: K / 32 of them,
    padded with zeros to whole blocks of 32."""
    return -(-(k // BLOCK) // BLOCK) * BLOCK


def block_placement(k: int) -> np.ndarray:
    """[k / 32, 2 * sum_columns(k)] ones and zeros: the block sums of a K-wide input, times
    this, are the sums and zeros, twice (beside the coarse and the fine blocks of the
    residual). Exact: each output is one sum or 0."""
    blocks, width = k // BLOCK, sum_columns(k)
    place = np.zeros((blocks, 2 * width), np.float32)
    for copy in (0, width):
        place[np.arange(blocks), copy + np.arange(blocks)] = 1.0
    return place


def block_sum_nodes(x: str, k: int, prefix: str
                    ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], str]:
    """The nodes that turn a [batch, sequence, k] input ``x`` into ``[x, block sums, zeros,
    block sums, zeros]`` (the input of a joined MatMulNBits), the constants they need (named
    by k: shared by every input of that width) and the output's name. The sums come from a
    ReduceSum over the input seen as blocks: a MatMul by a [k, 2 * sum_columns(k)] block
    indicator, one node fewer, cost ~8% more CPU per decoded token (reading that matrix
    each call)."""
    shape, place = f"/edgeagent/block_shape/{k}", f"/edgeagent/block_placement/{k}"
    axis = "/edgeagent/last_axis"
    constants = [numpy_helper.from_array(np.array([0, 0, k // BLOCK, BLOCK], np.int64), shape),
                 numpy_helper.from_array(np.array([-1], np.int64), axis),
                 numpy_helper.from_array(block_placement(k), place)]
    nodes = [
        helper.make_node("Reshape", [x, shape], [prefix + "/blocks"], name=prefix + "/Reshape"),
        helper.make_node("ReduceSum", [prefix + "/blocks", axis], [prefix + "/sums"],
                         keepdims=0, name=prefix + "/ReduceSum"),
        helper.make_node("MatMul", [prefix + "/sums", place], [prefix + "/placed"],
                         name=prefix + "/Place"),
        helper.make_node("Concat", [x, prefix + "/placed"], [prefix + "/output_0"], axis=-1,
                         name=prefix + "/Concat"),
    ]
    return nodes, constants, prefix + "/output_0"


def join_q4_1(w: Q41) -> Joined:
    """The Q4_1 weight as MatMulNBits over :func:`block_sum_nodes`' output (module
    docstring)."""
    rows, cols = w.q.shape
    residual = w.m + 8 * w.d  # [rows, cols / 32]: d * q + m = d * (q - 8) + residual
    coarse_q, coarse_s, coarse = quantize4(residual)
    fine_q, fine_s, _ = quantize4(residual - coarse)
    q = np.concatenate([w.q, coarse_q, fine_q], axis=1)
    scales = np.concatenate([w.d, coarse_s, fine_s], axis=1)
    return Joined(b=pack4(q).reshape(rows, scales.shape[1], BLOCK // 2),
                  scales=scales.reshape(-1).astype(np.float32), k=cols + 2 * sum_columns(cols))


class _Gguf:
    def __init__(self, path: Path) -> None:
        self.reader = gguf.GGUFReader(str(path))
        self.tensors = {t.name: t for t in self.reader.tensors}
        arch = self._string("general.architecture")
        if arch != "llama":
            raise GgufWeightsError(f"GGUF architecture {arch!r}: only llama is known here")
        self.heads = self._int(f"{arch}.attention.head_count")
        self.kv_heads = self._int(f"{arch}.attention.head_count_kv")

    def _field(self, key: str) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            raise GgufWeightsError(f"the GGUF has no {key}")
        return field.parts[field.data[0]]

    def _int(self, key: str) -> int:
        return int(self._field(key)[0])

    def _string(self, key: str) -> str:
        return bytes(self._field(key)).decode("utf-8")

    def tensor(self, name: str, kind: str) -> tuple[np.ndarray, int, int]:
        t = self.tensors.get(name)
        if t is None:
            raise GgufWeightsError(f"the GGUF has no tensor {name}")
        if t.tensor_type.name != kind:
            raise GgufWeightsError(f"{name} is {t.tensor_type.name}, not {kind}")
        cols, rows = (int(x) for x in t.shape)
        return np.asarray(t.data), rows, cols

    def q4_1(self, name: str) -> Q41:
        raw, rows, cols = self.tensor(name, "Q4_1")
        w = read_q4_1(raw, rows, cols)
        if name.endswith("attn_q.weight"):
            w = w.rows(llama_rows(rows, self.heads))
        elif name.endswith("attn_k.weight"):
            w = w.rows(llama_rows(rows, self.kv_heads))
        return w


def _concat_rows(parts: list[Q41]) -> Q41:
    return Q41(np.concatenate([p.d for p in parts]), np.concatenate([p.m for p in parts]),
               np.concatenate([p.q for p in parts]))


def _attr(node: onnx.NodeProto, name: str) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    raise GgufWeightsError(f"{node.name} has no attribute {name}")


def _set_attr(node: onnx.NodeProto, name: str, value: int) -> None:
    for a in node.attribute:
        if a.name == name:
            a.i = value
            return
    node.attribute.append(helper.make_attribute(name, value))


def restore(model_dir: Path, gguf_path: Path, progress: Progress,
            reference: Callable[[str], np.ndarray | None] | None = None) -> dict[str, Any]:
    """Rewrite ``model_dir``'s model.onnx (and its data file) with the GGUF's blocks.

    ``reference(name)`` gives the float32 weight [N, K] the builder quantized for a node
    (None when unknown): each rewritten weight must match it (it is the same GGUF,
    dequantized by transformers), or nothing is written.
    """
    source = _Gguf(gguf_path)
    path = model_dir / "model.onnx"
    model = onnx.load(str(path))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    sums: dict[str, str] = {}  # input name -> the input with its block sums appended
    new_nodes: list[onnx.NodeProto] = []
    layers = 0
    head = False
    for node in graph.node:
        if node.op_type != "MatMulNBits":
            new_nodes.append(node)
            continue
        k, n = int(_attr(node, "K")), int(_attr(node, "N"))
        if int(_attr(node, "bits")) != 4 or int(_attr(node, "block_size")) != BLOCK:
            raise GgufWeightsError(f"{node.name}: expected 4-bit blocks of {BLOCK}")
        match = _LAYER.match(node.name)
        if match:
            layer, _, proj = match.groups()
            names = _SOURCES.get(proj)
            if names is None:
                raise GgufWeightsError(f"{node.name}: no GGUF tensor known for {proj}")
            w = _concat_rows([source.q4_1(f"blk.{layer}.{name}.weight") for name in names])
            if w.q.shape != (n, k):
                raise GgufWeightsError(f"{node.name}: [N, K] = [{n}, {k}], the GGUF's "
                                       f"{list(w.q.shape)}")
            _check(node.name, w.dense(), reference)
            joined = join_q4_1(w)
            _put(inits, node.input[1], joined.b)
            _put(inits, node.input[2], joined.scales)
            x = node.input[0]
            if x not in sums:
                nodes, constants, sums[x] = block_sum_nodes(
                    x, k, f"/edgeagent/block_sums/{len(sums)}")
                new_nodes.extend(nodes)
                for constant in constants:
                    if constant.name not in inits:
                        inits[constant.name] = constant
                        graph.initializer.append(constant)
            weight, scales = node.input[1], node.input[2]
            del node.input[:]
            node.input.extend([sums[x], weight, scales])
            _set_attr(node, "K", joined.k)
            layers += 1
        elif node.name == "/lm_head/MatMul_Q4":
            raw, rows, cols = source.tensor("token_embd.weight", "Q8_0")
            d, q = read_q8_0(raw, rows, cols)
            if (rows, cols) != (n, k):
                raise GgufWeightsError(f"{node.name}: [N, K] = [{n}, {k}], the GGUF's "
                                       f"[{rows}, {cols}]")
            _check(node.name, q.astype(np.float32) * np.repeat(d, BLOCK, axis=1), reference)
            _put(inits, node.input[1], (q.astype(np.int16) + 128).astype(np.uint8)
                 .reshape(n, k // BLOCK, BLOCK))
            _put(inits, node.input[2], d)  # [N, K / 32], the shape GatherBlockQuantized needs
            _set_attr(node, "bits", 8)
            head = True
            new_nodes.append(node)
            continue
        else:
            raise GgufWeightsError(f"{node.name}: no GGUF tensor known for it")
        new_nodes.append(node)
    if not head or not layers:
        raise GgufWeightsError(f"found {layers} layer weights and {'a' if head else 'no'} "
                               "lm_head: not the builder's llama graph")
    _retie_embedding(new_nodes, graph, n_vocab=_init_dims(inits, "lm_head.MatMul.weight_Q4"))
    del graph.node[:]
    graph.node.extend(new_nodes)
    _save(model, model_dir)
    progress(f"    {layers} layer weights as the GGUF's Q4_1 blocks (+ block sums for their "
             f"minimums, {len(sums)} inputs), the tied embedding and lm_head as its Q8_0")
    return {"layers": layers, "block_sum_inputs": len(sums)}


def hf_reference(hf_dir: Path) -> Callable[[str], np.ndarray | None]:
    """The float32 weight [N, K] the builder quantized for a MatMulNBits node, read from the
    Hugging Face folder it was given (for :func:`restore`'s check)."""
    from safetensors import safe_open

    files = {}
    for path in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(path), "np") as f:
            files.update(dict.fromkeys(f.keys(), path))

    def tensor(name: str) -> np.ndarray | None:
        path = files.get(name)
        if path is None:
            return None
        with safe_open(str(path), "np") as f:
            return np.asarray(f.get_tensor(name), dtype=np.float32)

    def weight(node: str) -> np.ndarray | None:
        match = _LAYER.match(node)
        if match:
            layer, kind, proj = match.groups()
            prefix = f"model.layers.{layer}.{'self_attn' if kind == 'attn' else 'mlp'}"
            projs = ("q_proj", "k_proj", "v_proj") if proj == "qkv_proj" else (proj,)
            parts = [tensor(f"{prefix}.{p}.weight") for p in projs]
            whole = [p for p in parts if p is not None]
            return np.concatenate(whole) if len(whole) == len(parts) else None
        if node == "/lm_head/MatMul_Q4":
            head = tensor("lm_head.weight")
            return head if head is not None else tensor("model.embed_tokens.weight")
        return None

    return weight


def _init_dims(inits: dict[str, onnx.TensorProto], name: str) -> list[int]:
    return list(inits[name].dims)


def _put(inits: dict[str, onnx.TensorProto], name: str, value: np.ndarray) -> None:
    tensor = inits.get(name)
    if tensor is None:
        raise GgufWeightsError(f"no initializer {name}")
    tensor.CopyFrom(numpy_helper.from_array(value, name))


def _check(name: str, weight: np.ndarray, reference: Callable[[str], np.ndarray | None] | None
           ) -> None:
    if reference is None:
        return
    expected = reference(name)
    if expected is None:
        return
    if expected.shape != weight.shape or not np.allclose(weight, expected, rtol=1e-3,
                                                          atol=1e-4):
        worst = (float(np.abs(weight - expected).max()) if expected.shape == weight.shape
                 else float("nan"))
        raise GgufWeightsError(f"{name}: the GGUF's blocks do not give the weights the "
                               f"builder was given (largest difference {worst:g})")


def _retie_embedding(nodes: list[onnx.NodeProto], graph: onnx.GraphProto,
                     n_vocab: list[int]) -> None:
    """The embedding gathers from lm_head's (now 8-bit) weight: its Reshape to [vocab, K]
    bytes and its GatherBlockQuantized follow."""
    vocab, blocks, per_block = n_vocab
    shape = "/edgeagent/embedding_shape"
    found = False
    for node in nodes:
        if node.op_type == "Reshape" and node.input[0] == "lm_head.MatMul.weight_Q4":
            node.input[1] = shape
        elif node.op_type == "GatherBlockQuantized":
            _set_attr(node, "bits", 8)
            found = True
    if not found:
        raise GgufWeightsError("no GatherBlockQuantized embedding tied to lm_head")
    graph.initializer.append(numpy_helper.from_array(
        np.array([vocab, blocks * per_block], np.int64), shape))


def _save(model: onnx.ModelProto, model_dir: Path) -> None:
    """model.onnx and model.onnx.data, written in a folder beside them, then moved over."""
    tmp = model_dir / ".gguf-weights"
    tmp.mkdir(exist_ok=True)
    onnx.save_model(model, str(tmp / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data",
                    size_threshold=1024)
    (tmp / "model.onnx.data").replace(model_dir / "model.onnx.data")
    (tmp / "model.onnx").replace(model_dir / "model.onnx")
    tmp.rmdir()
