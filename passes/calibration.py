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

__all__ = [
    "MASK_FILL",
    "MaskSafeHistogramCollector",
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


class MaskSafeHistogramCollector(_collector_base()):
    """ORT's ``HistogramCollector`` that ignores mask fill values (see the module doc)."""

    def collect(self, name_to_arr: Mapping[str, object]) -> None:
        cleaned = {}
        for name, arrays in name_to_arr.items():
            parts = arrays if isinstance(arrays, list) else [arrays]
            kept = [_drop_mask_fills(a) for a in parts]
            cleaned[name] = np.concatenate(kept) if kept else np.zeros(0, np.float32)
        super().collect(cleaned)


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
