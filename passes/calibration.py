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

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx

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

    from converter.runtime import make_session

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for name in names:
        if name not in known:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, _FLOAT, None))
    session = make_session(probe.SerializeToString())
    sums = {name: np.zeros(2, np.float64) for name in names}
    seen = 0
    for feed in batches:
        samples = len(next(iter(feed.values())))
        for name, value in zip(names, session.run(list(names), dict(feed))):
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
