"""Dynamic int8 quantization (``onnxruntime.quantization.quantize_dynamic``): int8 weights,
activations quantized at run time. See ``passes/quantize.py`` for the whole story."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx

from passes.base import PassResult
from passes.int8 import Int8Pass
from passes.ort import Prepared, preprocess, quant_type, run_ort
from passes.quant_report import macs, percent, weight_scales

__all__ = ["DynamicQuantize", "CONV_DOMINATED"]

logger = logging.getLogger(__name__)

# Share of Conv multiply-accumulates above which dynamic int8 is slower than fp32 (ConvInteger
# has no fast kernel on CPU: measured ~4x slower on a ResNet-18, 0.12x fp32 speed on
# EfficientNet-Lite0) and far less faithful (one weight scale per Conv tensor, one activation
# range per run: mean cosine to fp32 0.651, worst sample 0.262 on EfficientNet-Lite0).
CONV_DOMINATED = 0.5


class DynamicQuantize(Int8Pass):
    """Int8 weights, activations quantized on the fly (uint8): for MatMul-heavy models.

    Quantizes what ORT's dynamic mode supports on CPU: MatMul and Gemm (rewritten to MatMul
    by ORT) with constant weights, Conv (ConvInteger: slow, see the conv-dominated warning),
    Gather (embedding tables), Attention, LSTM, EmbedLayerNormalization. Settings:
    :class:`passes.settings.Int8Settings`.
    """

    name = "quantize-dynamic"
    mode = "dynamic"

    def prepare(self, model: onnx.ModelProto, folder: Path) -> Prepared:
        """ORT's optimization only: dynamic mode quantizes weights and needs no activation
        shapes, so the symbolic shape inference of ``quant_pre_process`` is skipped."""
        return preprocess(model, folder, self.preprocess, symbolic=False)

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

    def call(self, model: onnx.ModelProto) -> PassResult:
        """The shared flow, plus how the weights were actually quantized (``weight_scales``:
        per op type, how many weights have per-channel and how many per-tensor scales)."""
        result = super().call(model)
        result.stats["weight_scales"] = weight_scales(result.model)
        return result

    def _conv_warning(self, model: onnx.ModelProto) -> list[str]:
        has_conv = any(n.op_type == "Conv" for n in model.graph.node)
        if not has_conv or "Conv" in self.exclude_ops:  # no shape inference needed then
            return []
        counts = macs(model)
        total = counts["conv"] + counts["matmul"]
        if not total or counts["conv"] / total <= CONV_DOMINATED:
            return []
        conv, rest = percent(counts["conv"], total), percent(counts["matmul"], total)
        message = (
            f"the model is conv-dominated ({conv} % of the multiply-adds are in Conv, {rest} % "
            "in MatMul/Gemm): dynamic int8 convolutions (ConvInteger) run slower than fp32 on "
            "CPU (0.12x fp32 measured on EfficientNet-Lite0) and lose fidelity, their weights "
            "quantized with one scale per tensor and their activations with one range per run "
            "(mean cosine to fp32 0.65 on EfficientNet-Lite0) — use --mode static with "
            "calibration data (--calib DATA), or --exclude-op Conv"
        )
        logger.warning("warning: %s", message)
        return [message]
