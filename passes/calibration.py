"""Range estimation for static int8 beyond onnxruntime's calibrators.

Two pieces, both used by :class:`passes.quantize.StaticQuantize`:

* ``mean_minmax``: per-tensor activation ranges as the *average over calibration samples* of
  each sample's min and max (NNCF's ``MEAN_MINMAX`` range estimator, the one its TRANSFORMER
  model type uses for activations: ``quantization/algorithms/min_max/algorithm.py``,
  ``_get_range_estimator_parameters``). The global min/max of ORT's MinMax calibrator is set
  by the single most extreme sample, which on transformer activations (a few outlier tokens)
  wastes most of the int8 grid on values the typical input never reaches.
* :class:`MaskSafeHistogramCollector`: ORT's histogram collector (entropy, percentile,
  distribution) with attention-mask fill values ignored. Transformers export the additive
  mask as ``(1 - mask) * finfo(float32).min``; a histogram over [-3.4e38, 3.4e38] spans more
  than float32 can hold and numpy stops with "Too many bins for data range". Values whose
  magnitude reaches :data:`MASK_FILL` are such fills (no real activation comes near), so they
  are dropped before the histogram; their tensor's range then covers the real values.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from converter.core.errors import BadInputError, first_line
from converter.core.onnxio import atomic_write_text
from converter.core.runtime import tensor_values
from passes.bias_correction import FloatTargets

__all__ = [
    "MASK_FILL",
    "MaskSafeHistogramCollector",
    "histogram_on_edges",
    "install_mask_safe_collector",
    "matmul_inputs",
    "mean_minmax",
    "tensors_of",
]

# |x| at or above this is a mask fill (finfo(float32).min / max, or -inf), not an activation.
MASK_FILL = 1e30
_FLOAT = onnx.TensorProto.FLOAT


def tensors_of(model: onnx.ModelProto, op_types: Sequence[str], outputs: bool = True) -> list[str]:
    """Float activations (not initializers) read — and with ``outputs`` also written — by
    nodes of ``op_types``, in graph order without repeats; non-float tensors (index inputs,
    shapes) are left out when the type information says so."""
    inits = {t.name for t in model.graph.initializer}
    typed = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    typed.update({v.name: v.type.tensor_type.elem_type for v in model.graph.input})
    typed.update({v.name: v.type.tensor_type.elem_type for v in model.graph.output})
    found: dict[str, None] = {}
    for node in model.graph.node:
        if node.op_type not in op_types:
            continue
        names = [*node.input, *(node.output if outputs else ())]
        for name in names:
            if name and name not in inits and typed.get(name, _FLOAT) == _FLOAT:
                found[name] = None
    return list(found)


def matmul_inputs(model: onnx.ModelProto) -> list[str]:
    """The activations a transformer scheme quantizes: MatMul and Gemm inputs."""
    return tensors_of(model, ("MatMul", "Gemm"), outputs=False)


def _per_sample_extremes(value: np.ndarray, samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) of each sample of a batch output: its first axis is the batch when its
    size is the batch size; otherwise (a reshaped tensor) the batch splits it evenly, and a
    tensor that cannot be split counts as one sample."""
    if value.size == 0:
        return np.zeros(1, np.float64), np.zeros(1, np.float64)
    rows = samples if value.shape and value.shape[0] % samples == 0 else 1
    flat = value.reshape(rows, -1) if value.ndim else value.reshape(1, 1)
    finite = np.where(np.abs(flat) < MASK_FILL, flat, np.nan)
    lows, highs = np.nanmin(finite, axis=1), np.nanmax(finite, axis=1)
    return np.nan_to_num(lows).astype(np.float64), np.nan_to_num(highs).astype(np.float64)


