"""Int8 quantization on top of ``onnxruntime.quantization``: dynamic and static (calibrated).

Both passes work the same way, in a private temporary folder (nothing is written next to the
user's files): pre-process the model — static mode with ``quant_pre_process`` (symbolic
shape inference + ORT basic optimization; when that fails, ONNX shape inference +
optimization; when that fails too, the model as it is, with a warning), dynamic mode with
ORT's basic optimization alone, from memory (no symbolic shape inference: it needs no
activation shapes, and sympy costs 0.4 s to import) — quantize with ``quantize_dynamic``
or ``quantize_static``, load the result. The stats say which quantizable nodes were
quantized and which stayed fp32, and why. The transformer scheme of static mode also
stores embedding tables as int8 rows (``passes/gather_int8.py``).

This module exports the two passes; the code is split by concern: ``passes/int8.py`` (what
both share: the flow, the checks, the exclusions), ``passes/dynamic.py`` and
``passes/static.py`` (the passes; static calibration streams the data one batch at a time),
``passes/settings.py`` (their settings, declared once), ``passes/ort.py`` (loading
onnxruntime.quantization without torch, its log capture, pre-processing),
``passes/calibration.py`` (ranges: reusable CalibrationRanges, mean_minmax, mask-safe
histograms), ``passes/mse_range.py`` (``mse`` ranges, the default scheme's),
``passes/bias_correction.py`` (empirical bias correction, on by default with the default
scheme), ``passes/equalize.py`` and ``passes/quant_report.py`` (the node report and the MAC
estimate).

Reusing calibration (sensitivity search, "auto"): measure the ranges once, quantize many
times with different exclusions; the ranges remember the model they were measured on (and
keep its pre-processed form in memory, so pre-processing runs once too)::

    ranges = StaticQuantize(calibration="calib.npz").calibrate(model)
    ranges.save("ranges.json")                    # optional: CalibrationRanges.load(path)
    for skip in (["node_conv2d"], ["node_linear"]):
        result = StaticQuantize(ranges=ranges, nodes_to_exclude=skip)(model)

Weights are per-channel int8; whether they use 7 bits (``reduce_range``) or all 8 is decided
by the hardware ``target`` (:mod:`converter.core.machine`): x86 CPUs without VNNI (AVX2, AVX-512F)
compute uint8 x int8 dot products with ``vpmaddubsw``, whose 16-bit pair sums saturate once
255 * |w| * 2 > 32767, so full-range weights saturate often there (measured on an AMD EPYC,
AVX2: tiny encoder worst cosine 0.974 full range vs 0.999 7-bit, same speed); VNNI and ARM
accumulate in int32, where full 8-bit weights are safe and more faithful. The default target
is ``host``; an explicit ``reduce_range`` overrides the target's choice. The resolved target
is written into the model's metadata (``onnxship.target``).

Every output is deterministic: ORT's quantizers produce the same bytes for the same input
and settings (checked in tests, across processes), and we pass every list sorted.
"""

from __future__ import annotations

from converter.core.defaults import (
    CALIB_METHODS,
    DEFAULT_CALIB_BATCH,
    QUANT_TYPES,
    WEIGHT_ROUNDINGS,
)
from converter.core.defaults import QUANT_FORMATS as FORMATS
from converter.core.defaults import QUANT_SCHEMES as SCHEMES
from passes.calibration import CalibrationRanges
from passes.dynamic import CONV_DOMINATED, DynamicQuantize
from passes.ort import preprocess
from passes.quant_report import is_quantized, quantized_nodes
from passes.static import StaticQuantize, calibrate, default_calib_method, looks_like_transformer

__all__ = [
    "DynamicQuantize",
    "StaticQuantize",
    "CalibrationRanges",
    "calibrate",
    "is_quantized",
    "quantized_nodes",
    "CALIB_METHODS",
    "FORMATS",
    "QUANT_TYPES",
    "DEFAULT_CALIB_BATCH",
    "SCHEMES",
    "WEIGHT_ROUNDINGS",
    "preprocess",
    "default_calib_method",
    "looks_like_transformer",
    "CONV_DOMINATED",
]
