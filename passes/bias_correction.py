"""Empirical bias correction for static int8 Conv/Gemm (Nagel et al., "Data-Free
Quantization", ICCV 2019, §4.2 empirical variant; AIMET's ``bias_correction.py``).

Rounding weights and clipping activations shifts the *mean* output of each channel: the error
``E[ŷ] − E[y]`` is not zero, and a ReLU network passes it on, layer after layer (measured on
MobileNetV2, mse ranges, no equalization: the linear bottleneck projections shift most,
0.3–0.64 of their mean |output| per channel in the first blocks, the others 0.01–0.07). This
pass
measures, in graph order, each quantized Conv/Gemm's per-output-channel mean pre-activation
output on the first calibration samples — in the quantized model with the corrections of the
layers before it already applied — against the float model's, and adds the difference to
the bias. Sequential on purpose: a layer is corrected for the error that really reaches it.

The bias stays what the quantizer made it: an int32 initializer dequantized with scale
``input_scale · weight_scale`` and zero point 0; only the integers change (by
``round(δ / scale)``), so the graph and the kernels onnxruntime fuses are the same.
Conv/Gemm nodes without a quantized bias (none, or kept float) are left alone and counted.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from converter.core.runtime import make_session, tensor_values
from passes.base import fingerprint

__all__ = [
    "MIN_SAMPLES",
    "BiasJob",
    "FloatTargets",
    "batches_digest",
    "bias_jobs",
    "correct_biases",
    "first_samples",
]

logger = logging.getLogger(__name__)

MIN_SAMPLES = 16  # fewer: the measured mean shift is mostly noise
_INT32 = np.iinfo(np.int32)


@dataclass
class BiasJob:
    """One quantized Conv/Gemm whose bias can be corrected: its output in the quantized model
    and in the float model, the bias's int32 initializer and scale, the channel axis."""

    node: str
    output: str
    float_output: str
    bias: str
    scale: str
    axis: int


def bias_jobs(qdq: onnx.ModelProto, float_model: onnx.ModelProto) -> tuple[list[BiasJob], int]:
    """The Conv/Gemm nodes of ``qdq`` (graph order) with an int32 bias dequantized from an
    initializer and a float twin of the same name; and how many others were skipped."""
    inits = {t.name: t for t in qdq.graph.initializer}
    producer = {o: n for n in qdq.graph.node for o in n.output}
    twins = {n.name: n for n in float_model.graph.node if n.op_type in ("Conv", "Gemm")}
    jobs, skipped = [], 0
    for node in qdq.graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        dq = producer.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        is_dq = dq is not None and dq.op_type == "DequantizeLinear"
        stored = inits.get(dq.input[0]) if is_dq else None
        twin = twins.get(node.name)
        if stored is None or stored.data_type != onnx.TensorProto.INT32 or twin is None:
            skipped += 1
            continue
        axis = 1 if node.op_type == "Conv" else -1
        out, bias, scale = node.output[0], dq.input[0], dq.input[1]
        jobs.append(BiasJob(node.name, out, twin.output[0], bias, scale, axis))
    return jobs, skipped


def first_samples(
    feeds: Iterable[Mapping[str, np.ndarray]], count: int
) -> list[dict[str, np.ndarray]]:
    """The first ``count`` samples of ``feeds``, as batches (the last one cut)."""
    taken, batches = 0, []
    for feed in feeds:
        size = len(next(iter(feed.values())))
        keep = min(size, count - taken)
        batches.append({k: v[:keep] for k, v in feed.items()})
        taken += keep
        if taken >= count:
            break
    return batches


def _channel_means(value: np.ndarray, axis: int) -> np.ndarray:
    """Sum over every axis but ``axis`` (float64), per channel; divided by the caller. The
    channel rows are gathered before widening to float64 (half the bytes copied, the same
    float64 rows, so the same sums)."""
    moved = np.moveaxis(np.asarray(value), axis, 0)
    return moved.reshape(moved.shape[0], -1).astype(np.float64).sum(axis=1)


