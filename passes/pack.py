"""Packing sparse constant weights: a 1-bit mask plus the nonzero values, decoded by ONNX ops.

A weight with enough zeros (fp32, fp16, int8, uint8 — pruned float weights, and the int8
weights of QDQ models, which sit *below* their DequantizeLinear) is stored as a mask packed
8 per byte (``np.packbits`` order: first element in the high bit) and its nonzero values.
Standard ONNX ops rebuild it, and every input of them is a constant, so onnxruntime's
constant folding computes the dense tensor once, at session creation; inference then runs
the same kernels on the same bytes as the unpacked model (outputs are bit-identical, and
int8 QDQ models still fuse into QLinearConv/QLinearMatMul: checked in tests/test_pack.py).
No custom op: any ONNX runtime loads the model (one without constant folding decodes on
every run, correctly but slower).

Decoding one chunk of ``n`` elements (``mask`` uint8, ``values`` = a zero, then the nonzero
values in order)::

    bits = Cast(Reshape(Gather(LUT, Cast(mask, int32)), [-1]), int32)  # LUT: byte -> 8 bits
    index = Mul(CumSum(bits), bits)                         # k-th nonzero -> k, zeros -> 0
    chunk = Reshape(GatherElements(values, index), shape)   # (Slice to n when n % 8 != 0)

and a Concat of the chunks along axis 0 gives the weight; the LUT (byte -> its 8 bits) is
itself computed by four folded nodes. A chunk whose size is a multiple of 8 is usually stored
in the *columns* layout instead (``converter.core.packed.Chunk``): ``values`` is ``[S, 8]``,
column ``o`` holding a zero and then the nonzero values of bit ``o`` of every mask byte, so
that no flat bit vector and no cast are needed::

    bits = Gather(LUT32, Cast(mask, int32))                 # [n / 8, 8] int32
    index = Mul(CumSum(bits, axis=0), bits)                 # rank down each column, zeros -> 0
    chunk = Reshape(GatherElements(values, index, axis=0), shape)

Three full-size intermediates fewer than the flat decoder (the uint8 bits, their flat view,
the cast), one more int32 one (the table): a 50 %-pruned MiniLM folds with 14 % fewer page
faults. The columns are padded with zeros to the longest one, so a chunk falls back to the
flat layout when that padding would exceed ``COLUMN_SLACK`` of its packed bytes (files grow
0.4-0.6 % on MiniLM and on the ResNet of tests/benchmarks/bench_pack.py).

Why the flat layout — measured on this AMD EPYC (AVX2, no VNNI, 2 busy cores), onnxruntime
1.32, session creation time added to a model whose only weight is 10 M fp32 values, 50 %
zero (dense: 0.06-0.2 s):

- Every full-size intermediate of the fold costs more than its compute: ORT allocates it,
  copies it into an initializer and back out for the next node, and a fresh multi-MB buffer
  is a fresh mmap whose pages fault in. Decoding row blocks of ``CHUNK`` elements lets malloc
  reuse small buffers: one piece +0.67 s, 1 M-element chunks +0.11 s here; on the ResNet-18
  of tests/benchmarks/bench_pack.py, 256 K-512 K chunks added about half the time of 1 M
  ones or one piece (with glibc's mmap disabled all sizes cost the same: that is the effect);
  128 K chunks were slower again (more nodes). That holds in a process that has created
  sessions before; in a fresh one chunks gain nothing (+0.27 vs +0.23 s CPU per 10 M).
- int32 running sums, not int64: +1.2 s vs +2.6 s (one piece).
- GatherElements, not Gather, for the values: 15 ms vs 100 ms for 10 M elements (kernel).
- A lookup table instead of BitShift/BitwiseAnd: one op instead of three, same time; a uint8
  table, bits cast to int32 after the Reshape: 15-35 % less added time than an int32 table.
- Not NonZero + ScatterElements (fewer bytes per element): ORT does not fold NonZero, so that
  graph would decode on every run and MatMul would lose its prepacked constant weight.

``Unpack`` reverses it byte for byte. Each packed weight's decoder records its chunks in the
doc_string of its last node (JSON), so unpacking never guesses from names; the masks are
checked (length, popcount against the number of values, zero padding) before any use.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from converter.core.errors import BadInputError
from converter.core.onnxio import load_model, model_file_size
from converter.core.packed import (
    MARK,
    MAX_BYTES,
    PREFIX,
    Chunk,
    bit_view,
    check_size,
    decode,
    dense_model,
    is_packed,
    packed_weights,
    records,
    unpack,
)
from converter.core.render import mb
from passes.base import Pass, PassResult
from passes.settings import DEFAULT_CHUNK as CHUNK  # elements per chunk (module docstring)
from passes.settings import PackSettings

__all__ = [
    "Pack",
    "Unpack",
    "PACKABLE",
    "CHUNK",
    "MAX_BYTES",
    "is_packed",
    "packed_weights",
    "dense_model",
    "packed_size",
    "encode",
    "decode",
]

logger = logging.getLogger(__name__)

PACKABLE = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT8, TensorProto.UINT8)
MIN_OPSET = 11  # CumSum and GatherElements
LUT = f"{PREFIX}bits"
LUT32 = f"{PREFIX}bits32"  # the same table as int32 (an output of _lut_nodes)
COLUMN_SLACK = 1 / 16  # largest share of a chunk's packed bytes the columns' padding may take
LUT_NODE = f"{PREFIX}lut"  # name of the node giving the shared LUT
INT32 = TensorProto.INT32
_SHARED = {
    f"{PREFIX}flat": np.array([-1], np.int64),
    f"{PREFIX}axis": np.array(0, np.int32),
    f"{PREFIX}zero": np.array([0], np.int64),
    f"{PREFIX}start": np.array(0, np.int32),
    f"{PREFIX}limit": np.array(256, np.int32),
    f"{PREFIX}delta": np.array(1, np.int32),
    f"{PREFIX}column": np.array([256, 1], np.int64),
    f"{PREFIX}place": (1 << np.arange(7, -1, -1)).astype(np.int32),
    f"{PREFIX}two": np.array(2, np.int32),
}


def _lut_nodes() -> list[onnx.NodeProto]:
    """LUT[b] = the 8 bits of byte b, high bit first (uint8 [256, 8]), computed by five
    folded nodes rather than stored (2 KB would outweigh the saving on small models)."""
    p, node = PREFIX, helper.make_node
    return [
        node("Range", [f"{p}start", f"{p}limit", f"{p}delta"], [f"{p}bytes"]),
        node("Reshape", [f"{p}bytes", f"{p}column"], [f"{p}byte"]),
        node("Div", [f"{p}byte", f"{p}place"], [f"{p}shifted"]),
        node("Mod", [f"{p}shifted", f"{p}two"], [LUT32]),
        node("Cast", [LUT32], [LUT], LUT_NODE, to=TensorProto.UINT8),
    ]


class _Names:
    """Short fresh tensor names (``pack/17``) that no tensor of the model uses yet."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.taken = {t.name for t in model.graph.initializer}
        self.taken |= {o for n in model.graph.node for o in n.output}
        self.next = 0

    def __call__(self) -> str:
        while f"{PREFIX}{self.next}" in self.taken:
            self.next += 1
        self.next += 1
        return f"{PREFIX}{self.next - 1}"


