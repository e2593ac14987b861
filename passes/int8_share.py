"""Int8 multiply-add share: how much of a model's arithmetic runs in int8 kernels.

A model can be "quantized" and still run almost every multiply-add in fp32 — ``auto``'s
``static_transformer`` on a CNN quantizes only the final Gemm (issue #20: on
EfficientNet-Lite0, 49 of 49 Convs fp32). :func:`int8_share` counts the multiply-adds
(MACs) of every Conv, ConvTranspose, MatMul and Gemm from their shapes (onnx shape inference,
per sample: the batch dim read as 1) and how many of them onnxruntime's optimized session
runs in int8. Other symbolic input dims (a detector's height and width) take the size of
the data when the caller has it (``input_shapes``: validate's, quantize's calibration);
without, they are read as 1 and the result says so (``assumed``) — a YOLOv8n read at 1×1
counted 2.86 M multiply-adds per sample, at its 320×320 data 1.1 G:

- already-integer forms: QLinearConv, QLinearMatMul, ConvInteger, MatMulInteger, and the
  com.microsoft QGemm, DynamicQuantizeMatMul and MatMulIntegerToFloat;
- a Conv/ConvTranspose whose input comes from a DequantizeLinear and whose output reaches a
  QuantizeLinear (directly or through one Relu/Clip, no branch): the QDQ fusion makes it a
  QLinearConv. Its weight comes from a DequantizeLinear, or it is a float initializer — then
  onnxruntime quantizes it per tensor at load (``WeightBiasQuantization``,
  docs/ort-kernel-divergence.md): int8 all the same, and listed as ``requantized``;
- a MatMul whose two inputs come from DequantizeLinear, or a Gemm whose input does (and its
  weight, or a float one with a QuantizeLinear after it, as for Conv): fused into an int8
  kernel with or without a QuantizeLinear after it (MatMulIntegerToFloat, QGemm).

Everything else computes in float. The count is of the graph as written; it does not run
the model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import onnx
from onnx import shape_inference

__all__ = ["Int8Share", "int8_share", "conv_share", "node_macs", "requantized_nodes", "MAC_OPS"]

# op type -> (index of the activation input, index of the weight input)
MAC_OPS: dict[str, tuple[int, int]] = {
    "Conv": (0, 1),
    "ConvTranspose": (0, 1),
    "MatMul": (0, 1),
    "Gemm": (0, 1),
    "ConvInteger": (0, 1),
    "QLinearConv": (0, 3),
    "MatMulInteger": (0, 1),
    "QLinearMatMul": (0, 3),
    "QGemm": (0, 3),
    "DynamicQuantizeMatMul": (0, 1),
    "MatMulIntegerToFloat": (0, 1),
}
_INTEGER = {
    "ConvInteger",
    "QLinearConv",
    "MatMulInteger",
    "QLinearMatMul",
    "QGemm",
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
}
_CONV = {"Conv", "ConvTranspose", "ConvInteger", "QLinearConv"}
_ACTIVATIONS = {"Relu", "Clip"}  # fused into the kernel before its QuantizeLinear


@dataclass(frozen=True)
class Int8Share:
    """``int8_macs`` of ``total_macs`` multiply-adds per sample run in int8; ``int8_nodes`` of
    ``mac_nodes`` nodes. ``requantized``: float Conv/Gemm nodes between a DequantizeLinear
    and a QuantizeLinear that onnxruntime quantizes itself at load (counted as int8).
    ``unknown``: nodes whose MACs shape inference could not give (left out of both sums).
    ``assumed``: graph inputs whose symbolic dims besides the batch were read as 1 (no data
    shape given): the counts are not at the model's real size."""

    int8_macs: int
    total_macs: int
    int8_nodes: int
    mac_nodes: int
    requantized: tuple[str, ...] = ()
    unknown: tuple[str, ...] = ()
    assumed: tuple[str, ...] = ()

    @property
    def share(self) -> float | None:
        """int8 MACs / all MACs (None when the model has none)."""
        return self.int8_macs / self.total_macs if self.total_macs else None

    def to_dict(self) -> dict:
        return {
            "int8_macs": self.int8_macs,
            "total_macs": self.total_macs,
            "share": self.share,
            "int8_nodes": self.int8_nodes,
            "mac_nodes": self.mac_nodes,
            "requantized": list(self.requantized),
            "unknown": list(self.unknown),
            "assumed_inputs": list(self.assumed),
        }

    def line(self) -> str:
        """``int8 multiply-adds: 97.3% (12.1 of 12.4 M per sample; 40 of 42 nodes)``."""
        if self.share is None:
            return "int8 multiply-adds: none (no Conv/MatMul/Gemm with known shapes)"
        unit, prefix = (1e9, "G") if self.total_macs >= 1e9 else (1e6, "M")
        text = (
            f"int8 multiply-adds: {100 * self.share:.1f}% ({self.int8_macs / unit:.3g} of "
            f"{self.total_macs / unit:.3g} {prefix} per sample; {self.int8_nodes} of "
            f"{self.mac_nodes} nodes)"
        )
        if self.requantized:
            text += f"; {len(self.requantized)} kept fp32 but re-quantized by onnxruntime"
        if self.unknown:
            count = len(self.unknown)
            text += f"; {count} node{'s' if count > 1 else ''} of unknown shape left out"
        if self.assumed:
            text += (
                f"; symbolic dims of input {', '.join(self.assumed)} read as 1 (counts at "
                "that size: give data for the real ones)"
            )
        return text


