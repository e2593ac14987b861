"""The model surgery of ``sensitivity``: the fully quantized model, and the fp32 model with
one node alone quantized as in it (:meth:`Variants.alone`) — static mode copies the Q/DQ
nodes feeding the node, dynamic mode swaps the node for the nodes that replaced it — or with
one node alone kept fp32 (:meth:`Variants.quantize`). Calibration and pre-processing run
once, when the variants are made (:meth:`Variants.for_mode`)."""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx

from converter.core.errors import BadInputError
from passes.base import make_pass
from passes.quantize import (
    CalibrationRanges,
    DynamicQuantize,
    StaticQuantize,
    is_quantized,
    preprocess,
)

__all__ = ["Variants"]


class Variants:
    """The fully quantized model and the per-node variants, for one model and settings.
    Calibration and pre-processing run once, in :meth:`for_mode`."""

    def __init__(
        self, kind, model: onnx.ModelProto, settings: dict, prepared: onnx.ModelProto, given: dict
    ) -> None:
        self.kind = kind
        self.model = model  # what the pass is given
        self.given = given  # the caller's settings, for the report
        self.prepared = prepared  # the fp32 model the pass quantizes: its node names
        self.excluded = tuple(settings.get("nodes_to_exclude", ()))
        self.settings = {k: v for k, v in settings.items() if k != "nodes_to_exclude"}
        self.ranges: CalibrationRanges | None = settings.get("ranges")
        self.full = kind(**self.settings, nodes_to_exclude=self.excluded)(model)
        self.op_types = {n.name: n.op_type for n in prepared.graph.node if n.name}

    @classmethod
    def for_mode(cls, mode: str, model, calib, settings: dict, progress: bool) -> Variants:
        if mode == "static":
            return cls._static(model, calib, settings, progress)
        return cls._dynamic(model, settings)

    @classmethod
    def _static(cls, model, calib, settings: dict, progress: bool) -> Variants:
        if settings.get("format", "qdq") != "qdq":
            raise BadInputError(
                "sensitivity measures QDQ models (QOperator uses the same scales and zero "
                "points: the ranking carries over)",
                "drop the format setting",
            )
        if isinstance(calib, CalibrationRanges):  # accept: Constant weights moved...
            model, _ = make_pass(StaticQuantize, {**settings, "ranges": calib}).accept(model)
            ranges = calib
        else:
            calibrator = make_pass(
                StaticQuantize, {**settings, "calibration": calib, "progress": progress}
            )
            model, _ = calibrator.accept(model)
            ranges = calibrator.calibrate(model)
        if ranges.prepared is None:  # loaded from a file: pre-process once here
            with tempfile.TemporaryDirectory(prefix="onnxship-sensitivity-") as tmp:
                done = preprocess(model, Path(tmp), ranges.preprocess)
            prepared = done.model.SerializeToString(deterministic=True)
            ranges = dataclasses.replace(ranges, prepared=prepared, prepared_note=done.note)
        prepared = onnx.load_from_string(ranges.prepared)
        variants = {**settings, "ranges": ranges, "progress": False}
        if settings.get("weight_rounding") == "gptq" and not isinstance(calib, CalibrationRanges):
            variants["calibration"] = calib  # GPTQ reads the samples again, beside the ranges
        return cls(StaticQuantize, model, variants, prepared, settings)

    @classmethod
    def _dynamic(cls, model, settings: dict) -> Variants:
        """Pre-process once here; the pass then quantizes the pre-processed model as it is."""
        model, _ = make_pass(DynamicQuantize, settings).accept(model)
        with tempfile.TemporaryDirectory(prefix="onnxship-sensitivity-") as tmp:
            prepared = preprocess(model, Path(tmp), settings.get("preprocess", True)).model
        return cls(DynamicQuantize, prepared, {**settings, "preprocess": False}, prepared, settings)

    def candidates(self) -> tuple[list[str], dict[str, str]]:
        """(The nodes to score, in graph order; pass-through nodes not scored → why.)"""
        skip = _pass_through_ops("static" if self.kind is StaticQuantize else "dynamic")
        candidates, not_scored = [], {}
        for name in self.full.stats["nodes"]["quantized"]:
            if self.op_types.get(name) in skip:
                not_scored[name] = "passes int8 data through (no error of its own)"
            else:
                candidates.append(name)
        return candidates, not_scored

    def alone(self, name: str) -> onnx.ModelProto | None:
        """The fp32 model with only node ``name`` quantized as in ``full``: its inputs and
        weights (static), the node as dynamic quantization replaced it (dynamic). None when
        ``full`` does not quantize it on its own (a Relu fused into the node before it)."""
        if self.kind is DynamicQuantize:
            return _with_replacement(self.prepared, self.full.model, name)
        chains = _input_chains(self.full.model, name)
        return _quantize_inputs(self.prepared, self.full.model, name, chains) if chains else None

    def quantize(self, keep_fp32: Sequence[str]) -> onnx.ModelProto:
        """Every node quantized but ``keep_fp32`` (and the excluded ones), by the pass. Its
        ``call`` directly: ``requires``/``ensures`` ran on the full quantization of the same
        model with the same settings; skipping them spares hashing the model three times."""
        exclude = sorted({*self.excluded, *keep_fp32})
        return self.kind(**self.settings, nodes_to_exclude=exclude).call(self.model).model

    def effective_settings(self) -> dict[str, Any]:
        """The pass settings used (defaults included), without calibration details."""
        made = self.kind(**self.given)
        drop = {"calibration", "ranges", "progress", "calib_method", "calib_samples"}
        out = {k: v for k, v in made.settings().items() if k not in drop | {"calib_batch_size"}}
        out["nodes_to_exclude"] = sorted(self.excluded)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(out.items())}

    def calibration(self, calib) -> dict[str, Any] | None:
        if self.ranges is None:
            return None
        source = None if isinstance(calib, CalibrationRanges) else str(calib)
        return {"data": source, "method": self.ranges.method, "samples": self.ranges.samples}