def mean_minmax(
    model: onnx.ModelProto, names: Sequence[str], batches: Iterable[Mapping[str, np.ndarray]]
):
    """Run ``model`` on ``batches`` and return ORT ``TensorsData`` (MinMax kind) whose range
    for each tensor of ``names`` is (mean of the per-sample minima, mean of the per-sample
    maxima). Also returns the number of samples seen. Mask fills (|x| ≥ MASK_FILL) are not
    counted as values."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData

    sums = {name: np.zeros(2, np.float64) for name in names}
    seen = 0
    for feed, values in tensor_values(model, names, batches):
        samples = len(next(iter(feed.values())))
        for name, value in zip(names, values):
            lows, highs = _per_sample_extremes(np.asarray(value), samples)
            weight = samples / len(lows)  # a tensor that is one sample counts for the batch
            sums[name] += weight * np.array([lows.sum(), highs.sum()])
        seen += samples
    if not seen:
        raise ValueError("no calibration samples")
    data = {
        name: TensorData(
            lowest=np.array(low / seen, np.float32), highest=np.array(high / seen, np.float32)
        )
        for name, (low, high) in sums.items()
    }
    return TensorsData(CalibrationMethod.MinMax, data), seen


def _drop_mask_fills(array) -> np.ndarray:
    values = np.asarray(array).ravel()
    return values[np.abs(values) < MASK_FILL]


def _collector_base():
    from onnxruntime.quantization.calibrate import HistogramCollector

    return HistogramCollector


def _without_mask_fills(array) -> np.ndarray:
    """``array`` flat, its mask fills dropped; no copy when it has none (the usual case:
    its extremes say so, cheaper than a mask over every value)."""
    values = np.asarray(array).ravel()
    if values.size == 0:
        return values
    low, high = np.nanmin(values), np.nanmax(values)
    if -MASK_FILL < low and high < MASK_FILL:
        return values
    return _drop_mask_fills(values)


def histogram_on_edges(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """``np.histogram(values, bins=edges)[0]``, the same counts, in linear time: numpy sorts
    the values for bins given as edges (ORT's percentile calibration on MobileNetV2 spent
    127 of its 197 s there). Each value's bin is guessed from the even spacing, then moved
    until ``edges[i] <= value < edges[i + 1]`` (the last bin also holds its right edge);
    values outside the edges (and NaN) are not counted, as in numpy."""
    edges = np.asarray(edges)
    if edges.ndim != 1 or edges.size < 2 or np.any(edges[:-1] > edges[1:]):
        raise ValueError("edges must be a 1-d increasing array of at least two values")
    bins = edges.size - 1
    values = np.asarray(values).ravel()
    counts = np.zeros(bins, np.int64)
    for start in range(0, values.size, _CHUNK):  # a chunk at a time: small temporaries
        counts += _chunk_histogram(values[start : start + _CHUNK], edges)
    return counts


_CHUNK = 1 << 16  # 256 KB of float32: the temporaries stay in L2 (2x faster than 1 << 20)


def _chunk_histogram(x: np.ndarray, edges: np.ndarray) -> np.ndarray:
    bins = edges.size - 1
    first, last = edges[0], edges[-1]
    if not (x.min() >= first and x.max() <= last):  # (NaN fails both)
        x = x[(x >= first) & (x <= last)]
    if x.size == 0:
        return np.zeros(bins, np.int64)
    lower = edges[:-1]
    upper = np.append(edges[1:-1], np.inf)  # the last bin holds its right edge
    if last > first:
        guess = x - first
        guess *= np.asarray(bins / (float(last) - float(first)), guess.dtype)
        np.minimum(guess, bins - 1, out=guess)
        index = guess.astype(np.int32)
    else:
        index = np.zeros(x.size, np.int32)
    wrong = np.flatnonzero((x < lower[index]) | (x >= upper[index]))
    while wrong.size:  # the guess is off by rounding (float32 edges are not evenly spaced)
        xs, at = x[wrong], index[wrong]
        at = at - (xs < lower[at]) + (xs >= upper[at])
        index[wrong] = at
        wrong = wrong[(xs < lower[at]) | (xs >= upper[at])]
    return np.bincount(index, minlength=bins)


class MaskSafeHistogramCollector(_collector_base()):
    """ORT's ``HistogramCollector`` that ignores mask fill values (see the module doc), with
    ORT's ``collect_absolute_value`` (percentile) made linear: the same histograms, the
    later batches' counted by :func:`histogram_on_edges` instead of numpy's sort."""

    def collect(self, name_to_arr: Mapping[str, object]) -> None:
        cleaned = {}
        for name, arrays in name_to_arr.items():
            parts = arrays if isinstance(arrays, list) else [arrays]
            kept = [_without_mask_fills(a) for a in parts]
            if len(kept) == 1:
                cleaned[name] = kept[0]
            else:
                cleaned[name] = np.concatenate(kept) if kept else np.zeros(0, np.float32)
        super().collect(cleaned)

    def collect_value(self, name_to_arr: Mapping[str, np.ndarray]) -> None:
        """ORT 1.32's ``HistogramCollector.collect_value`` (entropy, distribution) without
        its copy of each flat array :meth:`collect` passes: the same histograms."""
        for tensor, data in name_to_arr.items():
            data = np.asarray(data).ravel()
            min_value, max_value = _extremes(data)
            threshold = np.array(max(abs(min_value), abs(max_value)), dtype=data.dtype)
            if tensor in self.histogram_dict:
                old = self.histogram_dict[tensor]
                merged = self.merge_histogram(old, data, min_value, max_value, threshold)
                self.histogram_dict[tensor] = merged
            else:
                hist, edges = np.histogram(data, self.num_bins, range=(-threshold, threshold))
                self.histogram_dict[tensor] = (hist, edges, min_value, max_value, threshold)

    def collect_absolute_value(self, name_to_arr: Mapping[str, np.ndarray]) -> None:
        """ORT 1.32's ``HistogramCollector.collect_absolute_value`` for flat float arrays
        (what :meth:`collect` passes), the same results."""
        for tensor, data in name_to_arr.items():
            data = np.asarray(data).ravel()
            min_value, max_value = _extremes(data)
            data = np.absolute(data)
            if data.dtype == np.float64:
                raise ValueError("only float32 or float16 activations are calibrated")
            if tensor not in self.histogram_dict:
                hist, edges = np.histogram(data, bins=self.num_bins)
                self.histogram_dict[tensor] = (hist, edges.astype(data.dtype), min_value, max_value)
                continue
            old_hist, edges, old_min, old_max = self.histogram_dict[tensor]
            top = np.nanmax(data)
            if top > edges[-1]:  # more bins of the same width, as ORT adds them
                width = edges[1] - edges[0]
                edges = np.hstack((edges, np.arange(edges[-1] + width, top + width, width)))
            hist = histogram_on_edges(data, edges)
            hist[: len(old_hist)] += old_hist
            low, high = min(old_min, min_value), max(old_max, max_value)
            self.histogram_dict[tensor] = (hist, edges.astype(data.dtype), low, high)


def install_mask_safe_collector(calibrator) -> None:
    """Give an ORT histogram calibrator (entropy, percentile, distribution) the mask-safe
    collector before its first ``collect_data``; MinMax calibrators are left as they are."""
    if not hasattr(calibrator, "num_quantized_bins"):
        return
    calibrator.collector = MaskSafeHistogramCollector(
        method=calibrator.method,
        symmetric=calibrator.symmetric,
        num_bins=calibrator.num_bins,
        num_quantized_bins=calibrator.num_quantized_bins,
        percentile=calibrator.percentile,
        scenario=calibrator.scenario,
    )


# ------------------------------------------------- ranges measured once, reused


@dataclass
class CalibrationRanges:
    """Activation ranges measured by one calibration run, reusable across quantizations.

    ``tensors`` is ORT's ``TensorsData``; ``model`` the fingerprint of the (un-processed)
    model they were measured on; ``prepared`` its pre-processed form (in memory only), which
    spares re-running pre-processing for each quantization."""

    tensors: Any
    method: str
    model: str
    preprocess: bool
    samples: int
    prepared: bytes | None = field(default=None, repr=False, compare=False)
    prepared_note: str = ""
    scheme: str = "default"
    # bias correction's float targets on ``prepared`` (in memory only): every quantization
    # made from these ranges shares them (passes.bias_correction.FloatTargets)
    float_targets: FloatTargets = field(default_factory=FloatTargets, repr=False, compare=False)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the ranges as JSON (ORT's calibration cache format plus our metadata)."""
        from onnxruntime.quantization.calibrate import CalibrationCacheEncoder

        payload = self.tensors.to_dict()
        payload["smooth_quant"] = False
        payload["onnxship"] = {
            "method": self.method,
            "model": self.model,
            "preprocess": self.preprocess,
            "samples": self.samples,
            "scheme": self.scheme,
        }
        return atomic_write_text(path, json.dumps(payload, cls=CalibrationCacheEncoder))

    @classmethod
    def load(cls, path: str | os.PathLike) -> CalibrationRanges:
        from onnxruntime.quantization.calibrate import TensorsData

        try:
            payload = json.loads(Path(path).read_text(encoding="utf-8"))
            meta = payload["onnxship"]
            tensors = TensorsData.from_dict(payload)
            return cls(
                tensors,
                meta["method"],
                meta["model"],
                meta["preprocess"],
                meta["samples"],
                scheme=meta.get("scheme", "default"),
            )
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise BadInputError(
                f"cannot read calibration ranges {path} ({first_line(e)})",
                "pass a file written by CalibrationRanges.save",
            ) from e

    def to_ort_cache(self, path: Path) -> Path:
        from onnxruntime.quantization.calibrate import save_tensors_data

        save_tensors_data(self.tensors, path)
        return path


class OneBatch:
    """An ORT CalibrationDataReader holding one feed: ORT then keeps one batch at a time."""

    def __init__(self, feed: Mapping[str, np.ndarray]) -> None:
        self.feed: Mapping[str, np.ndarray] | None = feed

    def get_next(self) -> Mapping[str, np.ndarray] | None:
        feed, self.feed = self.feed, None
        return feed


def negative_activation_ranges(model: onnx.ModelProto, tensors) -> bool:
    """True when a Relu/Clip output was given a range below zero (symmetric calibration such
    as ``distribution``). ORT's QDQ quantizer drops such activations, trusting the uint8
    range to clip at zero; with a symmetric range that lets negatives through (measured:
    digits CNN cosine 0.76), so those activations must be kept."""
    for node in model.graph.node:
        if node.op_type in ("Relu", "Clip") and node.output and node.output[0] in tensors:
            if float(np.min(tensors[node.output[0]].range_value[0])) < 0:
                return True
    return False


def _extremes(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NaN-ignoring min and max of a flat array, 0 and 0 when it is empty (as ORT's
    HistogramCollector takes them)."""
    if data.size == 0:
        zero = np.array(0, dtype=data.dtype)
        return zero, zero
    return np.nanmin(data), np.nanmax(data)
