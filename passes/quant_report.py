"""What an int8 pass did, read off the graphs: which quantizable nodes became int8 and which
stayed float and why, per op type; the multiply-accumulates of Conv vs MatMul (for the
conv-dominated warning); and whether a model is quantized at all."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx

__all__ = [
    "quantized_nodes",
    "is_quantized",
    "has_dynamic_quantization",
    "node_report",
    "weight_scales",
    "describe_scales",
    "describe_settings",
    "percent",
]


# Ops that only exist in quantized graphs (standard, com.microsoft, and any QLinear*).
_QUANT_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "MatMulInteger",
        "ConvInteger",
        "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul",
        "DynamicQuantizeLSTM",
        "QGemm",
        "QAttention",
        "QEmbedLayerNormalization",
        "QOrderedMatMul",
        "MatMulNBits",
        "MatMulBnb4",
        "GatherBlockQuantized",
    }
)


# Ops that quantize activations at run time, from each run's own range: the outputs of a model
# holding them depend on the other samples in the batch.
DYNAMIC_OPS = frozenset(
    {
        "DynamicQuantizeLinear",
        "MatMulInteger",
        "ConvInteger",
        "DynamicQuantizeMatMul",
        "DynamicQuantizeLSTM",
        "MatMulIntegerToFloat",
    }
)

# The int8 ops of dynamic mode, what they replaced, and the input holding the weight's zero
# point (its shape is the weight scale's: one value per tensor, or one per channel).
_WEIGHT_ZERO_POINT = {
    "ConvInteger": ("Conv", 3),
    "MatMulInteger": ("MatMul/Gemm", 3),
    "DynamicQuantizeMatMul": ("MatMul/Gemm", 3),
}


# Ops ORT quantizes only when a neighbour is quantized (they just move int8 data around).
_DATA_MOVEMENT = frozenset(
    {
        "Reshape",
        "Transpose",
        "Squeeze",
        "Unsqueeze",
        "Flatten",
        "Slice",
        "Split",
        "Pad",
        "Concat",
        "Gather",
        "GatherElements",
        "MaxPool",
        "AveragePool",
        "Resize",
        "TopK",
        "Where",
        "CumSum",
        "ArgMax",
    }
)


_STATS_OPS_DYNAMIC_EXTRA = ("Gemm",)  # ORT rewrites Gemm to MatMul in dynamic mode


_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


def quantized_nodes(model: onnx.ModelProto) -> list[str]:
    """Names (or op types, for unnamed nodes) of the nodes that only quantized graphs have."""
    return [node.name or node.op_type for node in model.graph.node if is_quant_op(node.op_type)]


def is_quantized(model: onnx.ModelProto) -> bool:
    """True when the model already holds quantization ops (QDQ, QOperator or dynamic)."""
    return bool(quantized_nodes(model))


def _all_nodes(graph: onnx.GraphProto):
    """The nodes of ``graph`` and of every subgraph (If/Loop/Scan bodies) inside it."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield from _all_nodes(sub)


def has_dynamic_quantization(model: onnx.ModelProto) -> bool:
    """True when ``model`` quantizes activations at run time (DynamicQuantizeLinear,
    MatMulInteger, ConvInteger, DynamicQuantizeMatMul, ...): its outputs for one sample then
    depend on the other samples run with it, so it is scored at the batch it runs at."""
    return any(node.op_type in DYNAMIC_OPS for node in _all_nodes(model.graph))


def weight_scales(model: onnx.ModelProto) -> dict[str, dict[str, int]]:
    """How a dynamic-int8 model's weights were actually quantized, read off its int8 ops:
    per op type replaced (Conv, MatMul/Gemm), how many have one scale per output channel
    (``per-channel``) and how many one scale for the whole tensor (``per-tensor``).
    onnxruntime quantizes Conv weights per tensor whatever ``per_channel`` says."""
    shapes = {t.name: int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer}
    out: dict[str, dict[str, int]] = {}
    for node in model.graph.node:
        if node.op_type not in _WEIGHT_ZERO_POINT:
            continue
        replaced, at = _WEIGHT_ZERO_POINT[node.op_type]
        size = shapes.get(node.input[at]) if len(node.input) > at else None
        if size is None:
            continue  # the weight is not a constant: nothing to read
        kind = "per-channel" if size > 1 else "per-tensor"
        counts = out.setdefault(replaced, {"per-channel": 0, "per-tensor": 0})
        counts[kind] += 1
    return dict(sorted(out.items()))