def batches_digest(batches: list[Mapping[str, np.ndarray]]) -> str:
    """A digest of ``batches`` (names, dtypes, shapes, bytes): what a FloatTargets entry
    was measured on."""
    h = hashlib.sha256()
    for batch in batches:
        for name in sorted(batch):
            value = np.ascontiguousarray(batch[name])
            h.update(f"{name}|{value.dtype}|{value.shape}|".encode())
            h.update(value.tobytes())
    return h.hexdigest()


@dataclass
class FloatTargets:
    """The float model's mean output per channel, by (batches digest, tensor): what bias
    correction aims at. The float model is the same for every quantization made from one
    :class:`passes.calibration.CalibrationRanges` (it carries the pre-processed model), so
    its candidates — auto builds up to ten from one set of ranges — measure it once.
    ``model`` is the float model's fingerprint: entries of another model are never read."""

    model: str = ""
    means: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)


def _targets(
    float_model: onnx.ModelProto,
    jobs: list[BiasJob],
    batches: list[Mapping[str, np.ndarray]],
    cache: FloatTargets | None,
) -> dict[str, np.ndarray]:
    """The float targets of ``jobs``; with ``cache``, those measured before are read and the
    first measurement takes every Conv/Gemm output of the float model (a later quantization
    with nodes kept float needs a subset of them)."""
    names = [j.float_output for j in jobs]
    axes = {j.float_output: j.axis for j in jobs}
    if cache is None:
        return _mean_outputs(float_model, names, [axes[n] for n in names], batches)
    key = fingerprint(float_model)
    if cache.model != key:
        cache.model, cache.means = key, {}
    digest = batches_digest(batches)
    missing = [n for n in names if (digest, n) not in cache.means]
    if missing:
        every = {
            n.output[0]: (1 if n.op_type == "Conv" else -1)
            for n in float_model.graph.node
            if n.op_type in ("Conv", "Gemm")
        }
        every.update(axes)
        wanted = [n for n in every if (digest, n) not in cache.means]
        measured = _mean_outputs(float_model, wanted, [every[n] for n in wanted], batches)
        cache.means.update({(digest, n): m for n, m in measured.items()})
    return {n: cache.means[(digest, n)] for n in names}


def _mean_outputs(model, names, axes, batches) -> dict[str, np.ndarray]:
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for _, values in tensor_values(model, names, batches):
        for name, axis, value in zip(names, axes, values):
            sums[name] = sums.get(name, 0) + _channel_means(value, axis)
            counts[name] = counts.get(name, 0) + value.size // value.shape[axis]
    return {name: sums[name] / counts[name] for name in names}


def _segment(
    model: onnx.ModelProto,
    nodes: list[onnx.NodeProto],
    inputs: list[tuple[str, int]],
    outputs: list[str],
) -> bytes:
    """A model of ``nodes`` (a stretch of ``model``'s topological order) reading ``inputs``
    (name, ONNX element type) and writing ``outputs``, with the initializers it reads."""
    used = {name for node in nodes for name in node.input}
    graph = onnx.helper.make_graph(
        nodes,
        "segment",
        [onnx.helper.make_tensor_value_info(n, t, None) for n, t in inputs],
        [onnx.ValueInfoProto(name=n) for n in outputs],  # types: onnxruntime infers them
        [t for t in model.graph.initializer if t.name in used],
    )
    segment = onnx.helper.make_model(graph, opset_imports=model.opset_import)
    segment.ir_version = model.ir_version
    return segment.SerializeToString()


def _activation_dequantizers(nodes, inits) -> dict[str, onnx.NodeProto]:
    """Output → node of each DequantizeLinear of an activation (not of an initializer)."""
    return {
        n.output[0]: n for n in nodes if n.op_type == "DequantizeLinear" and n.input[0] not in inits
    }


def _with_dequantizers(stretch, dequantized) -> list[onnx.NodeProto]:
    """``stretch`` with the DequantizeLinear of each activation it reads from before it
    repeated in front: segments then pass int8 tensors, never dequantized ones, so
    onnxruntime fuses the DQ → op → Q groups there as it does in the whole model."""
    made = {o for n in stretch for o in n.output}
    extra = {}
    for node in stretch:
        for name in node.input:
            if name in dequantized and name not in made:
                extra[name] = dequantized[name]
    return [*extra.values(), *stretch]


