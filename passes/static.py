"""Static int8 quantization: weights and activations, activation ranges calibrated on data.

Calibration runs its own loop over ORT's calibrators: one ``collect_data`` call per batch,
so ORT never holds more than one batch of activations (ORT's histogram calibrators otherwise
keep every intermediate output of the whole data set until the reader is exhausted, and
cannot take a reader whose last batch is smaller; MinMax's ``CalibMaxIntermediateOutputs`` is
no way out in ORT 1.32: it discards the outputs it clears instead of merging them, so ranges
come from the last few batches only), and the data is streamed by
:func:`converter.core.data.open_data` one batch at a time with a NaN/Inf check per batch, so
memory does not grow with the sample count. The ranges then go to ``quantize_static``
through its calibration cache file. ``passes/quantize.py`` tells the whole story.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from tqdm import tqdm

from converter.core.data import Dataset, model_input_specs, open_data
from converter.core.errors import BadInputError, DataError, OnnxshipError, PassError, first_line
from converter.core.onnxio import save_model
from passes.base import fingerprint
from passes.bias_correction import MIN_SAMPLES, correct_biases, first_samples
from passes.calibration import (
    CalibrationRanges,
    OneBatch,
    install_mask_safe_collector,
    mean_minmax,
    negative_activation_ranges,
    tensors_of,
)
from passes.dynamic import CONV_DOMINATED
from passes.equalize import equalizable_pairs, equalize
from passes.gather_int8 import int8_tables, quantize_tables
from passes.gptq import round_stem, round_weights
from passes.int8 import MIN_INT8_OPSET, Int8Pass
from passes.int8_share import conv_share
from passes.mse_range import mse_ranges
from passes.normalize import OpsetNeed, opset_of
from passes.ort import Prepared, method_enum, ort_quiet, quant_type, run_ort
from passes.quant_report import candidate_ops
from passes.settings import BIAS_CORRECTION_SAMPLES, StaticQuantizeSettings

__all__ = [
    "StaticQuantize",
    "calibrate",
    "default_calib_method",
    "looks_like_transformer",
    "TRANSFORMER_OPS",
]

logger = logging.getLogger(__name__)

# Which tensors static quantization puts Q/DQ on: "default" = every op ORT's QDQ registry
# supports (inputs and outputs); "transformer" = only the inputs of MatMul/Gemm, everything
# else (residual Add, Softmax, LayerNorm, GELU, the mask's Where/Mul, Gather) stays float —
# NNCF's TRANSFORMER model type; see passes/calibration.py for its mean_minmax ranges.
TRANSFORMER_OPS = ("Gemm", "MatMul")

# Per-channel weights in QDQ format need DequantizeLinear's ``axis`` (opset 13); onnxruntime
# writes it at any opset, and the result is an invalid model. QOperator (QLinearConv's 1-D
# weight scale) and per-tensor QDQ work from opset 11.
PER_CHANNEL_QDQ_OPSET = 13


def default_calib_method(scheme: str) -> str:
    """The range estimator a static ``scheme`` ("default" or "transformer") uses unless one
    is given: measured best for each (README, "Transformer int8" and "CNN int8": ``mse``
    with bias correction on a pretrained MobileNetV2)."""
    return "mean_minmax" if scheme == "transformer" else "mse"


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


def _conv_hint(model: onnx.ModelProto, sample_shapes: Mapping[str, Any]) -> list[str]:
    """A warning when the transformer scheme (which quantizes MatMul/Gemm inputs only)
    leaves most of the multiply-adds in Conv, in fp32: a conv backbone with a transformer
    neck (PP-OCRv4's recognizer: 95 % Conv) then runs at fp32's speed."""
    share = conv_share(model, sample_shapes)
    if share is None or share <= CONV_DOMINATED:
        return []
    message = (
        "the transformer scheme quantizes MatMul/Gemm inputs only, and "
        f"{100 * share:.0f} % of this model's multiply-adds are in Conv, which it "
        "keeps fp32 (little or no speedup): --scheme default quantizes the Convs too — "
        "compare both with validate"
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


class StaticQuantize(Int8Pass):
    """Int8 weights and activations, activation ranges calibrated on real data.

    Defaults (measured, see tests/benchmarks/bench_quantize.py): QDQ format, uint8
    activations, int8 per-channel 7-bit weights — on this AVX2 machine int8 activations made
    a ResNet-18 no faster than fp32 (a BERT-style encoder 0.7x), uint8 1.7-1.9x faster.
    ``calibration`` is an .npz file or folder of shards; ``ranges`` reuses the ranges of an
    earlier :meth:`calibrate` (object, or path of a file it saved) instead. With the default
    scheme, ranges are ``mse`` (passes/mse_range.py) and the Conv/Gemm biases are corrected
    on the calibration data afterwards (passes/bias_correction.py; reused ranges without the
    data skip it unless asked for, which then is an error). Settings:
    :class:`passes.settings.StaticQuantizeSettings`.
    """

    name = "quantize-static"
    mode = "static"
    Settings = StaticQuantizeSettings

    def setup(self) -> None:
        super().setup()
        self._check_settings()
        ranges = self.ranges
        self._ranges = (
            CalibrationRanges.load(ranges) if isinstance(ranges, (str, os.PathLike)) else ranges
        )

    def _check_settings(self) -> None:
        # GPTQ and bias correction read the data even with reused ranges
        reads_data = (
            self.weight_rounding == "gptq"
            or self.bias_correction is not False
            or self.stem_rounding is True
        )
        if self.calibration is not None and self.ranges is not None and not reads_data:
            raise BadInputError(
                "both calibration data and precomputed ranges were given",
                "pass one: calibration=DATA or ranges=CalibrationRanges",
            )
        if self.activation_type == "int8" and self.weight_type == "uint8":
            raise BadInputError(
                "int8 activations with uint8 weights are not supported by onnxruntime",
                "use --activation-type uint8, or int8 weights",
            )

    @property
    def report_mode(self) -> str:
        return self.format

    def min_opset(self, model: onnx.ModelProto) -> OpsetNeed:
        if not (self.format == "qdq" and self.per_channel):
            return super().min_opset(model)
        enough = opset_of(model) >= MIN_INT8_OPSET  # for what works without the upgrade
        return OpsetNeed(
            PER_CHANNEL_QDQ_OPSET,
            "per-channel QDQ weights (DequantizeLinear's axis attribute)",
            "keep the model's opset with --per-tensor or --format qoperator" if enough else "",
        )

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
                self._need_data(model, "GPTQ weight rounding", "weight_rounding='nearest'")
            if self.bias_correction:
                self._need_data(model, "bias correction", "bias_correction=False")
            if self.stem_rounding:
                self._need_data(model, "stem rounding", "stem_rounding=False")
            elif self.calibration is not None:
                self._open_data(model)
            return
        if self.missing_calibration():
            raise BadInputError(
                "static quantization needs calibration data",
                "pass --calib DATA.npz (samples the model sees in use), or use --mode dynamic",
            )
        self._open_data(model)

    def _need_data(self, model: onnx.ModelProto, what: str, instead: str) -> None:
        if self.calibration is None:
            raise BadInputError(
                f"{what} needs calibration data, also with reused ranges",
                f"pass calibration=DATA (--calib DATA) as well, or {instead}",
            )
        self._open_data(model)

    def _corrects_biases(self) -> bool:
        """Whether bias correction runs: as set; unset, with the default scheme when the
        calibration data is at hand (reused ranges alone cannot correct)."""
        if self.bias_correction is None:
            return self.scheme == "default" and self.calibration is not None
        return self.bias_correction

    def _sample_shapes(self) -> dict[str, tuple[int, ...]]:
        """One calibration sample's shape per input (none without a data file)."""
        if self.calibration is None:
            return {}
        return Dataset(self.calibration).sample_shapes()

    def _open_data(self, model: onnx.ModelProto):

        specs = model_input_specs(model)
        return open_data(self.calibration, specs), specs

    def calibrate(
        self, model: onnx.ModelProto, prepared_as: CalibrationRanges | None = None
    ) -> CalibrationRanges:
        """Measure activation ranges of ``model`` once, to pass as ``ranges=`` later.
        ``prepared_as``: ranges measured (with another method) on the same model, data and
        settings but the method: their pre-processed (and equalized) model is taken as it is
        instead of being made again — it depends on those, not on the method."""
        model, _ = self.accept(model)  # what the pass quantizes: Constant weights moved...
        if self._ranges is not None:
            return self._ranges
        with tempfile.TemporaryDirectory(prefix="onnxship-calibrate-") as tmp:
            prepared = self._prepared_as(model, prepared_as, Path(tmp))
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

    def _prepared_as(
        self, model: onnx.ModelProto, other: CalibrationRanges | None, folder: Path
    ) -> Prepared:
        """``other``'s pre-processed model when it was made from ``model`` the same way (the
        same pre-processing and scheme; the same data and equalize setting are the
        caller's word), else :meth:`prepare`'s."""
        if self.scheme == "auto" or other is None or other.prepared is None:
            return self.prepare(model, folder)
        made_as = (other.model, other.preprocess, other.scheme)
        if made_as != (fingerprint(model), self.preprocess, self.scheme):
            return self.prepare(model, folder)
        path = folder / "preprocessed.onnx"
        path.write_bytes(other.prepared)
        prepared = Prepared(path, onnx.load(str(path)), other.prepared_note)
        self._resolve(prepared.model)
        return prepared

    def prepare(self, model: onnx.ModelProto, folder: Path) -> Prepared:
        if self._ranges is not None and self._ranges.prepared is not None:
            path = folder / "preprocessed.onnx"
            path.write_bytes(self._ranges.prepared)
            return Prepared(path, onnx.load(str(path)), self._ranges.prepared_note)
        prepared = super().prepare(model, folder)
        self._resolve(prepared.model)
        if not self.equalize or self.scheme != "default":
            return prepared
        if not equalizable_pairs(prepared.model)[0]:
            return prepared
        if self.calibration is None:  # ranges from a file that does not carry the model
            raise BadInputError(
                "these saved ranges were measured on an equalized model they do not carry",
                "pass the calibration data as well (calibration=DATA), or equalize=False "
                "both when calibrating and now",
            )
        feeds, _ = self._calibration_feeds(prepared.model)
        equalized, stats = equalize(prepared.model, feeds)
        if not stats["pairs"]:
            return prepared
        path = folder / "equalized.onnx"
        save_model(equalized, path)
        note = (
            f"{prepared.note}; activations into {stats['pairs']} depthwise Convs equalized "
            f"(stretch ≤ {stats['largest_stretch']:g})"
        )
        return Prepared(path, equalized, note)

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
        if self.calib_method in ("mean_minmax", "mse"):
            names = tensors_of(prepared.model, ops, outputs=self.scheme != "transformer")
            try:
                if self.calib_method == "mse":
                    fresh = lambda: self._calibration_feeds(prepared.model)[0]  # noqa: E731
                    tensors, done = mse_ranges(prepared.model, names, fresh)
                else:
                    tensors, done = mean_minmax(prepared.model, names, feeds)
            except OnnxshipError:
                raise
            except Exception as e:  # onnxruntime raises InvalidArgument, Fail...
                raise DataError(
                    f"running the calibration data through the model failed: {first_line(e)}",
                    "check that the data is what the model takes (value ranges, lengths)",
                ) from e
            logger.info(
                "calibrated %d tensors on %d samples (%s)", len(names), done, self.calib_method
            )
            return tensors, done
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
            tables = int8_tables(model)  # embedding Gathers: int8 tables (passes/gather_int8)
            for node in model.graph.node:
                kept = node.op_type not in TRANSFORMER_OPS and node.name not in tables
                if node.name and node.name not in out and kept:
                    out[node.name] = "kept float by the transformer scheme"
        return out

    def _calibrated_ops(self) -> list[str]:
        if self.scheme == "transformer":
            return list(TRANSFORMER_OPS)
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
        if self.scheme == "default":
            warnings = _transformer_hint(prepared.model)
        else:
            warnings = _conv_hint(prepared.model, self._sample_shapes())
        if ranges is None:
            tensors, samples = self._collect(prepared, folder)
            ranges = CalibrationRanges(tensors, self.calib_method, "", self.preprocess, samples)
        keep = negative_activation_ranges(prepared.model, ranges.tensors)
        extra: dict[str, Any] = {"QDQKeepRemovableActivations": keep}
        ops = sorted(candidate_ops(self.format))
        if self.scheme == "transformer":  # Q/DQ on MatMul/Gemm inputs only
            ops = list(TRANSFORMER_OPS)
            extra["OpTypesToExcludeOutputQuantization"] = list(TRANSFORMER_OPS)
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
        rounding, tables = {"method": "nearest"}, {}
        corrected: dict[str, Any] = {"layers": 0}
        stem_stats: dict[str, Any] = {"convs": 0}
        biases = self._corrects_biases()
        stem = self._rounds_stem()
        if self.scheme == "transformer" or self.weight_rounding == "gptq" or biases or stem:
            quantized = onnx.load(str(out))
            if self.scheme == "transformer":
                quantized = _float_for_other_readers(quantized, TRANSFORMER_OPS)
            if self.weight_rounding == "gptq":
                rounding = self._gptq(prepared, quantized)
            if stem:  # before bias correction, which then measures the rounded stem
                stem_stats = self._round_stem(prepared, quantized)
            if self.scheme == "transformer":  # Gathers the user did not exclude
                tables = quantize_tables(quantized, skip=set(excluded))
            if biases:  # last: it measures the model as it ships
                corrected = self._correct_biases(prepared, quantized, warnings)
            save_model(quantized, out)
        return {
            "warnings": warnings,
            "weight_rounding": rounding,
            "stem_rounding": stem_stats,
            "bias_correction": corrected,
            "embedding_tables": tables,
            "calibration": {
                "method": ranges.method,
                "scheme": self.scheme,
                "samples": ranges.samples,
                "tensors": len(ranges.tensors.data),
                "reused": self._ranges is not None,
                "kept_relu": keep,
            },
        }

    def _rounds_stem(self) -> bool:
        """Whether the stem's weights are GPTQ-rounded: as set; unset, with the default
        scheme when the calibration data is at hand (reused ranges alone have no inputs)."""
        if self.stem_rounding is None:
            return self.scheme == "default" and self.calibration is not None
        return self.stem_rounding

    def _qranges(self) -> dict[int, tuple[int, int]]:
        from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType

        return {
            t: tuple(int(v) for v in get_qmin_qmax_for_qType(t, self.reduce_range, signed))
            for t, signed in ((onnx.TensorProto.INT8, True), (onnx.TensorProto.UINT8, False))
        }

    def _round_stem(self, prepared: Prepared, quantized: onnx.ModelProto) -> dict[str, Any]:
        """GPTQ-round the weights of the Convs reading the model input (passes/gptq.py) on
        the first calibration samples, in place."""
        feeds, total = self._calibration_feeds(prepared.model)
        batches = first_samples(feeds, BIAS_CORRECTION_SAMPLES)
        try:
            stats = round_stem(quantized, prepared.model, batches, self._qranges())
        except np.linalg.LinAlgError as e:
            raise PassError(f"stem rounding failed: {e}", "pass stem_rounding=False") from e
        return {**stats, "samples": min(total, BIAS_CORRECTION_SAMPLES)}

    def _gptq(self, prepared: Prepared, quantized: onnx.ModelProto) -> dict[str, Any]:
        """Re-round the weights of ``quantized`` in place with GPTQ (passes/gptq.py), XᵀX
        measured on the calibration samples through the pre-processed float model."""
        feeds, total = self._calibration_feeds(prepared.model)
        try:
            stats = round_weights(quantized, prepared.model, feeds, self._qranges())
        except np.linalg.LinAlgError as e:
            raise PassError(f"GPTQ failed: {e}", "use weight_rounding='nearest'") from e
        return {**stats, "samples": total}

    def _correct_biases(
        self, prepared: Prepared, quantized: onnx.ModelProto, warnings: list[str]
    ) -> dict[str, Any]:
        """Empirical bias correction of ``quantized`` in place (passes/bias_correction.py) on
        the first calibration samples, run through the pre-processed float model."""
        feeds, total = self._calibration_feeds(prepared.model)
        batches = first_samples(feeds, BIAS_CORRECTION_SAMPLES)
        samples = min(total, BIAS_CORRECTION_SAMPLES)
        if samples < MIN_SAMPLES:
            message = (
                f"bias correction measured on {samples} calibration samples, fewer than the "
                f"{MIN_SAMPLES} it needs to be reliable: pass more samples (it uses up to "
                f"{BIAS_CORRECTION_SAMPLES}), or bias_correction=False"
            )
            logger.warning("warning: %s", message)
            warnings.append(message)
        before = onnx.ModelProto()
        before.CopyFrom(quantized)
        try:
            shared = None if self._ranges is None else self._ranges.float_targets
            return correct_biases(quantized, prepared.model, batches, shared)
        except OnnxshipError:
            raise
        except Exception as e:  # onnxruntime raises InvalidArgument, Fail...
            if self.bias_correction:  # asked for: say it could not be done
                raise PassError(
                    f"bias correction failed: {first_line(e)}", "pass bias_correction=False"
                ) from e
            quantized.CopyFrom(before)  # the default: none of it, never half of it
            message = f"bias correction skipped: {first_line(e)}"
            logger.warning("warning: %s", message)
            warnings.append(message)
            return {"layers": 0, "failed": first_line(e)}


def calibrate(
    model: onnx.ModelProto, data: str | os.PathLike, **settings: Any
) -> CalibrationRanges:
    """``StaticQuantize(calibration=data, **settings).calibrate(model)``."""
    return StaticQuantize(calibration=data, **settings).calibrate(model)