def describe_scales(scales: Mapping[str, Mapping[str, int]]) -> str:
    """:func:`weight_scales` for people: ``MatMul/Gemm 1 per-channel; Conv 2 per-tensor``."""
    parts = [
        f"{op} " + ", ".join(f"{n} {kind}" for kind, n in counts.items() if n)
        for op, counts in scales.items()
    ]
    return "; ".join(parts) or "no constant weights"


def percent(part: float, total: float) -> str:
    """``part`` as a percentage of ``total``, with as many decimals as it takes not to round
    a share that is not whole (or not nothing) to 100 (or 0)."""
    share = 100 * part / total
    for digits in range(4):
        text = f"{share:.{digits}f}"
        if (float(text) < 100 or part >= total) and (float(text) > 0 or part <= 0):
            return text
    return f"{share:.6g}"


def matched(
    node: onnx.NodeProto,
    patterns: Sequence[re.Pattern],
    ops: Sequence[str],
    names: Sequence[str],
) -> str:
    if node.name in names:
        return "excluded by the caller (nodes_to_exclude)"
    if node.op_type in ops:
        return f"op type {node.op_type} excluded (--exclude-op)"
    hit = next((p.pattern for p in patterns if p.search(node.name)), None)
    return f"excluded by --exclude {hit!r}" if hit is not None else ""


