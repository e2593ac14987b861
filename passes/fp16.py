"""Mixed-precision fp16 conversion with ``onnxconverter-common``, for GPU/NPU targets.

Weights and compute become float16 except the ops on the block list, which stay fp32 behind
Cast nodes: onnxconverter-common's default list (ops without fp16 kernels or meaning, e.g.
Resize, Range, TopK, NonMaxSuppression) plus ops whose intermediate values overflow fp16's
±65504 range (``Pow``, ``ReduceSumSquare``, ``ReduceL2``: squares of activations, as in
decomposed LayerNorm/GELU). Graph inputs and outputs stay fp32 by default, so callers feed
the same arrays as before.

On a CPU this is about size (weights halve), not speed: on x86 onnxruntime has few fp16
kernels and runs most fp16 ops by casting to fp32 and back. Measured on this AVX2 machine,
batch 1, one thread: ResNet-18 0.95x and the tiny encoder 0.87x the speed of fp32.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections import Counter
from typing import Any

import onnx
from onnxconverter_common.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

from converter.core.errors import BadInputError, PassError, first_line
from converter.core.render import mb
from passes.base import Pass, PassResult
from passes.quant_report import is_quantized, quantized_nodes
from passes.settings import Float16Settings

__all__ = ["Float16", "FP32_OPS", "default_block_list"]

logger = logging.getLogger(__name__)

# Kept in fp32 on top of onnxconverter-common's DEFAULT_OP_BLOCK_LIST (see module docstring).
FP32_OPS = ("Pow", "ReduceSumSquare", "ReduceL2")
_CLAMP_WARNING = re.compile(r"the float32 number (\S+) will be truncated to (\S+)")


def default_block_list() -> list[str]:
    """The op types kept in fp32 unless the caller gives its own list."""

    return sorted(set(DEFAULT_OP_BLOCK_LIST) | set(FP32_OPS))


class Float16(Pass):
    """Convert float32 weights and compute to float16, except the blocked ops and nodes.
    ``block_ops`` replaces the default block list; ``extra_block_ops`` adds to it;
    ``block_nodes`` are regular expressions on node names (settings:
    :class:`passes.settings.Float16Settings`)."""

    name = "fp16"
    Settings = Float16Settings

    def setup(self) -> None:
        self._patterns = []
        for pattern in self.block_nodes:
            try:
                self._patterns.append(re.compile(pattern))
            except re.error as e:
                raise BadInputError(
                    f"--block-node {pattern!r} is not a valid regular expression ({e})",
                    "escape special characters, e.g. 'node_conv2d\\.1'",
                ) from e

    def requires(self, model: onnx.ModelProto) -> None:

        if is_quantized(model):
            raise BadInputError(
                f"the model is quantized ({quantized_nodes(model)[0]}...); fp16 conversion of "
                "an int8 model is not supported",
                "convert the float model, or ship the int8 model as it is",
            )
        weights = {t.data_type for t in model.graph.initializer}
        io = {v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)}
        if onnx.TensorProto.FLOAT16 in weights and onnx.TensorProto.FLOAT not in weights:
            raise BadInputError(
                "the model's weights are already float16: nothing to convert",
                "pass the float32 model",
            )
        if onnx.TensorProto.FLOAT not in weights | io:
            raise BadInputError(
                "the model has no float32 tensors: nothing to convert", "pass a float32 model"
            )

    def ensures(self, result: PassResult) -> None:
        """The onnx checker, plus strict type inference: the converter can leave an op whose
        output type disagrees with its declared fp16 type, which onnxruntime rejects."""
        super().ensures(result)
        try:
            onnx.shape_inference.infer_shapes(result.model, check_type=True, strict_mode=True)
        except onnx.shape_inference.InferenceError as e:
            raise PassError(
                f"the fp16 model has inconsistent types: {first_line(e)}",
                "keep the op named there in fp32 with --block-op TYPE or --block-node NAME",
            ) from e

    def blocked(self, model: onnx.ModelProto) -> tuple[list[str], list[str]]:
        """(op types, node names) kept in fp32."""
        ops = list(self.block_ops) if self.block_ops is not None else default_block_list()
        ops = sorted(set(ops) | set(self.extra_block_ops))
        nodes = sorted(
            n.name for n in model.graph.node if any(p.search(n.name) for p in self._patterns)
        )
        return ops, nodes

    def call(self, model: onnx.ModelProto) -> PassResult:

        ops, nodes = self.blocked(model)
        source = onnx.ModelProto()
        source.CopyFrom(model)  # the converter edits the proto it is given
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                result = convert_float_to_float16(
                    source,
                    keep_io_types=self.keep_io_types,
                    op_block_list=ops,
                    node_block_list=nodes,
                )
            except Exception as e:  # the converter raises ValueError, KeyError, AttributeError
                raise PassError(
                    f"onnxconverter-common could not convert the model to fp16: {first_line(e)}",
                    "keep the failing op in fp32 with --block-op TYPE or --block-node NAME",
                ) from e
        _fix_casts(result, {n.name for n in model.graph.node if n.op_type not in ops}, nodes)
        stats = self._stats(model, result, ops, nodes, caught)
        logger.info(
            "fp16: %d nodes converted, %d kept fp32, size %s → %s",
            stats["nodes_converted"],
            len(stats["kept_fp32"]),
            mb(stats["size_before"]),
            mb(stats["size_after"]),
        )
        return PassResult(result, True, stats)

    def _stats(
        self,
        before: onnx.ModelProto,
        after: onnx.ModelProto,
        ops: list[str],
        nodes: list[str],
        caught: list[warnings.WarningMessage],
    ) -> dict[str, Any]:
        kept = {
            n.name or n.op_type: f"op type {n.op_type} is on the fp32 block list"
            for n in before.graph.node
            if n.op_type in ops
        }
        kept.update({name: "node name matched --block-node" for name in nodes})
        clamped = sorted({f"{a} → {b}" for w in caught for a, b in _clamps(w) if a != b})
        return {
            "keep_io_types": self.keep_io_types,
            "block_ops": ops,
            "nodes_converted": len(before.graph.node) - len(kept),
            "kept_fp32": kept,
            "casts_added": Counter(n.op_type for n in after.graph.node)["Cast"]
            - Counter(n.op_type for n in before.graph.node)["Cast"],
            "clamped_values": clamped,
            "size_before": before.ByteSize(),
            "size_after": after.ByteSize(),
            "size_ratio": after.ByteSize() / max(before.ByteSize(), 1),
            "note": "fp16 targets GPUs/NPUs; on CPU it saves size, not time",
        }


def _fix_casts(model: onnx.ModelProto, converted: set[str], blocked_nodes: list[str]) -> None:
    """Make the model's own Cast-to-float32 nodes cast to float16, as the converter declares
    their outputs float16 but leaves the ``to`` attribute alone (ORT then rejects the model).
    Casts the converter inserted around blocked ops are new nodes and keep their type."""
    for node in model.graph.node:
        if node.op_type != "Cast" or node.name not in converted or node.name in blocked_nodes:
            continue
        for attr in node.attribute:
            if attr.name == "to" and attr.i == onnx.TensorProto.FLOAT:
                attr.i = onnx.TensorProto.FLOAT16


def _clamps(w: warnings.WarningMessage) -> list[tuple[str, str]]:
    found = _CLAMP_WARNING.search(str(w.message))
    return [found.groups()] if found else []