def _elem_type(value: np.ndarray) -> int:
    return onnx.helper.np_dtype_to_tensor_dtype(value.dtype)


def correct_biases(
    qdq: onnx.ModelProto,
    float_model: onnx.ModelProto,
    batches: list[Mapping[str, np.ndarray]],
    float_targets: FloatTargets | None = None,
) -> dict[str, object]:
    """Correct the int32 biases of ``qdq`` in place, in graph order, so that each quantized
    Conv/Gemm's mean output per channel on ``batches`` matches ``float_model``'s. Returns
    stats: layers corrected and skipped, samples, and the mean |shift| corrected (relative to
    the layer's mean |output|, averaged over layers, each measured when its turn came).

    Each node runs once: the graph is cut after every corrected layer into segments, the
    tensors alive at a cut are kept (for every sample), and a corrected layer's output is
    moved by its bias change (the bias adds per channel) before the next segment reads it.
    ``float_targets``: the float model's means measured before, reused (and filled in)."""
    jobs, skipped = bias_jobs(qdq, float_model)
    samples = sum(len(next(iter(b.values()))) for b in batches)
    if not jobs or not samples:
        return {"layers": 0, "skipped": skipped, "samples": samples}
    targets = _targets(float_model, jobs, batches, float_targets)
    nodes = list(qdq.graph.node)
    position = {n.name: i for i, n in enumerate(nodes)}
    inits = {t.name: t for t in qdq.graph.initializer}
    dequantized = _activation_dequantizers(nodes, inits)
    last_read: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            last_read[name] = i
            if name in dequantized:  # its DequantizeLinear is repeated where it is read
                last_read[dequantized[name].input[0]] = i
    live: dict[str, list[np.ndarray]] = {
        name: [np.asarray(b[name]) for b in batches] for name in batches[0]
    }
    begin, shifts = 0, 0.0
    for job in jobs:
        end = position[job.node] + 1
        stretch = _with_dequantizers(nodes[begin:end], dequantized)
        made = {o for n in stretch for o in n.output}
        reads = [x for x in dict.fromkeys(i for n in stretch for i in n.input) if x in live]
        reads = [x for x in reads if x not in made]
        later = [o for o in made if last_read.get(o, -1) >= end and o not in dequantized]
        keep = list(dict.fromkeys([*later, job.output]))
        session = make_session(
            _segment(qdq, stretch, [(x, _elem_type(live[x][0])) for x in reads], keep),
            built=True,
        )
        runs = [session.run(keep, {x: live[x][b] for x in reads}) for b in range(len(batches))]
        for k, name in enumerate(keep):
            live[name] = [run[k] for run in runs]
        for name in [x for x in live if last_read.get(x, -1) < end and x != job.output]:
            del live[name]
        shifts += _correct(job, live[job.output], targets[job.float_output], inits)
        begin = end
    logger.info(
        "bias correction: %d layers on %d samples, mean shift %.3g of the output corrected",
        len(jobs), samples, shifts / len(jobs),
    )  # fmt: skip
    return {
        "layers": len(jobs),
        "skipped": skipped,
        "samples": samples,
        "mean_shift": shifts / len(jobs),
    }


def _correct(job: BiasJob, values: list[np.ndarray], target: np.ndarray, inits) -> float:
    """Move ``job``'s int32 bias (and its measured ``values``, in place) by the shift between
    ``target`` and their mean per channel; returns the shift's mean |.| relative to the
    output's."""
    sums = sum(_channel_means(v, job.axis) for v in values)
    count = sum(v.size // v.shape[job.axis] for v in values)
    shift = target - sums / count
    scale = numpy_helper.to_array(inits[job.scale]).astype(np.float64)
    old = numpy_helper.to_array(inits[job.bias]).astype(np.int64)
    new = np.clip(old + np.round(shift / scale), _INT32.min, _INT32.max)
    inits[job.bias].CopyFrom(numpy_helper.from_array(new.astype(np.int32), job.bias))
    moved = ((new - old) * scale).astype(np.float32)
    for v in values:
        shape = [1] * v.ndim
        shape[job.axis] = -1
        v += moved.reshape(shape)
    return float(np.mean(np.abs(shift))) / (float(np.mean(np.abs(target))) + 1e-12)