InputShapes = Mapping[str, Sequence[int]]  # graph input -> the shape of one sample (no batch)


def int8_share(model: onnx.ModelProto, input_shapes: InputShapes | None = None) -> Int8Share:
    """The int8 share of ``model``'s multiply-adds (see the module docstring);
    ``input_shapes``: one sample's shape per graph input, for its symbolic dims."""
    shapes, assumed = _shapes(model, input_shapes)
    graph = _Graph(model)
    int8 = total = int8_nodes = nodes = 0
    requantized, unknown = [], []
    for node in model.graph.node:
        if node.op_type not in MAC_OPS or node.domain not in ("", "ai.onnx", "com.microsoft"):
            continue
        macs = _macs(node, shapes)
        if macs is None:
            unknown.append(node.name)
            continue
        kind = graph.kind(node)
        nodes += 1
        total += macs
        if kind != "float":
            int8_nodes += 1
            int8 += macs
        if kind == "requantized":
            requantized.append(node.name)
    return Int8Share(
        int8, total, int8_nodes, nodes, tuple(requantized), tuple(unknown), tuple(assumed)
    )


def node_macs(
    model: onnx.ModelProto, input_shapes: InputShapes | None = None
) -> dict[str, int | None]:
    """Multiply-adds per sample of each Conv/Gemm/MatMul-like node, by name (None: a shape
    is unknown); ``input_shapes`` as for :func:`int8_share`."""
    shapes, _ = _shapes(model, input_shapes)
    return {n.name: _macs(n, shapes) for n in model.graph.node if n.op_type in MAC_OPS}


def conv_share(model: onnx.ModelProto, input_shapes: InputShapes | None = None) -> float | None:
    """The share of ``model``'s multiply-adds per sample in Conv/ConvTranspose (None: no
    Conv/MatMul/Gemm of known shape; nodes need no names); ``input_shapes`` as for
    :func:`int8_share`. Weights held in Constant nodes count: shapes come from inference."""
    shapes, _ = _shapes(model, input_shapes)
    conv = total = 0
    for node in model.graph.node:
        if node.op_type in MAC_OPS:
            macs = _macs(node, shapes) or 0
            total += macs
            conv += macs if node.op_type in ("Conv", "ConvTranspose") else 0
    return conv / total if total else None


def requantized_nodes(model: onnx.ModelProto) -> list[str]:
    """The float Conv/ConvTranspose/Gemm nodes onnxruntime quantizes itself at session load
    (float weight initializer, input from a DequantizeLinear, output to a QuantizeLinear)."""
    graph = _Graph(model)
    return [n.name for n in model.graph.node if graph.kind(n) == "requantized"]


class _Graph:
    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.inits = {t.name for t in g.initializer}
        self.producer = {o: n for n in g.node for o in n.output if o}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in g.output}

    def _from_dq(self, name: str) -> bool:
        p = self.producer.get(name)
        return p is not None and p.op_type == "DequantizeLinear"

    def _to_q(self, node: onnx.NodeProto) -> bool:
        """The output reaches a QuantizeLinear, directly or through one Relu/Clip, no
        branch (onnxruntime's IsNoBranchPathToQuantizeLinear)."""
        name = node.output[0]
        for _ in range(2):
            users = self.consumers.get(name, [])
            if name in self.outputs or len(users) != 1:
                return False
            if users[0].op_type == "QuantizeLinear":
                return True
            if users[0].op_type not in _ACTIVATIONS:
                return False
            name = users[0].output[0]
        return False

    def kind(self, node: onnx.NodeProto) -> str:
        """One of "int8", "requantized" (float weights onnxruntime quantizes at load), "float"."""
        op = node.op_type
        if op not in MAC_OPS:
            return "float"
        if op in _INTEGER:
            return "int8"
        x, w = (node.input[i] if len(node.input) > i else "" for i in MAC_OPS[op])
        if not self._from_dq(x):
            return "float"
        weight_dq, weight_float = self._from_dq(w), w in self.inits
        if op == "MatMul":
            return "int8" if weight_dq else "float"
        to_q = self._to_q(node)
        if op == "Gemm" and weight_dq:
            return "int8"
        if not to_q:
            return "float"
        if weight_dq:
            return "int8"
        return "requantized" if weight_float else "float"


