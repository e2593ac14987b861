"""Int8 quantization on top of ``onnxruntime.quantization``: dynamic and static (calibrated).

Both passes work the same way, in a private temporary folder (nothing is written next to the
user's files): save the model, pre-process it with ``quant_pre_process`` (symbolic shape
inference + ORT basic optimization; when that fails, ONNX shape inference + optimization;
when that fails too, the model as it is, with a warning), quantize with ``quantize_dynamic``
or ``quantize_static``, load the result. The stats say which quantizable nodes were
quantized and which stayed fp32, and why.

This module holds the two passes; the rest is split by concern: ``passes/ort.py`` (loading
onnxruntime.quantization without torch, its log capture, pre-processing),
``passes/calibration.py`` (ranges: reusable CalibrationRanges, mean_minmax, mask-safe
histograms) and ``passes/quant_report.py`` (the node report and the MAC estimate).

Static quantization calibrates with its own loop over ORT's calibrators: one
``collect_data`` call per batch, so ORT never holds more than one batch of activations
(ORT's histogram calibrators otherwise keep every intermediate output of the whole data set
until the reader is exhausted, and cannot take a reader whose last batch is smaller; MinMax's
``CalibMaxIntermediateOutputs`` is no way out in ORT 1.32: it discards the outputs it clears
instead of merging them, so ranges come from the last few batches only), and
the data is streamed by :func:`converter.core.data.open_data` one batch at a time with a NaN/Inf
check per batch, so memory does not grow with the sample count. The ranges then go to
``quantize_static`` through its calibration cache file.

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

import logging
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from tqdm import tqdm

from converter.core import defaults
from converter.core.data import model_input_specs, open_data
from converter.core.errors import BadInputError, DataError, OnnxshipError, PassError, first_line
from converter.core.machine import METADATA_KEY, Target, resolve_target
from converter.core.onnxio import save_model
from passes.base import Pass, PassResult, fingerprint
from passes.calibration import (
    CalibrationRanges,
    OneBatch,
    install_mask_safe_collector,
    mean_minmax,
    negative_activation_ranges,
    tensors_of,
)
from passes.gptq import round_weights
from passes.ort import Prepared, method_enum, ort_quiet, preprocess, quant_type, run_ort
from passes.quant_report import (
    candidate_ops,
    is_quantized,
    macs,
    matched,
    node_report,
    quantized_nodes,
)

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
]

logger = logging.getLogger(__name__)

CALIB_METHODS = defaults.CALIB_METHODS
# Which tensors static quantization puts Q/DQ on: "default" = every op ORT's QDQ registry
# supports (inputs and outputs); "transformer" = only the inputs of MatMul/Gemm, everything
# else (residual Add, Softmax, LayerNorm, GELU, the mask's Where/Mul, Gather) stays float —
# NNCF's TRANSFORMER model type; see passes/calibration.py for its mean_minmax ranges.
SCHEMES = defaults.QUANT_SCHEMES
WEIGHT_ROUNDINGS = defaults.WEIGHT_ROUNDINGS
_TRANSFORMER_OPS = ("Gemm", "MatMul")
FORMATS = defaults.QUANT_FORMATS
QUANT_TYPES = defaults.QUANT_TYPES
DEFAULT_CALIB_BATCH = defaults.DEFAULT_CALIB_BATCH
# Share of Conv multiply-accumulates above which dynamic int8 is slower than fp32 (ConvInteger
# has no fast kernel on CPU: measured ~4x slower on a ResNet-18).
CONV_DOMINATED = 0.5


# --------------------------------------------------------------------------- helpers


def _compile_all(patterns: Sequence[str], flag: str) -> list[re.Pattern]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as e:
            raise BadInputError(
                f"{flag} {pattern!r} is not a valid regular expression ({e})",
                "escape special characters, e.g. 'node_conv2d\\.1'",
            ) from e
    return compiled


def _check_choice(value: str, choices: Sequence[str], what: str) -> str:
    if value not in choices:
        raise BadInputError(f"unknown {what} {value!r}", f"use one of {', '.join(choices)}")
    return value


# --------------------------------------------------------------------------- stats


# --------------------------------------------------------------------------- base pass


# The settings both int8 passes take (each declares them in its own __init__ signature, so
# that settings() and make_pass() see every one).
_COMMON_SETTINGS = (
    "per_channel",
    "reduce_range",
    "target",
    "weight_type",
    "exclude",
    "exclude_ops",
    "nodes_to_exclude",
    "preprocess",
)


class _Int8Pass(Pass):
    """Shared settings, checks and the temp-folder flow of both quantization passes."""

    mode = "dynamic"

    def _init_common(
        self,
        per_channel: bool,
        reduce_range: bool | None,
        target: str | Target | None,
        weight_type: str,
        exclude: Sequence[str],
        exclude_ops: Sequence[str],
        nodes_to_exclude: Sequence[str],
        preprocess: bool,
    ) -> None:
        self.per_channel = bool(per_channel)
        self._target = resolve_target(target)
        self.target = self._target.name
        self.reduce_range = (
            self._target.reduce_range if reduce_range is None else bool(reduce_range)
        )
        self.weight_type = _check_choice(weight_type, QUANT_TYPES, "weight type")
        self.exclude = tuple(exclude)
        self.exclude_ops = tuple(exclude_ops)
        self.nodes_to_exclude = tuple(nodes_to_exclude)
        self.preprocess = bool(preprocess)
        self._patterns = _compile_all(self.exclude, "--exclude")

    def requires(self, model: onnx.ModelProto) -> None:
        if is_quantized(model):
            found = quantized_nodes(model)
            raise BadInputError(
                f"the model is already quantized ({len(found)} quantization nodes, e.g. "
                f"{found[0]})",
                "quantize the original float model",
            )
        if not any(t.data_type == onnx.TensorProto.FLOAT for t in model.graph.initializer):
            raise BadInputError(
                "the model has no float32 weights to quantize",
                "quantize the fp32 model (before any fp16 conversion)",
            )

    def exclusions(self, model: onnx.ModelProto) -> dict[str, str]:
        """Node name → why it is kept in fp32, for every node the settings exclude."""
        out = {}
        for node in model.graph.node:
            reason = matched(node, self._patterns, self.exclude_ops, self.nodes_to_exclude)
            if reason and node.name:
                out[node.name] = reason
        self._warn_unmatched(model, out)
        return out

    def _warn_unmatched(self, model: onnx.ModelProto, excluded: Mapping[str, str]) -> None:
        types = {n.op_type for n in model.graph.node}
        for op in self.exclude_ops:
            if op not in types:
                logger.warning("warning: --exclude-op %s: the model has no %s node", op, op)
        for p in self._patterns:
            if not any(p.search(name) for name in excluded):
                logger.warning("warning: --exclude %r matched no node name", p.pattern)

    def prepare(self, model: onnx.ModelProto, folder: Path) -> Prepared:
        return preprocess(model, folder, self.preprocess)

    def call(self, model: onnx.ModelProto) -> PassResult:
        with tempfile.TemporaryDirectory(prefix="onnxship-quantize-") as tmp:
            folder = Path(tmp)
            prepared = self.prepare(model, folder)
            excluded = self.exclusions(prepared.model)
            out = folder / "quantized.onnx"
            with ort_quiet() as ort_warnings:
                extra = self.quantize(prepared, excluded, out, folder)
            result = onnx.load(str(out))
        _mark_target(result, self.target)
        report = node_report(prepared.model, result, self.report_mode, excluded)
        stats = {
            "mode": self.mode,
            "format": self.report_mode if self.mode == "static" else "qoperator",
            "target": self.target_stats(),
            "preprocess": prepared.note,
            **extra,
            "nodes": {"quantized": report["quantized"], "fp32": report["fp32"]},
            "by_op": report["by_op"],
            "size_before": model.ByteSize(),
            "size_after": result.ByteSize(),
            "onnxruntime_warnings": ort_warnings,
        }
        stats["size_ratio"] = stats["size_after"] / max(stats["size_before"], 1)
        logger.info(
            "quantize (%s): %d nodes int8, %d kept fp32, size %.2f MB → %.2f MB",
            self.mode,
            len(report["quantized"]),
            len(report["fp32"]),
            stats["size_before"] / 1e6,
            stats["size_after"] / 1e6,
        )
        return PassResult(result, True, stats)

    def target_stats(self) -> dict[str, Any]:
        """The target, what it implied (and whether a setting overrode it), the host's flags."""
        return self._target.summary(self.reduce_range)

    @property
    def report_mode(self) -> str:
        return "dynamic"

    def quantize(
        self, prepared: Prepared, excluded: Mapping[str, str], out: Path, folder: Path
    ) -> dict[str, Any]:
        raise NotImplementedError