def encode(array: np.ndarray, chunk: int = CHUNK) -> list[Chunk]:
    """Split ``array`` into row blocks of about ``chunk`` elements and pack each one."""
    rows = array.reshape(array.shape[0] if array.ndim else 1, -1)
    per_row = max(rows.shape[1], 1)
    step = max(1, chunk // per_row)
    step = -(-step // 8) * 8 if step >= 8 else step  # whole bytes per chunk when possible
    chunks = []
    for start in range(0, rows.shape[0], step):
        block = array[start : start + step]
        flat = block.ravel()
        keep = bit_view(flat) != 0
        values = _columns(flat, keep)
        if values is None:
            values = np.concatenate([np.zeros(1, flat.dtype), flat[keep]])
        chunks.append(Chunk(tuple(block.shape), np.packbits(keep), values))
    return chunks


def _columns(flat: np.ndarray, keep: np.ndarray) -> np.ndarray | None:
    """The values in the columns layout (converter/core/packed.py), or None when the chunk
    does not split into whole bytes or the columns' zero padding would cost more than
    ``COLUMN_SLACK`` of the chunk's packed bytes."""
    if flat.size % 8 or not flat.size:
        return None
    grid, bits = flat.reshape(-1, 8), keep.reshape(-1, 8)
    counts = bits.sum(axis=0)
    rows = int(counts.max()) + 1
    padding = (rows * 8 - 1 - int(counts.sum())) * flat.itemsize
    if padding > COLUMN_SLACK * (flat.size // 8 + (counts.sum() + 1) * flat.itemsize):
        return None
    values = np.zeros((rows, 8), flat.dtype)
    for o in range(8):
        values[1 : counts[o] + 1, o] = grid[bits[:, o], o]
    return values


# ------------------------------------------------------------------ the decoder subgraph


def _chunk_nodes(c: Chunk, out: str, fresh: _Names) -> tuple[list, list]:
    """Nodes and initializers rebuilding chunk ``c`` into tensor ``out``; the first three
    initializers are the chunk's mask, values and shape."""
    mask, values, shape, byte, bits8, bits, ones, rank, index, dense = (fresh() for _ in range(10))
    inits = [
        numpy_helper.from_array(c.mask, mask),
        numpy_helper.from_array(c.values, values),
        numpy_helper.from_array(np.array(c.shape, np.int64), shape),
    ]
    node = helper.make_node
    if c.values.ndim == 2:  # columns: no flat bit vector, no cast (module docstring)
        nodes = [
            node("Cast", [mask], [byte], to=INT32),
            node("Gather", [LUT32, byte], [ones]),  # [n / 8, 8] int32
            node("CumSum", [ones, f"{PREFIX}axis"], [rank]),  # down each column
            node("Mul", [rank, ones], [index]),
            node("GatherElements", [values, index], [dense], axis=0),
            node("Reshape", [dense, shape], [out]),
        ]
        return nodes, inits
    nodes = [
        node("Cast", [mask], [byte], to=INT32),
        node("Gather", [LUT, byte], [bits8]),
        node("Reshape", [bits8, f"{PREFIX}flat"], [bits]),
    ]
    if c.size % 8:  # the mask's last byte is padded: cut the bits to the chunk's size
        size, used = fresh(), fresh()
        inits.append(numpy_helper.from_array(np.array([c.size], np.int64), size))
        nodes.append(node("Slice", [bits, f"{PREFIX}zero", size], [used]))
        bits = used
    nodes += [
        node("Cast", [bits], [ones], to=INT32),  # bits stay uint8 up to here: fewer bytes
        node("CumSum", [ones, f"{PREFIX}axis"], [rank]),
        node("Mul", [rank, ones], [index]),
        node("GatherElements", [values, index], [dense]),
        node("Reshape", [dense, shape], [out]),
    ]
    return nodes, inits


def decoder(weight: str, chunks: list[Chunk], fresh: _Names) -> tuple[list, list]:
    """The nodes (the last one outputs ``weight`` and records the chunks in its doc_string)
    and the initializers that rebuild ``weight``."""
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    names = []
    outs = [weight] if len(chunks) == 1 else [fresh() for _ in chunks]
    for c, out in zip(chunks, outs):
        chunk_nodes, chunk_inits = _chunk_nodes(c, out, fresh)
        nodes += chunk_nodes
        inits += chunk_inits
        names.append([t.name for t in chunk_inits[:3]])
    if len(chunks) > 1:
        nodes.append(helper.make_node("Concat", outs, [weight], axis=0))
    record = {"weight": weight, "chunks": names}
    nodes[-1].name = f"{PREFIX}{weight}"
    nodes[-1].doc_string = MARK + json.dumps(record, sort_keys=True)
    return nodes, inits


# ------------------------------------------------------------------ reading packed models


# ------------------------------------------------------------------ the passes


def _size(protos: list) -> int:
    return sum(p.ByteSize() for p in protos)


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _candidates(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Initializers that may be packed: constant (not graph inputs), of a packable type, not
    part of a decoder already."""
    inputs = {i.name for i in model.graph.input}
    return [
        t
        for t in model.graph.initializer
        if t.data_type in PACKABLE
        and t.name not in inputs
        and len(t.dims) >= 1
        and not t.name.startswith(PREFIX)
    ]


class Pack(Pass):
    """Store each constant weight with enough zeros as a bit mask and its nonzero values.

    ``min_saved_bytes``: a weight is packed only when that saves at least this many bytes
    (each packed weight adds about 8 nodes per ``chunk`` values, which ORT folds at load).
    ``chunk``: elements decoded per chunk (``CHUNK``; tests use small ones). Settings:
    :class:`passes.settings.PackSettings`.
    """

    name = "pack"
    Settings = PackSettings
    dense_weights = False

    def requires(self, model: onnx.ModelProto) -> None:
        check_size(model)
        packed_weights(model)  # refuses a corrupt mask before anything else is done

    def call(self, model: onnx.ModelProto) -> PassResult:
        plans, tensors = self._plan(model)
        shared = [numpy_helper.from_array(a, n) for n, a in _SHARED.items()]
        saved = sum(t["bytes_before"] - t["bytes_after"] for t in tensors if t["packed"])
        if plans and saved <= _size(shared) + _size(_lut_nodes()):
            for t in tensors:
                t["packed"], t["bytes_after"] = False, t["bytes_before"]
                t["reason"] = "the total saving does not pay for the shared bit table"
            plans = {}
        if plans and _opset(model) < MIN_OPSET:
            raise BadInputError(
                f"the model uses opset {_opset(model)}; the decoder needs opset ≥ {MIN_OPSET}",
                "convert it first: onnx.version_converter.convert_version(model, 17)",
            )
        out = _apply(model, plans, shared)
        stats = self._stats(model, out, tensors)
        logger.info("%s", stats["summary"])
        return PassResult(out, bool(plans), stats)

    def _plan(self, model: onnx.ModelProto) -> tuple[dict[str, tuple[list, list]], list[dict]]:
        """The decoder of each weight worth packing, and every candidate's numbers."""
        plans, tensors = {}, []
        fresh = _Names(model)
        for t in _candidates(model):
            array = numpy_helper.to_array(t)
            nodes, inits = decoder(t.name, encode(array, self.chunk), fresh)
            after = _size(nodes) + _size(inits)
            row = {
                "name": t.name,
                "dtype": str(array.dtype),
                "shape": list(array.shape),
                "zeros": float(np.mean(bit_view(array.ravel()) == 0)) if array.size else 0.0,
                "bytes_before": t.ByteSize(),
                "bytes_after": after,
                "packed": t.ByteSize() - after >= self.min_saved_bytes,
                "reason": "",
            }
            if row["packed"]:
                plans[t.name] = (nodes, inits)
            else:
                row["bytes_after"] = row["bytes_before"]
                saving = t.ByteSize() - after
                row["reason"] = (
                    f"packing would add {-saving} bytes"
                    if saving <= 0
                    else f"packing would save only {saving} bytes (< {self.min_saved_bytes})"
                )
            tensors.append(row)
        return plans, tensors

    def _stats(self, before: onnx.ModelProto, after: onnx.ModelProto, tensors: list) -> dict:
        packed = [t for t in tensors if t["packed"]]
        already = len(records(before))
        stats: dict[str, Any] = {
            "tensors_packed": len(packed),
            "already_packed": already,
            "params_packed": sum(int(np.prod(t["shape"])) for t in packed),
            "bytes_before": before.ByteSize(),
            "bytes_after": after.ByteSize(),
            "tensors": tensors,
        }
        stats["size_ratio"] = stats["bytes_after"] / max(stats["bytes_before"], 1)
        if packed:
            stats["summary"] = (
                f"packed {len(packed)} weights ({stats['params_packed']:,} values): "
                f"{mb(stats['bytes_before'])} → {mb(stats['bytes_after'])}"
            )
        elif already:
            stats["summary"] = f"already packed ({already} weights): left as is"
        else:
            stats["summary"] = (
                "nothing to pack: no constant weight has enough zeros to save bytes "
                "(prune the model first)"
            )
        return stats


def _apply(model: onnx.ModelProto, plans: dict, shared: list) -> onnx.ModelProto:
    """A copy of ``model`` with each planned weight replaced by its decoder (decoders first,
    in initializer order; the shared constants added once)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if not plans:
        return out
    graph = out.graph
    kept = [t for t in graph.initializer if t.name not in plans]
    present = {t.name for t in kept}
    has_lut = any(LUT in n.output for n in graph.node)
    new_nodes = [] if has_lut else _lut_nodes()
    new_nodes += [n for nodes, _ in plans.values() for n in nodes]
    new_inits = [t for _, inits in plans.values() for t in inits]
    used = {i for n in new_nodes for i in n.input}
    new_inits += [t for t in shared if t.name in used and t.name not in present]
    old_nodes = list(graph.node)
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    del graph.node[:]
    graph.node.extend(new_nodes + old_nodes)
    return out


class Unpack(Pass):
    """Replace every packed weight by its dense initializer, byte for byte as before `pack`."""

    name = "unpack"
    dense_weights = False

    def requires(self, model: onnx.ModelProto) -> None:
        check_size(model)

    def call(self, model: onnx.ModelProto) -> PassResult:
        out, stats = unpack(model)
        logger.info("%s", stats["summary"])
        return PassResult(out, bool(stats["tensors_unpacked"]), stats)


def packed_size(path: Any) -> int:
    """The size in bytes ``path`` would have after `pack` (its file size when packing saves
    nothing): what a pruned model costs to ship."""

    model = load_model(path)
    try:
        result = Pack()(model)
    except BadInputError:  # above 2 GB, old opset: the file as it is
        return model_file_size(path)
    return result.model.ByteSize() if result.modified else model_file_size(path)
