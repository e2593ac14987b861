"""Int8 embedding tables: a float ``Gather`` table stored as int8 rows with one scale per row.

The transformer scheme of static quantization (``passes/static.py``) puts Q/DQ on MatMul/Gemm
inputs only, so an encoder's embedding tables stayed fp32: on all-MiniLM-L6-v2 the word
embeddings alone are 46.9 of the 58.6 MB. Each large table read by ``Gather`` only is
rewritten as::

    rows   = Gather(table_int8, indices)          # int8 [..., D]: only the rows used
    scales = Gather(row_scale, indices)           # float [..., 1]
    out    = Mul(Cast(rows, float), scales)

with ``row_scale = max|row| / 127`` (symmetric, zero point 0). Per row, not per tensor:
one outlier token does not coarsen every other row. At run time only the gathered rows are
converted (seq × D values), so the speed is that of the float Gather; a DequantizeLinear in
front of the Gather would convert the whole table on every run (or ORT would fold it back to
fp32 at load). Measured numbers: README, "Transformer int8".
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["MIN_TABLE_VALUES", "int8_tables", "quantize_tables", "quantize_rows"]

logger = logging.getLogger(__name__)

# Tables below this many values stay float: int8 would save under 192 KB, and the three
# extra nodes are not worth it (all-MiniLM's token-type table has 768 values).
MIN_TABLE_VALUES = 1 << 16


def int8_tables(model: onnx.ModelProto) -> dict[str, str]:
    """Gather node name → the float table it reads, for every table :func:`quantize_tables`
    rewrites: an fp32 initializer of rank 2 with ≥ MIN_TABLE_VALUES values, read only by
    named ``Gather`` nodes on axis 0, and neither a graph input nor a graph output."""
    inits = {t.name: t for t in model.graph.initializer}
    public = {v.name for v in model.graph.input} | {v.name for v in model.graph.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in set(node.input):
            if name in inits:
                readers.setdefault(name, []).append(node)
    out = {}
    for name, nodes in readers.items():
        t = inits[name]
        size = int(np.prod(t.dims)) if t.dims else 0
        if (
            t.data_type != TensorProto.FLOAT
            or len(t.dims) != 2
            or size < MIN_TABLE_VALUES
            or name in public
        ):
            continue
        if all(_gathers_rows(n, name) for n in nodes):
            out.update({n.name: name for n in nodes})
    return out


def _gathers_rows(node: onnx.NodeProto, table: str) -> bool:
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    return (
        node.op_type == "Gather"
        and node.domain in ("", "ai.onnx")
        and bool(node.name)
        and list(node.input[:1]) == [table]
        and table not in node.input[1:]
        and axis == 0
    )


def quantize_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 rows, float32 scales of shape [rows, 1]): symmetric, ±127, one scale per row
    (an all-zero row gets scale 1 and zeros)."""
    peak = np.abs(table).max(axis=1, keepdims=True).astype(np.float32)
    scale = np.where(peak > 0, peak / np.float32(127), np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(table / scale), -127, 127).astype(np.int8)
    return q, scale


def quantize_tables(model: onnx.ModelProto, skip: set[str] | None = None) -> dict[str, Any]:
    """Rewrite, in place, every table of :func:`int8_tables` whose Gathers are not all in
    ``skip`` (node names the user kept in fp32); returns the stats (tables, values, bytes)."""
    skip = skip or set()
    found = int8_tables(model)
    tables = sorted(set(found.values()) - {t for node, t in found.items() if node in skip})
    if not tables:
        return {"tables": [], "values": 0, "bytes_before": 0, "bytes_after": 0}
    taken = {t.name for t in model.graph.initializer} | {v.name for v in model.graph.input}
    taken |= {o for n in model.graph.node for o in n.output}
    inits = {t.name: t for t in model.graph.initializer}
    replaced: dict[str, tuple[str, str]] = {}
    added, before, after = [], 0, 0
    for name in tables:
        array = numpy_helper.to_array(inits[name])
        q, scale = quantize_rows(array)
        q_name, s_name = _fresh(f"{name}_int8", taken), _fresh(f"{name}_row_scale", taken)
        added += [numpy_helper.from_array(q, q_name), numpy_helper.from_array(scale, s_name)]
        replaced[name] = (q_name, s_name)
        before += inits[name].ByteSize()
        after += added[-2].ByteSize() + added[-1].ByteSize()
    kept = [t for t in model.graph.initializer if t.name not in replaced]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + added)
    nodes = []
    for node in model.graph.node:
        table = found.get(node.name) if node.op_type == "Gather" else None
        if table in replaced:
            nodes += _int8_gather(node, *replaced[table], taken)
        else:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    values = sum(int(np.prod(inits[t].dims)) for t in tables)
    logger.info("embedding tables to int8: %d tables, %d values", len(tables), values)
    return {"tables": tables, "values": values, "bytes_before": before, "bytes_after": after}


def _int8_gather(node: onnx.NodeProto, q: str, scale: str, taken: set[str]) -> list:
    """The four nodes that replace ``node`` (its name moves to the int8 Gather + "_int8")."""
    indices, out = node.input[1], node.output[0]
    rows, rows_f, scales = (_fresh(f"{out}_{s}", taken) for s in ("int8", "float", "scale"))
    return [
        helper.make_node("Gather", [q, indices], [rows], f"{node.name}_int8", axis=0),
        helper.make_node("Cast", [rows], [rows_f], f"{node.name}_cast", to=TensorProto.FLOAT),
        helper.make_node("Gather", [scale, indices], [scales], f"{node.name}_scale", axis=0),
        helper.make_node("Mul", [rows_f, scales], [out], f"{node.name}_dequant"),
    ]


def _fresh(base: str, taken: set[str]) -> str:
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name
