"""Activation equalization before static int8 (cross-layer scaling into depthwise convolutions).

Static int8 quantizes each activation tensor with one scale (onnxruntime's integer kernels take
a per-tensor input scale). In a pretrained CNN the channels of one tensor can span very
different ranges: in torchvision's MobileNetV2 the stem's output channel 22 reaches 6.0 while
channel 18 stays below 0.55 — and the depthwise filter after it has weights up to 15 that
cancel, so the step of a [0, 6] scale on channel 18 is amplified into the output.

For ``Conv₁ → [Relu | Clip(0, c)] → Conv₂`` with ``Conv₂`` depthwise (each output channel reads
its own input channel), multiplying ``Conv₁``'s output channel ``i`` (weights and bias) by
``fᵢ > 0`` and dividing ``Conv₂``'s channel ``i`` weights by ``fᵢ`` leaves the float network
unchanged (a positive scale commutes with Relu), and per-channel weight quantization of both
convolutions is unaffected (their scales follow the channel). Only the activation between
them changes: each channel is stretched towards the tensor's calibrated maximum ``T``
(``fᵢ = min(cap, T / maxᵢ)``, never below 1), so the per-tensor int8 step serves every channel.

Clip's upper bound is handled honestly rather than replaced: a stretched channel ``i`` is cut at
``c`` in stretched units, i.e. at ``c / fᵢ ≥ maxᵢ`` in the original — never inside the
calibrated range (there the float model is unchanged), and beyond it the int8 tensor saturates
at ``T`` (= ``maxᵢ`` in channel ``i``'s units) whatever the Clip says. Pairs whose second
convolution is dense are left alone and counted: stretching an input channel there shrinks
that column of the weights against its row's scale (measured: weight-only fidelity of
MobileNetV2 fell from 0.980 to 0.916 mean cosine when those pairs were included).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from converter.core.runtime import tensor_values

__all__ = ["EQUALIZE_CAP", "Pair", "equalize", "equalizable_pairs"]

logger = logging.getLogger(__name__)

EQUALIZE_CAP = 32.0  # largest stretch of one channel


@dataclass
class Pair:
    """``first`` (Conv) → optional ``activation`` (Relu/Clip) → ``tensor`` → ``readers``."""

    first: onnx.NodeProto
    activation: onnx.NodeProto | None
    tensor: str
    readers: list[onnx.NodeProto] = field(default_factory=list)


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _clip_from_zero(node: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto]) -> bool:
    """A Clip whose lower bound is 0 (input or, before opset 11, attribute)."""
    if len(node.input) > 1 and node.input[1]:
        low = inits.get(node.input[1])
        return low is not None and float(numpy_helper.to_array(low)) == 0.0
    return float(_attr(node, "min", -np.inf)) == 0.0


def _depthwise(node: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto]) -> bool:
    w = inits.get(node.input[1]) if len(node.input) > 1 else None
    if node.op_type != "Conv" or w is None or len(w.dims) < 3:
        return False
    return w.dims[1] == 1 and _attr(node, "group", 1) == w.dims[0] > 1


def equalizable_pairs(model: onnx.ModelProto) -> tuple[list[Pair], int]:
    """The pairs :func:`equalize` scales, and how many Conv → Conv pairs it skips (second
    convolution dense, tensor read by other ops or a graph output, weights shared)."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    pairs, skipped = [], 0
    for node in graph.node:
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        tensor, activation = node.output[0], None
        after = readers.get(tensor, [])
        if len(after) == 1 and after[0].op_type in ("Relu", "Clip") and tensor not in outputs:
            if after[0].op_type == "Clip" and not _clip_from_zero(after[0], inits):
                continue
            activation, tensor = after[0], after[0].output[0]
            after = readers.get(tensor, [])
        if not after or not all(r.op_type == "Conv" and r.input[0] == tensor for r in after):
            continue
        weights = [node.input[1], *(node.input[2:3])] + [r.input[1] for r in after]
        shared = any(len(readers.get(w, [])) != 1 for w in weights if w)
        if tensor in outputs or shared or not all(_depthwise(r, inits) for r in after):
            skipped += 1
            continue
        pairs.append(Pair(node, activation, tensor, after))
    return pairs, skipped


def _channel_maxima(
    model: onnx.ModelProto, names: list[str], feeds: Iterable[Mapping[str, np.ndarray]]
) -> tuple[dict[str, np.ndarray], int]:
    """Per-channel max |value| of each NCHW tensor over the calibration batches."""
    maxima: dict[str, np.ndarray] = {}
    samples = 0
    for feed, values in tensor_values(model, names, feeds):
        samples += len(next(iter(feed.values())))
        for name, value in zip(names, values):
            m = np.abs(value).max(axis=tuple(i for i in range(value.ndim) if i != 1))
            maxima[name] = np.maximum(maxima[name], m) if name in maxima else m
    return maxima, samples


def _scale(tensor: onnx.TensorProto, factor: np.ndarray) -> None:
    value = numpy_helper.to_array(tensor)
    shape = (-1,) + (1,) * (value.ndim - 1)
    tensor.CopyFrom(
        numpy_helper.from_array((value * factor.reshape(shape)).astype(value.dtype), tensor.name)
    )


def equalize(
    model: onnx.ModelProto, feeds: Iterable[Mapping[str, np.ndarray]], cap: float = EQUALIZE_CAP
) -> tuple[onnx.ModelProto, dict[str, object]]:
    """A copy of ``model`` with the activations into depthwise convolutions equalized on the
    calibration ``feeds``; stats: pairs scaled and skipped, largest stretch, samples."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    pairs, skipped = equalizable_pairs(out)
    stats: dict[str, object] = {"pairs": 0, "skipped": skipped}
    if not pairs:
        return out, stats
    maxima, samples = _channel_maxima(out, [p.tensor for p in pairs], feeds)
    inits = {t.name: t for t in out.graph.initializer}
    largest = 1.0
    for pair in pairs:
        m = maxima[pair.tensor].astype(np.float64)
        top = float(m.max())
        if top <= 0.0:
            continue
        f = np.where(m > 0, np.clip(top / np.maximum(m, 1e-30), 1.0, cap), 1.0)
        largest = max(largest, float(f.max()))
        for name in pair.first.input[1:3]:
            if name:
                _scale(inits[name], f)
        for reader in pair.readers:
            _scale(inits[reader.input[1]], 1.0 / f)
    stats.update(pairs=len(pairs), largest_stretch=round(largest, 3), samples=samples)
    logger.info(
        "equalized %d activations into depthwise convolutions (stretch ≤ %.1f, %d pairs skipped)",
        len(pairs), largest, skipped,
    )  # fmt: skip
    return out, stats
