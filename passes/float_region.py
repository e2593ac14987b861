"""A float region that really runs in float: drop the QuantizeLinear/DequantizeLinear pairs
around Conv/Gemm nodes that a QDQ model keeps in fp32 but onnxruntime would quantize at load.

onnxruntime's ``WeightBiasQuantization`` quantizes a float Conv/ConvTranspose/Gemm that reads
a DequantizeLinear and whose output reaches a QuantizeLinear to per-tensor int8 weights
(docs/ort-kernel-divergence.md): a node "kept in fp32" is not fp32 in the kernels. Here each
such node reads its input before the Q/DQ pair in front of it, and its consumers read its
output before the Q/DQ pair after it, so it neither reads a DequantizeLinear nor reaches a
QuantizeLinear. Each pair bypassed becomes a Clip to the range it could represent (which
keeps a ReLU or ReLU6 the quantizer folded into it), so the model's float semantics change
only by the rounding the pair did. The neighbours that shared those pairs lose their int8
input or output too (they run in float: the region widens); pairs no one reads any more are
removed.

As a pass (``FloatRegion``, recipe name ``float-region``), it runs after the quantize pass
whose model it repairs: ``auto``'s fallback steps marked ``_wide`` are that pair, and a
recipe with the same two passes rebuilds them byte for byte.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from passes.base import Pass, PassResult
from passes.int8_share import requantized_nodes

__all__ = ["widen_float_region", "FLOAT_REGION", "FloatRegion"]

logger = logging.getLogger(__name__)

# The recipe name of the pass: auto adds it after a quantize pass (converter.search.fallback)
FLOAT_REGION = "float-region"
_ACTIVATIONS = ("Relu", "Clip")


def widen_float_region(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` in which no float Conv/Gemm is quantized by onnxruntime at load,
    and the nodes that were (by name, graph order)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    named = requantized_nodes(out)
    for _ in range(len(out.graph.node)):  # widening can expose another; each round fixes some
        todo = requantized_nodes(out)
        if not todo:
            break
        nodes = {n.name: n for n in out.graph.node}
        for name in todo:
            _unquantize_around(out.graph, nodes[name])
        _drop_dead(out.graph)
    if named:
        logger.debug("float region widened around %d nodes: %s", len(named), ", ".join(named))
    return out, named


class FloatRegion(Pass):
    """Run in float the Conv/Gemm nodes a QDQ model keeps in fp32 but onnxruntime would
    quantize at load (module docstring); a model with none is returned unchanged."""

    name = FLOAT_REGION

    def call(self, model: onnx.ModelProto) -> PassResult:
        out, named = widen_float_region(model)
        if named:
            logger.info(
                "float region: %d node(s) run in float, Q/DQ around them dropped", len(named)
            )
        return PassResult(out if named else model, bool(named), {"widened": named})


def _unquantize_around(graph: onnx.GraphProto, node: onnx.NodeProto) -> None:
    producer = {o: n for n in graph.node for o in n.output if o}
    dq = producer.get(node.input[0])
    q = producer.get(dq.input[0]) if dq is not None else None
    if dq is not None and dq.op_type == "DequantizeLinear":
        if q is not None and q.op_type == "QuantizeLinear":
            node.input[0] = _clipped(graph, q)  # the float tensor the pair rounded, clipped
    tensor = node.output[0]
    for _ in range(2):  # through one Relu/Clip, as onnxruntime looks
        users = [n for n in graph.node if tensor in n.input]
        if len(users) != 1 or users[0].op_type not in _ACTIVATIONS:
            break
        tensor = users[0].output[0]
    for q in [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == tensor]:
        for dq in [n for n in graph.node if n.op_type == "DequantizeLinear"]:
            if dq.input[0] == q.output[0]:
                _rename_uses(graph, dq.output[0], _clipped(graph, q))


_RANGES = {TensorProto.UINT8: (0, 255), TensorProto.INT8: (-128, 127)}


def _clipped(graph: onnx.GraphProto, q: onnx.NodeProto) -> str:
    """The float tensor ``q`` quantizes, clipped to the range ``q`` represents (a Clip made
    once per QuantizeLinear); unclipped when its scale or zero point is not a scalar
    initializer."""
    out = f"{q.output[0]}_float"
    if any(out in n.output for n in graph.node):
        return out
    inits = {t.name: t for t in graph.initializer}
    scale = inits.get(q.input[1]) if len(q.input) > 1 else None
    zero = inits.get(q.input[2]) if len(q.input) > 2 and q.input[2] else None
    if scale is None or (len(q.input) > 2 and q.input[2] and zero is None):
        return q.input[0]
    s = numpy_helper.to_array(scale).astype(np.float64)
    z = numpy_helper.to_array(zero) if zero is not None else np.zeros((), np.uint8)
    dtype = zero.data_type if zero is not None else TensorProto.UINT8
    if s.size != 1 or z.size != 1 or dtype not in _RANGES:
        return q.input[0]
    lo, hi = ((b - float(z.reshape(()))) * float(s.reshape(())) for b in _RANGES[dtype])
    names = (f"{out}_min", f"{out}_max")
    for name, value in zip(names, (lo, hi)):
        graph.initializer.append(numpy_helper.from_array(np.array(value, np.float32), name))
    clip = helper.make_node("Clip", [q.input[0], *names], [out], name=f"{q.name}_float_clip")
    at = list(graph.node).index(q)
    graph.node.insert(at, clip)
    return out


def _rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    if any(o.name == old for o in graph.output):
        return  # a graph output keeps its name (and its Q/DQ)
    for n in graph.node:
        for i, name in enumerate(n.input):
            if name == old:
                n.input[i] = new


def _drop_dead(graph: onnx.GraphProto) -> None:
    """Remove Q/DQ nodes whose outputs nothing reads, and the initializers left unread."""
    while True:
        read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [
            n
            for n in graph.node
            if n.op_type in ("QuantizeLinear", "DequantizeLinear")
            and not any(o in read for o in n.output)
        ]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    read = {i for n in graph.node for i in n.input}
    for t in [t for t in graph.initializer if t.name not in read]:
        graph.initializer.remove(t)
