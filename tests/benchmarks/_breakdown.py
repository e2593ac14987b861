"""Where a static int8 CNN loses: its Q/DQ semantics re-enacted on the float model, a subset
of the tensors at a time (benchmarks only; README, "CNN int8", "Where the error sits").

From a QDQ model onnxruntime made, the activation ranges (scale, zero point of each
activation ``QuantizeLinear``) and the dequantized weights and biases of each Conv/Gemm are
read back and applied to the *prepared* float model the QDQ model was made from (after
pre-processing and equalization): fake-quant ``QuantizeLinear → DequantizeLinear`` on the
chosen activations (after a ReLU/Clip where onnxruntime folded it into the range), the
int8 weights (and corrected int32 biases) on the chosen Convs, everything else float. With
every tensor chosen this is the QDQ model's semantics (optimisations off) again.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["QdqParts", "read_parts", "simulate", "run_float"]


class QdqParts:
    """The activation quantizers (QDQ tensor → (scale, zero point)) and the dequantized
    weights/biases per Conv/Gemm node (``None`` where an input was not quantized) of a QDQ
    model, and where each activation quantizer goes in the prepared float model."""

    def __init__(self, qdq: onnx.ModelProto, prepared: onnx.ModelProto) -> None:
        inits = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
        producer = {o: n for n in qdq.graph.node for o in n.output}
        self.acts: dict[str, tuple[np.ndarray, np.ndarray]] = {
            n.input[0]: (inits[n.input[1]], inits[n.input[2]])
            for n in qdq.graph.node
            if n.op_type == "QuantizeLinear" and n.input[0] not in inits
        }
        self.weights: dict[str, list[np.ndarray | None]] = {}
        for node in qdq.graph.node:
            if node.op_type in ("Conv", "Gemm"):
                self.weights[node.name] = [
                    _dequantized(producer.get(x), inits) for x in node.input[1:]
                ]
        readers: dict[str, list[onnx.NodeProto]] = {}
        for node in prepared.graph.node:
            for name in node.input:
                readers.setdefault(name, []).append(node)
        self.place = {}
        for name in self.acts:  # a folded ReLU/Clip: quantize after it
            after = readers.get(name, [])
            folded = len(after) == 1 and after[0].op_type in ("Relu", "Clip")
            self.place[name] = after[0].output[0] if folded else name


def _dequantized(dq: onnx.NodeProto | None, inits: Mapping[str, np.ndarray]):
    if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
        return None
    q = inits[dq.input[0]].astype(np.float64)
    scale = inits[dq.input[1]].astype(np.float64)
    zero = inits[dq.input[2]].astype(np.float64) if len(dq.input) > 2 else np.float64(0)
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    if scale.ndim == 1 and q.ndim > 1:
        shape = [1] * q.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), np.reshape(zero, shape) if zero.ndim else zero
    return ((q - zero) * scale).astype(np.float32)


def read_parts(qdq: onnx.ModelProto, prepared: onnx.ModelProto) -> QdqParts:
    return QdqParts(qdq, prepared)


def simulate(
    prepared: onnx.ModelProto,
    parts: QdqParts,
    acts: Collection[str] = (),
    weights: Collection[str] = (),
) -> onnx.ModelProto:
    """``prepared`` with fake-quant on the activation tensors ``acts`` (QDQ names, see
    ``parts.acts``) and the int8 weights/biases of the Conv/Gemm nodes ``weights``."""
    model = onnx.ModelProto()
    model.CopyFrom(prepared)
    inits = {t.name: t for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    for name in weights:
        for x, value in zip(nodes[name].input[1:], parts.weights[name]):
            if value is not None and x in inits:
                shape = tuple(inits[x].dims)
                inits[x].CopyFrom(numpy_helper.from_array(value.reshape(shape), x))
    where = {parts.place[t]: t for t in acts}
    extra: list[onnx.TensorProto] = []

    def fake_quant(tensor: str) -> list[onnx.NodeProto]:
        scale, zero = parts.acts[where[tensor]]
        s, z = f"{tensor}__fq_scale", f"{tensor}__fq_zero"
        extra.append(numpy_helper.from_array(np.asarray(scale, np.float32), s))
        extra.append(numpy_helper.from_array(np.asarray(zero), z))
        return [
            helper.make_node("QuantizeLinear", [tensor, s, z], [f"{tensor}__fq"]),
            helper.make_node("DequantizeLinear", [f"{tensor}__fq", s, z], [f"{tensor}__fdq"]),
        ]

    built = [n for i in model.graph.input if i.name in where for n in fake_quant(i.name)]
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            if name in where:
                node.input[k] = f"{name}__fdq"
        built.append(node)
        for name in node.output:
            if name in where:
                built.extend(fake_quant(name))
    del model.graph.node[:]
    model.graph.node.extend(built)
    model.graph.initializer.extend(extra)
    return model


def run_float(model: onnx.ModelProto, x: np.ndarray, batch: int = 10) -> Sequence[np.ndarray]:
    """All outputs of ``model`` on ``x`` (input "input"), optimisations off, ``batch`` rows
    a run (fake-quant is elementwise: the batch size does not change the numbers)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )
    runs = [session.run(None, {"input": x[i : i + batch]}) for i in range(0, len(x), batch)]
    return [np.concatenate(parts) for parts in zip(*runs)]