def default_calib_method(scheme: str) -> str:
    """The range estimator a static ``scheme`` ("default" or "transformer") uses unless one
    is given: measured best for each (README, "Transformer int8")."""
    return "mean_minmax" if scheme == "transformer" else "minmax"


def looks_like_transformer(model: onnx.ModelProto) -> bool:
    """MatMul, Softmax and a layer norm (fused, or as ReduceMean + Sqrt): attention blocks."""
    ops = {n.op_type for n in model.graph.node}
    norm = "LayerNormalization" in ops or {"ReduceMean", "Sqrt"} <= ops
    return {"MatMul", "Softmax"} <= ops and norm


def _transformer_hint(model: onnx.ModelProto) -> list[str]:
    """A warning when the default scheme, chosen explicitly, quantizes what looks like a
    transformer: its residual Adds, Softmax and attention mask then get Q/DQ too, which
    costs fidelity (all-MiniLM-L6-v2: mean cosine 0.83 vs 0.99)."""
    if not looks_like_transformer(model):
        return []
    message = (
        "the model looks like a transformer (MatMul, Softmax, layer norm): "
        "--scheme transformer quantizes only MatMul/Gemm inputs and is far more faithful"
    )
    logger.warning("warning: %s", message)
    return [message]


def _float_for_other_readers(model: onnx.ModelProto, ops: Sequence[str]) -> onnx.ModelProto:
    """Rewire every reader of an activation's ``QuantizeLinear → DequantizeLinear`` pair that
    is not one of ``ops`` back to the float tensor. ORT's QDQ quantizer feeds *all* readers
    of a quantized tensor from its DequantizeLinear, so a transformer's residual ``Add``
    (which reads the LayerNorm output the next MatMul quantizes) would add an int8-rounded
    copy; it must read the exact float value. Weight (initializer) pairs are untouched."""
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name for t in model.graph.initializer}
    source = {}
    for node in model.graph.node:
        q = producer.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if q is not None and q.op_type == "QuantizeLinear" and q.input[0] not in inits:
            source[node.output[0]] = q.input[0]
    for node in model.graph.node:
        if node.op_type in ops or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, name in enumerate(node.input):
            if name in source:
                node.input[i] = source[name]
    return model