def _shapes(
    model: onnx.ModelProto, input_shapes: InputShapes | None
) -> tuple[dict[str, list[int | None]], list[str]]:
    """Every tensor's shape (None for an unknown dim) and the graph inputs whose symbolic
    dims were read as 1. A symbolic batch dim is 1 (MACs per sample); the others take
    ``input_shapes`` (one sample's shape, without the batch) when it has the input."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    # symbolic shapes the model carries (a quantizer's pre-processing leaves unk__3 and the
    # like) are inferred anew from the inputs: shape inference would not replace them
    concrete = [v for v in copy.graph.value_info if _concrete(v)]
    del copy.graph.value_info[:]
    copy.graph.value_info.extend(concrete)
    for value in copy.graph.output:
        if not _concrete(value):
            value.type.tensor_type.ClearField("shape")
    given = input_shapes or {}
    assumed = []
    for value in copy.graph.input:
        dims = value.type.tensor_type.shape.dim
        sample = given.get(value.name)
        if sample is not None and len(sample) != len(dims) - 1:
            sample = None  # not this input's rank: left to the rule below
        for i, dim in enumerate(dims):
            if dim.HasField("dim_value") and dim.dim_value > 0:  # paddle2onnx writes -1
                continue
            if i > 0 and sample is not None:
                dim.dim_value = int(sample[i - 1])
                continue
            if i > 0 and value.name not in assumed:
                assumed.append(value.name)
            dim.dim_value = 1
    inferred = shape_inference.infer_shapes(copy)
    g = inferred.graph
    out: dict[str, list[int | None]] = {t.name: list(t.dims) for t in g.initializer}
    for value in [*g.input, *g.value_info, *g.output]:
        t = value.type.tensor_type
        if t.HasField("shape"):
            dims = [d.dim_value if d.dim_value > 0 else None for d in t.shape.dim]
            out.setdefault(value.name, dims)
    return out, assumed


def _concrete(value: onnx.ValueInfoProto) -> bool:
    """A shape whose every dim is a known positive number."""
    t = value.type.tensor_type
    return t.HasField("shape") and all(d.dim_value > 0 for d in t.shape.dim)


def _macs(node: onnx.NodeProto, shapes: Mapping[str, list[int | None]]) -> int | None:
    """Multiply-adds of one node per the shapes (unknown dims: None → the node's MACs are
    unknown, except a leading batch dim, read as 1)."""
    op = node.op_type
    x_at, w_at = MAC_OPS[op]
    out = shapes.get(node.output[0])
    x = shapes.get(node.input[x_at])
    w = shapes.get(node.input[w_at]) if len(node.input) > w_at else None
    if op not in _CONV and w is not None and len(w) == 2 and None not in w:
        if out is None or None in out[1:]:  # shapes lost downstream of a dynamic Reshape
            # (exported encoders): a constant [K, N] weight still gives K·N per row, every
            # unknown dim read as 1 — the same rule for every candidate of one model
            lead = [1 if d is None else d for d in (out or [1, 1])[:-1]]
            return math.prod(lead) * w[0] * w[1]
    if out is None or not out:
        return None
    out = [1 if (d is None and i == 0) else d for i, d in enumerate(out)]
    if any(d is None for d in out):
        return None
    if op in _CONV:
        if w is None or any(d is None for d in w[1:]):
            return None
        per_output = math.prod(w[1:])
        if op == "ConvTranspose":  # each input element meets every weight of its group
            if x is None or any(d is None for d in x[1:]):
                return None
            return math.prod(x[1:]) * math.prod(w[1:])
        return math.prod(out) * per_output
    if x is None or not x:
        return None
    if op in ("Gemm", "QGemm") and _attr(node, "transA"):
        k = x[0]
    else:
        k = x[-1]
    return None if k is None else math.prod(out) * k


def _attr(node: onnx.NodeProto, name: str) -> int:
    return next((a.i for a in node.attribute if a.name == name), 0)
