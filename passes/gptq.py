"""GPTQ weight rounding for static int8 (Frantar et al., "GPTQ", ICLR 2023).

Nearest rounding quantizes each weight on its own. GPTQ rounds the input rows of a
``MatMul`` weight ``W [K, N]`` one after the other and spreads each row's rounding error over
the rows not rounded yet, weighted by the inverse of ``H = XᵀX`` (``X``: the MatMul's input on
calibration data), so that ``X·Ŵ`` stays close to ``X·W`` rather than ``Ŵ`` close to ``W``.
Scales, zero points and the integer range are the quantizer's own: only the integers change,
so the graph (and which kernels onnxruntime fuses) is the same as with nearest rounding.

Rows are taken in order of decreasing ``diag(H)`` ("act-order"), with the usual 1 % damping
and lazy block updates. Measured on all-MiniLM-L6-v2 with 7-bit weights (README,
"Transformer int8"): the weight part of the error roughly halves.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from converter.core.runtime import tensor_values

__all__ = [
    "StemJob",
    "WeightJob",
    "conv_patches",
    "gptq_round",
    "hessians",
    "round_stem",
    "round_weights",
    "stem_jobs",
    "weight_jobs",
]

logger = logging.getLogger(__name__)

DAMP = 0.01  # fraction of mean(diag(H)) added to the diagonal
BLOCK = 128  # rows per lazy update


@dataclass
class WeightJob:
    """One quantized weight GPTQ can re-round: the DequantizeLinear's integer initializer,
    its float original, the float activation the MatMul multiplies it with, and whether the
    weight is stored transposed ([N, K], Gemm with transB=1)."""

    quantized: str
    scale: str
    zero_point: str | None
    weight: str
    activation: str
    transposed: bool = False


def weight_jobs(qdq: onnx.ModelProto, float_model: onnx.ModelProto) -> list[WeightJob]:
    """Every 2-D weight of a MatMul/Gemm of ``float_model`` that ``qdq`` dequantizes from an
    integer initializer named ``<weight>_quantized`` (onnxruntime's naming)."""
    inits = {t.name for t in qdq.graph.initializer}
    floats = {t.name: t for t in float_model.graph.initializer if len(t.dims) == 2}
    readers = {}
    for node in float_model.graph.node:
        if node.op_type in ("MatMul", "Gemm") and node.input[1] in floats:
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            if node.input[0] not in floats:
                readers.setdefault(node.input[1], (node.input[0], trans_b))
    jobs = []
    for node in qdq.graph.node:
        name = node.input[0] if node.op_type == "DequantizeLinear" else ""
        weight = name.removesuffix("_quantized")
        if name in inits and weight != name and weight in readers:
            zero = node.input[2] if len(node.input) > 2 and node.input[2] else None
            activation, transposed = readers[weight]
            jobs.append(WeightJob(name, node.input[1], zero, weight, activation, transposed))
    return jobs


def hessians(
    model: onnx.ModelProto, names: Iterable[str], feeds: Iterable[Mapping[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """``XᵀX / rows`` (float64) of each tensor in ``names``, flattened to [rows, last axis],
    over the batches in ``feeds``."""

    names = sorted(set(names))
    sums: dict[str, np.ndarray] = {}
    rows: dict[str, int] = {}
    for _, values in tensor_values(model, names, feeds):
        for name, value in zip(names, values):
            x = value.reshape(-1, value.shape[-1]).astype(np.float64)
            sums[name] = sums.get(name, 0) + x.T @ x
            rows[name] = rows.get(name, 0) + len(x)
    return {name: sums[name] / max(rows[name], 1) for name in sums}


def gptq_round(
    weight: np.ndarray,
    hessian: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray,
    qrange: tuple[int, int],
) -> np.ndarray:
    """Integers for ``weight [K, N]`` (per-column or per-tensor ``scale``/``zero_point``)
    that keep ``X·Ŵ`` close to ``X·W`` for ``hessian = XᵀX`` [K, K]."""
    w = weight.astype(np.float64).T.copy()  # [N, K]: one row per output channel
    k = w.shape[1]
    s = np.broadcast_to(np.asarray(scale, np.float64).reshape(-1, 1), (w.shape[0], 1))
    z = np.broadcast_to(np.asarray(zero_point, np.float64).reshape(-1, 1), (w.shape[0], 1))
    order = np.argsort(-np.diag(hessian), kind="stable")
    w, h = w[:, order], hessian[np.ix_(order, order)].copy()
    dead = np.diag(h) <= 0
    h[dead, dead], w[:, dead] = 1.0, 0.0
    h[np.diag_indices(k)] += DAMP * np.mean(np.diag(h))
    inv = _upper_cholesky_of_inverse(h)
    q = np.empty_like(w)
    for start in range(0, k, BLOCK):
        end = min(start + BLOCK, k)
        errors = _round_block(w, q, inv, start, end, s, z, qrange)
        w[:, end:] -= errors @ inv[start:end, end:]
    return q[:, np.argsort(order)].T


def _round_block(w, q, inv, start, end, s, z, qrange) -> np.ndarray:
    """Round rows start..end of ``w`` into ``q``, pushing each row's error onto the rows
    after it inside the block; returns the scaled errors for the update of later blocks."""
    errors = np.empty((w.shape[0], end - start))
    for i in range(start, end):
        col = w[:, i : i + 1]
        q[:, i : i + 1] = np.clip(np.round(col / s) + z, *qrange)
        err = (col - (q[:, i : i + 1] - z) * s) / inv[i, i]
        w[:, i:end] -= err * inv[i, i:end]
        errors[:, i - start] = err[:, 0]
    return errors


def _upper_cholesky_of_inverse(h: np.ndarray) -> np.ndarray:
    """Upper Cholesky factor of ``h⁻¹``; more damping when ``h`` is near singular."""
    damp = DAMP * np.mean(np.diag(h))
    for _ in range(6):
        try:
            return np.linalg.cholesky(np.linalg.inv(h)).T
        except np.linalg.LinAlgError:
            h = h + damp * np.eye(len(h))
            damp *= 10
    raise np.linalg.LinAlgError("the calibration inputs' XᵀX is singular")


def proxy_error(weight, integers, scale, zero_point, hessian) -> float:
    """``tr(Δᵀ H Δ)`` with ``Δ = W − dequantized``: the squared output error GPTQ lowers."""
    s = np.asarray(scale, np.float64).reshape(1, -1)
    z = np.asarray(zero_point, np.float64).reshape(1, -1)
    delta = weight.astype(np.float64) - (integers.astype(np.float64) - z) * s
    return float(np.einsum("kn,kj,jn->", delta, hessian, delta))


def round_weights(
    qdq: onnx.ModelProto,
    float_model: onnx.ModelProto,
    feeds: Iterable[Mapping[str, np.ndarray]],
    qrange: Mapping[int, tuple[int, int]],
) -> dict[str, object]:
    """Re-round every weight of ``qdq`` found by :func:`weight_jobs` with GPTQ, in place.
    ``qrange`` maps an integer ONNX data type to the quantizer's (qmin, qmax). Returns stats:
    how many weights, and the proxy output error against nearest rounding."""
    jobs = weight_jobs(qdq, float_model)
    if not jobs:
        return {"method": "gptq", "weights": 0}
    h = hessians(float_model, [j.activation for j in jobs], feeds)
    inits = {t.name: t for t in qdq.graph.initializer}
    floats = {t.name: t for t in float_model.graph.initializer}
    before = after = 0.0
    for job in jobs:
        b, a = _round_one(job, inits, floats, h[job.activation], qrange)
        before, after = before + b, after + a
    logger.info("GPTQ re-rounded %d weights: proxy error %.3g → %.3g", len(jobs), before, after)
    return {
        "method": "gptq",
        "weights": len(jobs),
        "proxy_error_ratio": after / before if before > 0 else 1.0,
    }


def _round_one(job: WeightJob, inits, floats, hessian, qrange) -> tuple[float, float]:
    tensor = inits[job.quantized]
    nearest = numpy_helper.to_array(tensor)
    weight = numpy_helper.to_array(floats[job.weight])
    if job.transposed:
        weight, nearest = weight.T, nearest.T
    scale = numpy_helper.to_array(inits[job.scale])
    zero = numpy_helper.to_array(inits[job.zero_point]) if job.zero_point else np.zeros(1)
    if nearest.ndim != 2 or scale.size not in (1, nearest.shape[1]) or zero.size != scale.size:
        return 0.0, 0.0  # not per output channel or per tensor: left as rounded
    rounded = gptq_round(weight, hessian, scale, zero, qrange[tensor.data_type])
    before = proxy_error(weight, nearest, scale, zero, hessian)
    after = proxy_error(weight, rounded, scale, zero, hessian)
    if after >= before:  # never worse than nearest on the calibration data
        return before, before
    rounded = rounded.astype(nearest.dtype)
    tensor.CopyFrom(numpy_helper.from_array(rounded.T if job.transposed else rounded, tensor.name))
    return before, after


# ------------------------------------------------------------------ the stem (Convs on the input)


@dataclass
class StemJob:
    """A dense Conv that reads a graph input directly, with its quantized weight in ``qdq``."""

    node: str
    quantized: str
    scale: str
    zero_point: str | None
    weight: str
    input: str
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]
    kernel: tuple[int, int]


def _ints(node: onnx.NodeProto, name: str, default: tuple[int, ...]) -> tuple[int, ...]:
    for a in node.attribute:
        if a.name == name:
            return tuple(a.ints) if a.ints else (a.i,)
    return default


def stem_jobs(qdq: onnx.ModelProto, float_model: onnx.ModelProto) -> list[StemJob]:
    """The 2-D Convs of ``float_model`` that read a graph input (group 1, dilation 1,
    explicit or no padding) and whose weight ``qdq`` dequantizes from ``<weight>_quantized``."""
    graph_inputs = {i.name for i in float_model.graph.input}
    floats = {t.name: t for t in float_model.graph.initializer}
    dequantizers = {
        n.input[0]: n
        for n in qdq.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0].endswith("_quantized")
    }
    qinits = {t.name for t in qdq.graph.initializer}
    jobs = []
    for node in float_model.graph.node:
        if node.op_type != "Conv" or node.input[0] not in graph_inputs:
            continue
        weight = floats.get(node.input[1])
        dq = dequantizers.get(f"{node.input[1]}_quantized")
        plain = (
            _ints(node, "group", (1,)) == (1,)
            and set(_ints(node, "dilations", (1, 1))) == {1}
            and next((a.s for a in node.attribute if a.name == "auto_pad"), b"NOTSET")
            in (b"NOTSET", b"VALID")
        )
        if weight is None or len(weight.dims) != 4 or dq is None or not plain:
            continue
        if dq.input[0] not in qinits:
            continue
        zero = dq.input[2] if len(dq.input) > 2 and dq.input[2] else None
        jobs.append(
            StemJob(
                node.name, dq.input[0], dq.input[1], zero, node.input[1], node.input[0],
                tuple(_ints(node, "strides", (1, 1))), tuple(_ints(node, "pads", (0, 0, 0, 0))),
                (int(weight.dims[2]), int(weight.dims[3])),
            )
        )  # fmt: skip
    return jobs


def conv_patches(x: np.ndarray, job: StemJob) -> np.ndarray:
    """The im2col rows of ``x`` [N, C, H, W] for ``job``'s Conv: [N·H'·W', C·kh·kw], in the
    order of the weight's ``reshape(out, -1)``."""
    top, left, bottom, right = job.pads
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, job.kernel, axis=(2, 3))
    windows = windows[:, :, :: job.strides[0], :: job.strides[1]]  # N, C, H', W', kh, kw
    return windows.transpose(0, 2, 3, 1, 4, 5).reshape(
        -1, x.shape[1] * job.kernel[0] * job.kernel[1]
    )


def round_stem(
    qdq: onnx.ModelProto,
    float_model: onnx.ModelProto,
    batches: Iterable[Mapping[str, np.ndarray]],
    qrange: Mapping[int, tuple[int, int]],
) -> dict[str, object]:
    """Re-round, in place, the weights of the Convs that read the model's input with GPTQ
    (``H = XᵀX`` of their im2col patches on ``batches``: the inputs are the data itself, no
    model run). Only there: the stem's Hessian is small (C·kh·kw, 27 for RGB 3×3) and well
    estimated, and its weight error is what the next layers amplify most (README, "CNN
    int8"). Returns stats: Convs re-rounded and the proxy error against nearest rounding."""
    jobs = stem_jobs(qdq, float_model)
    if not jobs:
        return {"convs": 0}
    sums: dict[str, np.ndarray] = {}
    rows: dict[str, int] = {}
    for feed in batches:
        for job in jobs:
            x = np.asarray(feed[job.input], np.float64)
            for i in range(len(x)):  # one sample at a time: the patches are 9x the input
                p = conv_patches(x[i : i + 1], job)
                sums[job.node] = sums.get(job.node, 0) + p.T @ p
                rows[job.node] = rows.get(job.node, 0) + len(p)
    inits = {t.name: t for t in qdq.graph.initializer}
    floats = {t.name: t for t in float_model.graph.initializer}
    before = after = 0.0
    for job in jobs:
        if job.node not in sums:
            continue
        hessian = sums[job.node] / rows[job.node]
        as_matmul = WeightJob(job.quantized, job.scale, job.zero_point, job.weight, job.input)
        b, a = _round_conv(as_matmul, inits, floats, hessian, qrange)
        before, after = before + b, after + a
    logger.info("GPTQ re-rounded %d stem Convs: proxy error %.3g → %.3g", len(jobs), before, after)
    return {"convs": len(jobs), "proxy_error_ratio": after / before if before > 0 else 1.0}


def _round_conv(job: WeightJob, inits, floats, hessian, qrange) -> tuple[float, float]:
    """:func:`_round_one` for a Conv weight [out, C, kh, kw], as a MatMul weight [C·kh·kw, out]."""
    tensor = inits[job.quantized]
    nearest = numpy_helper.to_array(tensor)
    weight = numpy_helper.to_array(floats[job.weight])
    shape = nearest.shape
    scale = numpy_helper.to_array(inits[job.scale])
    zero = numpy_helper.to_array(inits[job.zero_point]) if job.zero_point else np.zeros(1)
    if scale.size not in (1, shape[0]) or zero.size != scale.size:
        return 0.0, 0.0
    w2, n2 = weight.reshape(shape[0], -1).T, nearest.reshape(shape[0], -1).T
    rounded = gptq_round(w2, hessian, scale, zero, qrange[tensor.data_type])
    before = proxy_error(w2, n2, scale, zero, hessian)
    after = proxy_error(w2, rounded, scale, zero, hessian)
    if after >= before:  # never worse than nearest on the calibration data
        return before, before
    rounded = rounded.T.reshape(shape).astype(nearest.dtype)
    tensor.CopyFrom(numpy_helper.from_array(rounded, tensor.name))
    return before, after
