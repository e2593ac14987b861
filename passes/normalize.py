"""Models from other exporters, made fit for the passes — on a copy, the input is never
modified.

Three things differ from what ``torch.onnx`` writes, and each pass would trip on them:

* **Weights held in ``Constant`` nodes** (paddle2onnx, some TensorFlow converters) instead of
  initializers: the passes read weights as initializers, so a Conv whose weight comes from a
  ``Constant`` node looks like a model with no weights at all. :func:`weights_as_initializers`
  moves every float ``Constant`` of the main graph (``value`` of a float type,
  ``value_float``, ``value_floats``) into an initializer of the same name; integer constants
  (shapes, axes) are not weights and stay.
* **An old opset**: per-channel Q/DQ needs ``DequantizeLinear``'s ``axis`` (opset 13), and
  onnxruntime's quantizer upgrades an opset < 10 to 11 itself, silently. :func:`upgrade_opset`
  upgrades with ``onnx.version_converter`` to what the pass declares it needs
  (:meth:`passes.base.Pass.min_opset`), and when the converter cannot, raises a BadInputError
  naming the opset needed and how to upgrade by hand.

* **Nodes without names** (hand-built graphs, some converters), or with duplicate ones:
  :func:`named_nodes` names them ``<OpType>_<position>``.

The runner (``Pass.__call__``) applies all three and records what it did in the pass's stats
(``stats["normalized"]``); :func:`describe` renders that as the lines the CLI prints.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import onnx
from onnx import numpy_helper

from converter.core.errors import BadInputError, first_line

__all__ = [
    "OpsetNeed",
    "opset_of",
    "weights_as_initializers",
    "named_nodes",
    "upgrade_opset",
    "upgrade_command",
    "describe",
]

logger = logging.getLogger(__name__)

_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.DOUBLE,
}
# IR version 4 (onnx 1.3) is the first where an initializer need not be a graph input too.
_IR_INITIALIZERS_NOT_INPUTS = 4


class OpsetNeed(NamedTuple):
    """The ai.onnx opset a pass needs (0: any), what needs it, and another way out that
    keeps the model's opset (for the error when the upgrade fails; may be empty)."""

    opset: int
    why: str
    alternative: str = ""


def opset_of(model: onnx.ModelProto) -> int:
    """The model's ai.onnx opset (0 when it imports none)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The float tensor a ``Constant`` node holds, named like its output; None for any other
    kind of constant (integer, string, sparse) or a malformed node."""
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.attribute) != 1:
        return None
    attr = node.attribute[0]
    if attr.name == "value" and attr.t.data_type in _FLOAT_TYPES:
        tensor = onnx.TensorProto()
        tensor.CopyFrom(attr.t)
    elif attr.name == "value_float":
        tensor = numpy_helper.from_array(np.array(attr.f, np.float32))
    elif attr.name == "value_floats":
        tensor = numpy_helper.from_array(np.array(attr.floats, np.float32))
    else:
        return None
    tensor.name = node.output[0]
    return tensor


def weights_as_initializers(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """(``model`` with its float ``Constant`` nodes moved into initializers, how many moved).
    ``model`` itself when there is none to move (no copy); otherwise a copy, with IR version
    ≥ 4 so that initializers need not be graph inputs. Constants that are graph outputs or
    live in subgraphs stay where they are."""
    outputs = {o.name for o in model.graph.output}
    moved = [
        (i, t)
        for i, node in enumerate(model.graph.node)
        if (t := _constant_tensor(node)) is not None and t.name not in outputs
    ]
    if not moved:
        return model, 0
    out = onnx.ModelProto()
    out.CopyFrom(model)
    gone = {i for i, _ in moved}
    kept = [n for i, n in enumerate(out.graph.node) if i not in gone]
    del out.graph.node[:]
    out.graph.node.extend(kept)
    out.graph.initializer.extend(t for _, t in moved)
    out.ir_version = max(out.ir_version, _IR_INITIALIZERS_NOT_INPUTS)
    return out, len(moved)


def named_nodes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """(``model`` with a unique name on every node of its main graph, how many were named).
    A node without a name, or with one an earlier node has, is named ``<OpType>_<position>``
    (``_2``, ``_3``… appended if that is taken): the passes and reports tell nodes apart by
    name (bias correction pairs a quantized Conv with its float twin, the fp32 fallback keeps
    nodes by name), and hand-built or converted graphs often leave names empty. ``model``
    itself when every name is unique (no copy)."""
    names = [n.name for n in model.graph.node]
    seen: set[str] = set()
    todo = []
    for i, name in enumerate(names):
        if not name or name in seen:
            todo.append(i)
        else:
            seen.add(name)
    if not todo:
        return model, 0
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for i in todo:
        node = out.graph.node[i]
        base = f"{node.op_type}_{i}"
        name, k = base, 1
        while name in seen:
            k += 1
            name = f"{base}_{k}"
        node.name = name
        seen.add(name)
    return out, len(todo)


def upgrade_command(opset: int) -> str:
    """The one-liner that upgrades a model file to ``opset`` with onnx's version converter."""
    return (
        'python -c "import onnx, onnx.version_converter as v; '
        f"onnx.save(v.convert_version(onnx.load('in.onnx'), {opset}), 'out.onnx')\""
    )


def upgrade_opset(
    model: onnx.ModelProto, needed: int, why: str, alternative: str = ""
) -> tuple[onnx.ModelProto, int]:
    """(``model`` at opset ≥ ``needed``, the opset it had). ``model`` itself when it is
    recent enough; otherwise a copy converted with ``onnx.version_converter`` (and float
    constants the converter made moved to initializers). ``why`` names what needs the opset
    and ``alternative`` another way out, for the error raised when the conversion fails."""
    have = opset_of(model)
    if have >= needed:
        return model, have
    source = model
    if model.ir_version < _IR_INITIALIZERS_NOT_INPUTS:  # the converter adds initializers
        source = onnx.ModelProto()
        source.CopyFrom(model)
        source.ir_version = _IR_INITIALIZERS_NOT_INPUTS
    try:
        upgraded = onnx.version_converter.convert_version(source, needed)
        onnx.checker.check_model(upgraded)
    except Exception as e:  # the converter raises RuntimeError, ValidationError, IndexError...
        raise BadInputError(
            f"the model is opset {have} and {why} needs opset ≥ {needed}, but onnx's version "
            f"converter could not upgrade it ({first_line(e, 160)})",
            f"re-export it at opset ≥ {needed}, or upgrade it yourself and pass the result: "
            f"{upgrade_command(needed)}" + (f"; or {alternative}" if alternative else ""),
        ) from e
    upgraded, _ = weights_as_initializers(upgraded)
    return upgraded, have


def describe(normalized: Mapping[str, Any] | None) -> list[str]:
    """What was done to make the model fit (``stats["normalized"]``), one phrase each."""
    if not normalized:
        return []
    lines = []
    if normalized.get("constants_moved"):
        lines.append(f"moved {normalized['constants_moved']} Constant weights to initializers")
    if normalized.get("nodes_named"):
        lines.append(
            f"named {normalized['nodes_named']} nodes that had no name or another's "
            "(<OpType>_<position>)"
        )
    if normalized.get("opset_from") != normalized.get("opset_to"):
        lines.append(
            f"upgraded opset {normalized['opset_from']} → {normalized['opset_to']}, "
            f"needed by {normalized['opset_reason']}"
        )
    return lines
