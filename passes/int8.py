"""What both int8 passes share: their settings (:class:`passes.settings.Int8Settings`),
the checks on the input, the exclusions and the flow in a private temporary folder (save,
pre-process, quantize with onnxruntime, load, report). ``passes/dynamic.py`` and
``passes/static.py`` hold the two passes; ``passes/quantize.py`` tells the whole story."""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx

from converter.core.errors import BadInputError
from converter.core.machine import METADATA_KEY, resolve_target
from converter.core.render import mb
from converter.core.runtime import unknown_ops
from passes.base import Pass, PassResult
from passes.normalize import OpsetNeed
from passes.ort import Prepared, ort_quiet, preprocess
from passes.quant_report import is_quantized, matched, node_report, quantized_nodes
from passes.settings import Int8Settings

__all__ = ["Int8Pass", "mark_target"]

logger = logging.getLogger(__name__)

# onnxruntime's quantizer upgrades a model below opset 10 to 11 by itself, silently
# (quant_utils.update_opset_version), and fuses nodes only from opset 11: onnxship upgrades
# first, so that the report says so and a model the converter cannot upgrade is a clear error.
MIN_INT8_OPSET = 11


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


class Int8Pass(Pass):
    """Shared settings (:class:`passes.settings.Int8Settings`), checks and the temp-folder
    flow of both quantization passes."""

    mode = "dynamic"
    Settings = Int8Settings
    names_nodes = True

    def setup(self) -> None:
        self._target = resolve_target(self.target)
        self.target = self._target.name
        if self.reduce_range is None:
            self.reduce_range = self._target.reduce_range
        self._patterns = _compile_all(self.exclude, "--exclude")

    def min_opset(self, model: onnx.ModelProto) -> OpsetNeed:
        return OpsetNeed(MIN_INT8_OPSET, "int8 quantization with onnxruntime")

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
        if self.mode == "static":
            _check_runnable(model)

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
        mark_target(result, self.target)
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
            "quantize (%s): %d nodes int8, %d kept fp32, size %s → %s",
            self.mode,
            len(report["quantized"]),
            len(report["fp32"]),
            mb(stats["size_before"]),
            mb(stats["size_after"]),
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


def _check_runnable(model: onnx.ModelProto) -> None:
    """Static quantization runs the model on the calibration data: an op onnxruntime does
    not know (a custom domain's) would fail there, after the pre-processing."""
    unknown = unknown_ops(model)
    if unknown:
        more = f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""
        raise BadInputError(
            f"node {unknown[0]}{more} is a custom-domain op onnxruntime does not know, and "
            "static quantization runs the model on the calibration data to measure its ranges",
            "use --mode dynamic (it does not run the model), or export the model with "
            "standard ONNX ops in place of the custom one",
        )


def mark_target(model: onnx.ModelProto, target: str) -> None:
    """Record the hardware target in the model's metadata (replacing an earlier one)."""
    kept = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=METADATA_KEY, value=target)