def _input_chains(qdq: onnx.ModelProto, name: str) -> dict[int, list[onnx.NodeProto]]:
    """Input index → the QuantizeLinear (activations) and DequantizeLinear nodes feeding node
    ``name`` in the QDQ model ``qdq``; empty when it reads no quantized input (or is gone:
    a Relu fused into the node before it)."""
    producers = {o: n for n in qdq.graph.node for o in n.output}
    node = next((n for n in qdq.graph.node if n.name == name), None)
    chains = {}
    for i, value in enumerate(node.input if node is not None else ()):
        dq = producers.get(value)
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = producers.get(dq.input[0])
        chains[i] = ([q] if q is not None and q.op_type == "QuantizeLinear" else []) + [dq]
    return chains


def _quantize_inputs(
    fp32: onnx.ModelProto,
    qdq: onnx.ModelProto,
    name: str,
    chains: Mapping[int, Sequence[onnx.NodeProto]],
) -> onnx.ModelProto:
    """A copy of ``fp32`` where node ``name`` reads its inputs through copies of ``chains``
    (Q/DQ nodes of ``qdq``, renamed apart) with their initializers and ``qdq``'s opsets.
    Tensor names are matched by input position: ORT renames tensors around fused nodes."""
    out = onnx.ModelProto()
    out.CopyFrom(fp32)
    nodes = list(out.graph.node)
    index = next(i for i, n in enumerate(nodes) if n.name == name)
    target, added = nodes[index], []
    for i, chain in sorted(chains.items()):
        value = target.input[i]  # the fp32 value a QuantizeLinear reads
        for k, original in enumerate(chain):
            node = onnx.NodeProto()
            node.CopyFrom(original)
            node.name = f"{name}/sensitivity/input{i}/{node.op_type}"
            if k or node.op_type == "QuantizeLinear":
                node.input[0] = value
            node.output[0] = value = f"{node.name}:0"
            added.append(node)
        target.input[i] = value
    have = {t.name for t in out.graph.initializer}
    needed = {x for n in added for x in n.input if x not in have}
    out.graph.initializer.extend(t for t in qdq.graph.initializer if t.name in needed)
    del out.graph.node[:]
    out.graph.node.extend(nodes[:index] + added + nodes[index:])
    del out.opset_import[:]
    out.opset_import.extend(qdq.opset_import)
    return out


def _with_replacement(
    fp32: onnx.ModelProto, quantized: onnx.ModelProto, name: str
) -> onnx.ModelProto | None:
    """A copy of ``fp32`` whose node ``name`` is replaced by the nodes that compute its outputs
    in the dynamically ``quantized`` model (DynamicQuantizeLinear, MatMulInteger, scale Muls,
    ...), back to the values the two graphs share, with their initializers and opsets. None
    when ``quantized`` computes its outputs without quantization ops. (Dynamic quantization
    replaces nodes and keeps their output names; static QDQ renames tensors around fused
    Relus, hence :func:`_quantize_inputs` there.)"""
    out = onnx.ModelProto()
    out.CopyFrom(fp32)
    nodes = list(out.graph.node)
    index = next(i for i, n in enumerate(nodes) if n.name == name)
    shared = {o for i, n in enumerate(nodes) if i != index for o in n.output}
    shared |= {v.name for v in out.graph.input}
    producers = {o: n for n in quantized.graph.node for o in n.output}
    picked, stack = set(), [o for o in nodes[index].output if o]
    while stack:
        node = producers.get(value := stack.pop())
        if value in shared or node is None or id(node) in picked:
            continue
        picked.add(id(node))
        stack.extend(i for i in node.input if i)
    added = [n for n in quantized.graph.node if id(n) in picked]
    have = {t.name for t in out.graph.initializer}
    needed = {i for n in added for i in n.input if i not in have}
    out.graph.initializer.extend(t for t in quantized.graph.initializer if t.name in needed)
    del out.graph.node[:]
    out.graph.node.extend(nodes[:index] + added + nodes[index + 1 :])
    del out.opset_import[:]
    out.opset_import.extend(quantized.opset_import)
    return out if is_quantized(out) else None


def _pass_through_ops(mode: str) -> frozenset[str]:
    """Ops onnxruntime quantizes only as 8-bit pass-through (same scale in and out)."""
    from onnxruntime.quantization.operators.direct_q8 import Direct8BitOp, QDQDirect8BitOp
    from onnxruntime.quantization.registry import IntegerOpsRegistry, QDQRegistry

    registry = QDQRegistry if mode == "static" else IntegerOpsRegistry
    kinds = (Direct8BitOp, QDQDirect8BitOp)
    return frozenset(op for op, cls in registry.items() if issubclass(cls, kinds))