def _mark_target(model: onnx.ModelProto, target: str) -> None:
    """Record the hardware target in the model's metadata (replacing an earlier one)."""
    kept = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=METADATA_KEY, value=target)


# --------------------------------------------------------------------------- dynamic


class DynamicQuantize(_Int8Pass):
    """Int8 weights, activations quantized on the fly (uint8): for MatMul-heavy models.

    Quantizes what ORT's dynamic mode supports on CPU: MatMul and Gemm (rewritten to MatMul
    by ORT) with constant weights, Conv (ConvInteger: slow, see the conv-dominated warning),
    Gather (embedding tables), Attention, LSTM, EmbedLayerNormalization.
    """

    name = "quantize-dynamic"
    mode = "dynamic"

    def __init__(
        self,
        per_channel: bool = True,
        reduce_range: bool | None = None,
        weight_type: str = "int8",
        exclude: Sequence[str] = (),
        exclude_ops: Sequence[str] = (),
        nodes_to_exclude: Sequence[str] = (),
        preprocess: bool = True,
        target: str | Target = "host",
    ) -> None:
        self._init_common(**{k: v for k, v in locals().items() if k in _COMMON_SETTINGS})

    def quantize(
        self, prepared: Prepared, excluded: Mapping[str, str], out: Path, folder: Path
    ) -> dict[str, Any]:
        from onnxruntime.quantization import quantize_dynamic

        warnings = self._conv_warning(prepared.model)
        gemms = {n.name for n in prepared.model.graph.node if n.op_type == "Gemm"}
        nodes = sorted({*excluded, *(f"{n}_MatMul" for n in excluded if n in gemms)})
        run_ort(
            "quantize the model (dynamic)",
            quantize_dynamic,
            str(prepared.path),
            str(out),
            per_channel=self.per_channel,
            reduce_range=self.reduce_range,
            weight_type=quant_type(self.weight_type),
            nodes_to_exclude=nodes,
        )
        return {"warnings": warnings}

    def _conv_warning(self, model: onnx.ModelProto) -> list[str]:
        has_conv = any(n.op_type == "Conv" for n in model.graph.node)
        if not has_conv or "Conv" in self.exclude_ops:  # no shape inference needed then
            return []
        counts = macs(model)
        total = counts["conv"] + counts["matmul"]
        if not total or counts["conv"] / total <= CONV_DOMINATED:
            return []
        message = (
            f"the model is conv-dominated ({100 * counts['conv'] / total:.0f}% of the "
            "multiply-adds are in Conv): dynamic int8 convolutions (ConvInteger) run slower "
            "than fp32 on CPU — use --mode static with calibration data (--calib DATA)"
        )
        logger.warning("warning: %s", message)
        return [message]