def macs(model: onnx.ModelProto) -> dict[str, int]:
    """Rough multiply-accumulates of Conv vs. Gemm/MatMul with a constant weight, from the
    weight size times the known output dims (unknown dims count as 1)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # too large or invalid for shape inference: use what the model has
        inferred = model
    shapes = {
        vi.name: [d.dim_value if d.dim_value > 0 else 1 for d in vi.type.tensor_type.shape.dim]
        for vi in (*inferred.graph.value_info, *inferred.graph.output)
    }
    weights = {t.name: int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer}
    macs = {"conv": 0, "matmul": 0}
    for node in model.graph.node:
        size = max((weights.get(i, 0) for i in node.input[:2]), default=0)
        out = shapes.get(node.output[0] if node.output else "", [])
        if node.op_type == "Conv" and size:
            macs["conv"] += size * int(np.prod(out[2:], dtype=np.int64))
        elif node.op_type in ("MatMul", "Gemm") and size:
            macs["matmul"] += size * int(np.prod(out[:-1], dtype=np.int64))
    return macs


def candidate_ops(mode: str) -> frozenset[str]:
    from onnxruntime.quantization.registry import (
        IntegerOpsRegistry,
        QDQRegistry,
        QLinearOpsRegistry,
    )

    registry = {"dynamic": IntegerOpsRegistry, "qdq": QDQRegistry, "qoperator": QLinearOpsRegistry}
    ops = set(registry[mode])
    return frozenset(ops | set(_STATS_OPS_DYNAMIC_EXTRA) if mode == "dynamic" else ops)


def is_quant_op(op_type: str | None) -> bool:
    return bool(op_type) and (op_type in _QUANT_OPS or op_type.startswith("QLinear"))


def _is_node_quantized(
    node: onnx.NodeProto,
    after: Mapping[str, onnx.NodeProto],
    producers: Mapping[str, str],
    int8: set[str],
    float_weights: set[str],
    qdq: bool,
) -> bool:
    """A node is quantized when it was replaced by (or folded into) a quantized op, or still
    exists but reads quantized data: in QDQ from a DequantizeLinear with no weight left in
    float; otherwise an int8 initializer or the output of a quantized op (a DequantizeLinear
    there feeds fp32 ops)."""
    kept = after.get(node.name)
    if node.op_type == "Gemm" and kept is None:
        kept = after.get(f"{node.name}_MatMul")  # dynamic mode's Gemm → MatMul rewrite
        if kept is not None and kept.op_type != "MatMul":
            kept = None
    if kept is None or kept.op_type not in (node.op_type, "MatMul"):
        return True
    if qdq:
        if any(i in float_weights for i in kept.input):
            return False  # a weight still in float: ORT left the node alone
        return any(producers.get(i) == "DequantizeLinear" for i in kept.input)
    return any(
        i in int8 or (is_quant_op(producers.get(i)) and producers.get(i) != "DequantizeLinear")
        for i in kept.input
    )


def _float_tensors(model: onnx.ModelProto) -> tuple[set[str], set[str]]:
    """(names known to be float, names known to be something else), from the type info."""
    floats, others = set(), set()
    typed = [(v.name, v.type.tensor_type.elem_type) for v in model.graph.value_info]
    typed += [
        (v.name, v.type.tensor_type.elem_type) for v in (*model.graph.input, *model.graph.output)
    ]
    typed += [(t.name, t.data_type) for t in model.graph.initializer]
    for name, elem in typed:
        if elem:
            (floats if elem in _FLOATS else others).add(name)
    return floats, others


def _fp32_reason(
    node: onnx.NodeProto, mode: str, known: tuple[set[str], set[str]], inits: set[str]
) -> str:
    floats, others = known
    data = node.input[0] if node.input else ""
    if data in others and not any(i in floats for i in node.input):
        return "no float input (shape or index computation)"
    if mode == "dynamic" and node.op_type in ("MatMul", "Gemm"):
        if not any(i in inits for i in node.input[:2]):
            return "no constant weight (dynamic mode quantizes weights only)"
    if node.op_type in _DATA_MOVEMENT and data not in inits:
        return "input not quantized (ORT quantizes data-movement ops only next to int8 ops)"
    return "left in fp32 by onnxruntime (unsupported type, shape or attributes)"


def node_report(
    before: onnx.ModelProto, after: onnx.ModelProto, mode: str, excluded: Mapping[str, str]
) -> dict[str, Any]:
    """Which quantizable nodes of ``before`` are quantized in ``after`` and why the others
    stayed fp32. ``mode`` is dynamic, qdq or qoperator."""
    ops = candidate_ops(mode)
    by_name = {n.name: n for n in after.graph.node if n.name}
    producers = {o: n.op_type for n in after.graph.node for o in n.output}
    int8 = {
        t.name
        for t in after.graph.initializer
        if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    }
    float_weights = {
        t.name for t in after.graph.initializer if t.data_type in _FLOATS and len(t.dims) >= 2
    }
    inits = {t.name for t in before.graph.initializer}
    known = _float_tensors(before)
    quantized: list[str] = []
    fp32: dict[str, str] = {}
    by_op: dict[str, dict[str, int]] = {}
    for node in before.graph.node:
        if node.op_type not in ops or not node.name:
            continue
        counts = by_op.setdefault(node.op_type, {"quantized": 0, "fp32": 0})
        quantized_now = _is_node_quantized(
            node, by_name, producers, int8, float_weights, mode == "qdq"
        )
        if not excluded.get(node.name) and quantized_now:
            quantized.append(node.name)
            counts["quantized"] += 1
        else:
            reason = excluded.get(node.name) or _fp32_reason(node, mode, known, inits)
            fp32[node.name] = reason
            counts["fp32"] += 1
    return {"quantized": quantized, "fp32": fp32, "by_op": dict(sorted(by_op.items()))}


def describe_settings(mode: str, settings: Mapping[str, Any], bits: bool = True) -> str:
    """One line saying what a quantization pass with ``settings`` makes (for the CLI
    summaries and the sensitivity report): mode, format, activation and weight types, and
    with ``bits`` the weights' bits and target (left out where a target line follows).
    Dynamic per-channel covers MatMul/Gemm only: onnxruntime's ConvInteger path quantizes
    Conv weights per tensor (what a model got: :func:`weight_scales`)."""
    weights = " ".join(
        [settings["weight_type"], "per-channel" if settings["per_channel"] else "per-tensor"]
        + (["7-bit"] if bits and settings.get("reduce_range") else [])
        + ([f"for {settings['target']}"] if bits and settings.get("target") else [])
    )
    if mode == "dynamic":  # onnxruntime's ConvInteger takes one weight scale per tensor
        scales = "per channel on MatMul/Gemm, per tensor on Conv"
        details = [scales if settings["per_channel"] else "per tensor"]
        details += ["7-bit"] if bits and settings.get("reduce_range") else []
        details += [f"for {settings['target']}"] if bits and settings.get("target") else []
        return (
            f"dynamic int8: {settings['weight_type']} weights ({', '.join(details)}), uint8 "
            "activations at run time"
        )
    scheme = ", Q/DQ on MatMul/Gemm inputs only" if settings.get("scheme") == "transformer" else ""
    return (
        f"static int8, {settings['format'].upper()}: {settings['activation_type']} activations, "
        f"{weights} weights{scheme}"
    )