# --------------------------------------------------------------------------- static


class StaticQuantize(_Int8Pass):
    """Int8 weights and activations, activation ranges calibrated on real data.

    Defaults (measured, see tests/benchmarks/bench_quantize.py): QDQ format, uint8
    activations, int8 per-channel 7-bit weights — on this AVX2 machine int8 activations made
    a ResNet-18 no faster than fp32 (a BERT-style encoder 0.7x), uint8 1.7-1.9x faster.
    ``calibration`` is an .npz file or folder of shards; ``ranges`` reuses the ranges of an
    earlier :meth:`calibrate` (object, or path of a file it saved) instead.
    """

    name = "quantize-static"
    mode = "static"

    def __init__(
        self,
        calibration: str | os.PathLike | None = None,
        ranges: CalibrationRanges | str | os.PathLike | None = None,
        calib_method: str | None = None,
        calib_samples: int | None = None,
        calib_batch_size: int = DEFAULT_CALIB_BATCH,
        format: str = "qdq",
        per_channel: bool = True,
        activation_type: str = "uint8",
        weight_type: str = "int8",
        reduce_range: bool | None = None,
        exclude: Sequence[str] = (),
        exclude_ops: Sequence[str] = (),
        nodes_to_exclude: Sequence[str] = (),
        preprocess: bool = True,
        progress: bool = True,
        target: str | Target = "host",
        scheme: str = "auto",
        weight_rounding: str = "nearest",
    ) -> None:
        self._init_common(**{k: v for k, v in locals().items() if k in _COMMON_SETTINGS})
        self.calibration = calibration
        self.ranges = ranges
        self.scheme = _check_choice(scheme, SCHEMES, "quantization scheme")
        self.weight_rounding = _check_choice(weight_rounding, WEIGHT_ROUNDINGS, "weight rounding")
        if calib_method is not None:  # else the scheme's measured best, see _resolve
            calib_method = _check_choice(calib_method, CALIB_METHODS, "calibration method")
        self.calib_method = calib_method
        self.calib_samples = calib_samples
        self.calib_batch_size = calib_batch_size
        self.format = _check_choice(format, FORMATS, "format")
        self.activation_type = _check_choice(activation_type, QUANT_TYPES, "activation type")
        self.progress = bool(progress)
        self._check_settings()
        self._ranges = (
            CalibrationRanges.load(ranges) if isinstance(ranges, (str, os.PathLike)) else ranges
        )

    def _check_settings(self) -> None:
        gptq = self.weight_rounding == "gptq"  # GPTQ reads the data even with reused ranges
        if self.calibration is not None and self.ranges is not None and not gptq:
            raise BadInputError(
                "both calibration data and precomputed ranges were given",
                "pass one: calibration=DATA or ranges=CalibrationRanges",
            )
        for value, what in (
            (self.calib_samples, "calib_samples"),
            (self.calib_batch_size, "calib_batch_size"),
        ):
            bad_type = isinstance(value, bool) or not isinstance(value, int)
            if value is not None and (bad_type or value < 1):
                raise BadInputError(f"{what} {value!r} must be a whole number ≥ 1", f"fix {what}")
        if self.activation_type == "int8" and self.weight_type == "uint8":
            raise BadInputError(
                "int8 activations with uint8 weights are not supported by onnxruntime",
                "use --activation-type uint8, or int8 weights",
            )

    @property
    def report_mode(self) -> str:
        return self.format

    def requires(self, model: onnx.ModelProto) -> None:
        super().requires(model)
        if self._ranges is not None:
            if self.scheme == "auto":
                self.scheme = self._ranges.scheme
            self.calib_method = self.calib_method or self._ranges.method
            if (
                self._ranges.model != fingerprint(model)
                or self._ranges.preprocess != self.preprocess
                or self._ranges.scheme != self.scheme
            ):
                raise BadInputError(
                    "the calibration ranges were measured on another model (or with other "
                    "pre-processing settings or scheme)",
                    "calibrate this model: StaticQuantize(calibration=DATA).calibrate(model)",
                )
            if self.weight_rounding == "gptq":
                self._need_gptq_data(model)
            return
        if self.calibration is None:
            raise BadInputError(
                "static quantization needs calibration data",
                "pass --calib DATA.npz (samples the model sees in use), or use --mode dynamic",
            )
        self._open_data(model)

    def _need_gptq_data(self, model: onnx.ModelProto) -> None:
        if self.calibration is None:
            raise BadInputError(
                "GPTQ weight rounding needs calibration data, also with reused ranges",
                "pass calibration=DATA as well, or weight_rounding='nearest'",
            )
        self._open_data(model)

    def _open_data(self, model: onnx.ModelProto):

        specs = model_input_specs(model)
        return open_data(self.calibration, specs), specs

    def calibrate(self, model: onnx.ModelProto) -> CalibrationRanges:
        """Measure activation ranges of ``model`` once, to pass as ``ranges=`` later."""
        self.requires(model)
        if self._ranges is not None:
            return self._ranges
        with tempfile.TemporaryDirectory(prefix="onnxship-calibrate-") as tmp:
            prepared = self.prepare(model, Path(tmp))
            tensors, samples = self._collect(prepared, Path(tmp))
            return CalibrationRanges(
                tensors,
                self.calib_method,
                fingerprint(model),
                self.preprocess,
                samples,
                prepared=prepared.model.SerializeToString(deterministic=True),
                prepared_note=prepared.note,
                scheme=self.scheme,
            )

    def prepare(self, model: onnx.ModelProto, folder: Path) -> Prepared:
        if self._ranges is not None and self._ranges.prepared is not None:
            path = folder / "preprocessed.onnx"
            path.write_bytes(self._ranges.prepared)
            return Prepared(path, onnx.load(str(path)), self._ranges.prepared_note)
        prepared = super().prepare(model, folder)
        self._resolve(prepared.model)
        return prepared

    def _resolve(self, model: onnx.ModelProto) -> None:
        """Settle scheme "auto" — transformer when the (pre-processed) model looks like one,
        else default — and, unless given, the scheme's measured best range estimator."""
        if self.scheme == "auto":
            self.scheme = "transformer" if looks_like_transformer(model) else "default"
            logger.debug("scheme auto: %s", self.scheme)
        if self.calib_method is None:
            self.calib_method = default_calib_method(self.scheme)

    def _calibration_feeds(self, model: onnx.ModelProto):
        """(The calibration batches for ``model``, streamed and checked for NaN/Inf; how
        many samples they hold.)"""
        data, specs = self._open_data(model)
        batch = data.batch_size_for(specs, self.calib_batch_size)
        total = min(self.calib_samples or data.num_samples, data.num_samples)
        return data.batches(specs, batch, limit=total, check_finite=True), total

    def _collect(self, prepared: Prepared, folder: Path):
        """Feed the calibration data through ORT's calibrator one batch per call."""
        from onnxruntime.quantization import create_calibrator

        feeds, total = self._calibration_feeds(prepared.model)
        ops = self._calibrated_ops()
        if self.calib_method == "mean_minmax":
            names = tensors_of(prepared.model, ops, outputs=self.scheme != "transformer")
            try:
                tensors, done = mean_minmax(prepared.model, names, feeds)
                logger.info("calibrated %d tensors on %d samples (mean_minmax)", len(names), done)
                return tensors, done
            except OnnxshipError:
                raise
            except Exception as e:  # onnxruntime raises InvalidArgument, Fail...
                raise DataError(
                    f"running the calibration data through the model failed: {first_line(e)}",
                    "check that the data is what the model takes (value ranges, lengths)",
                ) from e
        with ort_quiet():
            calibrator = create_calibrator(
                prepared.path,
                ops,
                augmented_model_path=str(folder / "augmented.onnx"),
                calibrate_method=method_enum(self.calib_method),
            )
        install_mask_safe_collector(calibrator)
        done = 0
        bar = tqdm(
            total=total,
            desc="calibrating",
            unit="sample",
            disable=None if self.progress else True,
            leave=False,
        )
        with bar, ort_quiet():
            for feed in feeds:
                self._collect_batch(calibrator, feed, done)
                size = len(next(iter(feed.values())))
                done += size
                bar.update(size)
            tensors = calibrator.compute_data()
        logger.info(
            "calibrated %d tensors on %d samples (%s)", len(tensors.data), done, self.calib_method
        )
        return tensors, done

    def exclusions(self, model: onnx.ModelProto) -> dict[str, str]:
        """The caller's exclusions, plus (transformer scheme) every node but MatMul/Gemm, so
        the report says why LayerNorm, Softmax, Add... stayed float."""
        out = super().exclusions(model)
        if self.scheme == "transformer":
            for node in model.graph.node:
                if node.name and node.name not in out and node.op_type not in _TRANSFORMER_OPS:
                    out[node.name] = "kept float by the transformer scheme"
        return out

    def _calibrated_ops(self) -> list[str]:
        if self.scheme == "transformer":
            return list(_TRANSFORMER_OPS)
        return sorted(candidate_ops("qdq") | candidate_ops("qoperator"))

    def _collect_batch(self, calibrator, feed: Mapping[str, np.ndarray], offset: int) -> None:
        try:
            calibrator.collect_data(OneBatch(feed))
        except Exception as e:  # onnxruntime raises InvalidArgument, Fail, RuntimeException...
            last = offset + len(next(iter(feed.values()))) - 1
            raise DataError(
                f"running calibration samples {offset}..{last} through the model failed: "
                f"{first_line(e)}",
                "check that the data is what the model takes (value ranges, sequence lengths)",
            ) from e

    def quantize(
        self, prepared: Prepared, excluded: Mapping[str, str], out: Path, folder: Path
    ) -> dict[str, Any]:
        from onnxruntime.quantization import QuantFormat, quantize_static

        ranges = self._ranges
        warnings = _transformer_hint(prepared.model) if self.scheme == "default" else []
        if ranges is None:
            tensors, samples = self._collect(prepared, folder)
            ranges = CalibrationRanges(tensors, self.calib_method, "", self.preprocess, samples)
        keep = negative_activation_ranges(prepared.model, ranges.tensors)
        extra: dict[str, Any] = {"QDQKeepRemovableActivations": keep}
        ops = sorted(candidate_ops(self.format))
        if self.scheme == "transformer":  # Q/DQ on MatMul/Gemm inputs only
            ops = list(_TRANSFORMER_OPS)
            extra["OpTypesToExcludeOutputQuantization"] = list(_TRANSFORMER_OPS)
        run_ort(
            "quantize the model (static)",
            quantize_static,
            str(prepared.path),
            str(out),
            calibration_data_reader=None,
            calibration_cache_path=str(ranges.to_ort_cache(folder / "ranges.json")),
            calibrate_method=method_enum(ranges.method),
            quant_format=QuantFormat.QDQ if self.format == "qdq" else QuantFormat.QOperator,
            op_types_to_quantize=ops,
            per_channel=self.per_channel,
            reduce_range=self.reduce_range,
            activation_type=quant_type(self.activation_type),
            weight_type=quant_type(self.weight_type),
            nodes_to_exclude=sorted(excluded),
            extra_options=extra,
        )
        rounding = {"method": "nearest"}
        if self.scheme == "transformer" or self.weight_rounding == "gptq":
            quantized = onnx.load(str(out))
            if self.scheme == "transformer":
                quantized = _float_for_other_readers(quantized, _TRANSFORMER_OPS)
            if self.weight_rounding == "gptq":
                rounding = self._gptq(prepared, quantized)
            save_model(quantized, out)
        return {
            "warnings": warnings,
            "weight_rounding": rounding,
            "calibration": {
                "method": ranges.method,
                "scheme": self.scheme,
                "samples": ranges.samples,
                "tensors": len(ranges.tensors.data),
                "reused": self._ranges is not None,
                "kept_relu": keep,
            },
        }

    def _gptq(self, prepared: Prepared, quantized: onnx.ModelProto) -> dict[str, Any]:
        """Re-round the weights of ``quantized`` in place with GPTQ (passes/gptq.py), XᵀX
        measured on the calibration samples through the pre-processed float model."""
        from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType

        feeds, total = self._calibration_feeds(prepared.model)
        qrange = {
            t: tuple(int(v) for v in get_qmin_qmax_for_qType(t, self.reduce_range, signed))
            for t, signed in ((onnx.TensorProto.INT8, True), (onnx.TensorProto.UINT8, False))
        }
        try:
            stats = round_weights(quantized, prepared.model, feeds, qrange)
        except np.linalg.LinAlgError as e:
            raise PassError(f"GPTQ failed: {e}", "use weight_rounding='nearest'") from e
        return {**stats, "samples": total}


def calibrate(
    model: onnx.ModelProto, data: str | os.PathLike, **settings: Any
) -> CalibrationRanges:
    """``StaticQuantize(calibration=data, **settings).calibrate(model)``."""
    return StaticQuantize(calibration=data, **settings).calibrate(model)
