"""The packed-weight format (``onnxship pack``), read side: what a packed model holds and how
its weights decode. ``passes/pack.py`` writes the format (the Pack pass) and wraps
:func:`unpack` as the Unpack pass; everything that reads weights (the pass runner, auto,
sensitivity) unpacks through :func:`dense_model`. The format itself is described in
``passes/pack.py``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from converter.core.errors import BadInputError

__all__ = [
    "PREFIX",
    "MARK",
    "MAX_BYTES",
    "Chunk",
    "check_chunk",
    "check_size",
    "decode",
    "is_packed",
    "packed_weights",
    "unpack",
    "dense_model",
]

logger = logging.getLogger(__name__)

MAX_BYTES = 2**31 - 1  # protobuf's limit; larger models keep their weights in external data
PREFIX = "pack/"  # every tensor the decoders add is named PREFIX + something
MARK = "onnxship pack v1 "  # doc_string of a decoder's last node, followed by JSON


@dataclass
class Chunk:
    """Rows ``[start, start + rows)`` of axis 0 of a weight, packed.

    ``values`` has one of two layouts. Flat (1-D): a zero, then the nonzero values in flat
    order. Columns (2-D, ``[S, 8]``, only when ``n % 8 == 0``): column ``o`` holds a zero, then
    the nonzero values of the elements whose flat index is ``o`` mod 8 (bit ``o`` of each mask
    byte), in order, then zeros up to ``S`` rows; ``S`` is one more than the largest column."""

    shape: tuple[int, ...]
    mask: np.ndarray  # uint8, ceil(n / 8) bytes
    values: np.ndarray  # flat [K + 1] or columns [S, 8] (see above)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def bit_view(a: np.ndarray) -> np.ndarray:
    """The raw bits, so that -0.0 counts as a value (unpack must give back every byte)."""
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def check_chunk(c: Chunk, weight: str, bits: np.ndarray | None = None) -> None:
    """Refuse a chunk whose mask does not fit its shape and values (a corrupt file).
    ``bits``: the mask already unpacked (bool, one per element), when the caller has it."""
    n = c.size
    problem = ""
    if c.mask.dtype != np.uint8 or c.mask.ndim != 1 or c.mask.size != -(-n // 8):
        problem = f"mask of {c.mask.size} bytes for {n} elements (needs {-(-n // 8)})"
    elif n % 8 and int(c.mask[-1]) & ((1 << (8 - n % 8)) - 1):
        problem = "mask has bits set past the tensor's end"
    elif c.values.ndim == 2:
        problem = _column_problem(c, _bits(c) if bits is None else bits)
    else:
        marked = int(np.count_nonzero(_bits(c) if bits is None else bits))
        if c.values.ndim != 1 or marked != c.values.size - 1:
            problem = f"mask marks {marked} values, {c.values.size - 1} stored"
        elif c.values.size and bit_view(c.values[:1])[0] != 0:
            problem = "the values do not start with a zero"
    if problem:
        raise BadInputError(
            f"packed weight {weight!r} is corrupt: {problem}",
            "re-create the model with `onnxship pack` from the unpacked model",
        )


def _column_problem(c: Chunk, bits: np.ndarray) -> str:
    """What is wrong with a chunk in the columns layout ('' when nothing)."""
    if c.size % 8 or c.values.shape[1:] != (8,):
        return f"values of shape {list(c.values.shape)} for {c.size} elements (needs [S, 8])"
    counts = bits.reshape(-1, 8).sum(axis=0)
    rows = int(counts.max(initial=0)) + 1
    if c.values.shape[0] != rows:
        return f"mask marks up to {rows - 1} values per column, {c.values.shape[0] - 1} stored"
    raw = bit_view(c.values.reshape(-1)).reshape(c.values.shape)
    unused = np.arange(rows)[:, None] > counts[None, :]
    if raw[0].any() or raw[unused].any():
        return "the value columns are not zero where no value is stored"
    return ""


def _bits(c: Chunk) -> np.ndarray:
    """The mask as one bool per element (the padding of the last byte cut off)."""
    return np.unpackbits(c.mask, count=c.size).view(bool)


def decode(chunks: list[Chunk], weight: str = "weight") -> np.ndarray:
    """The dense array the ONNX decoder computes (after checking), byte for byte: the
    nonzero values scattered to the set bits of the mask in one boolean assignment per
    chunk (0.02-0.05 CPU-s per 10 M values; no per-element or per-row Python loop)."""
    if not chunks:
        raise BadInputError(
            f"packed weight {weight!r} has no chunks",
            "re-create the model with `onnxship pack` from the unpacked model",
        )
    total = sum(c.size for c in chunks)
    rows = sum(c.shape[0] if c.shape else 1 for c in chunks)
    tail = chunks[0].shape[1:]
    out = np.zeros(total, chunks[0].values.dtype)
    start = 0
    for c in chunks:  # one iteration per chunk of ~512 K values
        if c.values.dtype != out.dtype or c.shape[1:] != tail:
            raise BadInputError(
                f"packed weight {weight!r} is corrupt: its chunks differ in type or row shape",
                "re-create the model with `onnxship pack` from the unpacked model",
            )
        bits = _bits(c)
        check_chunk(c, weight, bits)
        piece = out[start : start + c.size]
        if c.values.ndim == 2:  # columns: bit o of every byte takes column o, in order
            grid = bits.reshape(-1, 8)
            counts = grid.sum(axis=0)
            stored = [c.values[1 : counts[o] + 1, o] for o in range(8)]
            piece.reshape(-1, 8).T[grid.T] = np.concatenate(stored)  # column by column
        else:
            piece[bits] = c.values[1:]
        start += c.size
    if len(chunks) == 1:
        return out.reshape(chunks[0].shape)
    return out.reshape((rows, *tail))


@dataclass
class Record:
    """One packed weight as its decoder describes it."""

    weight: str
    chunks: list[list[str]]  # [mask, values, shape] initializer names per chunk


def records(model: onnx.ModelProto) -> list[Record]:
    found = []
    for node in model.graph.node:
        if node.doc_string.startswith(MARK):
            try:
                data = json.loads(node.doc_string[len(MARK) :])
                found.append(Record(str(data["weight"]), list(data["chunks"])))
            except (ValueError, KeyError, TypeError) as e:
                raise BadInputError(
                    f"the pack record of node {node.name!r} is unreadable ({e})",
                    "re-create the model with `onnxship pack` from the unpacked model",
                ) from e
    return found


def is_packed(model: onnx.ModelProto) -> bool:
    """Whether ``model`` holds weights packed by this module."""
    return bool(records(model))


def packed_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every packed weight of ``model``, decoded and checked (a corrupt one is refused)."""
    inits = {t.name: t for t in model.graph.initializer}
    out = {}
    for r in records(model):
        if not r.chunks or any(not isinstance(c, list) or len(c) != 3 for c in r.chunks):
            missing = ["chunks"]
        else:
            missing = [name for c in r.chunks for name in c if name not in inits]
        if missing:
            raise BadInputError(
                f"packed weight {r.weight!r} is incomplete (missing {missing[:3] or 'chunks'})",
                "re-create the model with `onnxship pack` from the unpacked model",
            )
        chunks = [_chunk(inits, c) for c in r.chunks]
        out[r.weight] = decode(chunks, r.weight)
    return out


def _chunk(inits: dict[str, onnx.TensorProto], names: list[str]) -> Chunk:
    mask, values, shape = (numpy_helper.to_array(inits[n]) for n in names)
    return Chunk(tuple(int(d) for d in shape), mask, values)


def check_size(model: onnx.ModelProto) -> None:
    """Refuse weights above protobuf's 2 GB, and tensors still in external data (a model
    read by ``converter.core.onnxio.load_model`` has its external data loaded)."""
    external = [t.name for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    if external:
        raise BadInputError(
            f"{len(external)} tensors of the model are in external data that was not loaded",
            "load the model with converter.core.onnxio.load_model, which reads it",
        )
    total = sum(len(t.raw_data) or t.ByteSize() for t in model.graph.initializer)
    if total > MAX_BYTES:
        raise BadInputError(
            f"the model's weights take {total / 1e9:.2f} GB; pack supports models below 2 GB",
            "pack a model below 2 GB (e.g. after int8 quantization), or ship it unpacked",
        )


def unpack(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """``model`` with every packed weight replaced by its dense initializer, byte for byte as
    before `pack`, and the stats of that (a new model; ``model`` is not changed). Each dense
    weight's bytes are copied once, into its place (protobuf copies of large tensors cost as
    much as serializing them), and the size after is computed, not serialized again."""
    dense = packed_weights(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)  # the packed model: small
    graph = out.graph
    nodes = list(graph.node)  # one wrapper per node: ids stay valid below
    live = _live([n for n in nodes if not set(n.output) & set(dense)], _outputs(out))
    alive = {id(n) for n in live}
    used = {i for n in live for i in n.input}
    removed = _remove(graph.node, [id(n) not in alive for n in nodes])
    removed += _remove(
        graph.initializer,
        [t.name.startswith(PREFIX) and t.name not in used for t in graph.initializer],
    )
    added = 0
    for name, array in dense.items():
        t = graph.initializer.add()
        t.name, t.data_type = name, helper.np_dtype_to_tensor_dtype(array.dtype)
        t.dims.extend(array.shape)
        header = t.ByteSize()  # before the data: TensorProto.raw_data is field 9, one-byte tag
        t.raw_data = np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes()
        added += _field(header + _field(array.nbytes))
    before = model.ByteSize()
    stats = {
        "tensors_unpacked": len(dense),
        "bytes_before": before,
        "bytes_after": _size_after(model, before, added - removed),
        "summary": f"unpacked {len(dense)} weights" if dense else "nothing to unpack",
    }
    return out, stats


def _outputs(model: onnx.ModelProto) -> set[str]:
    return {o.name for o in model.graph.output}


def _remove(field: Any, drop: list[bool]) -> int:
    """Delete the elements of the repeated ``field`` marked in ``drop``, in place; the bytes
    they took in their message."""
    size = 0
    for i in reversed([i for i, d in enumerate(drop) if d]):
        size += _field(field[i].ByteSize())
        del field[i]
    return size


def _varint(n: int) -> int:
    return max(1, -(-n.bit_length() // 7))


def _field(n: int) -> int:
    """Serialized bytes of a length-delimited field of ``n`` bytes with a one-byte tag (every
    field used here: GraphProto.node = 1, .initializer = 5, ModelProto.graph = 7)."""
    return 1 + _varint(n) + n


def _size_after(model: onnx.ModelProto, before: int, delta: int) -> int:
    """``model``'s serialized size once its graph grows by ``delta`` bytes: the graph's own
    length prefix may change length too."""
    rest = onnx.ModelProto()
    rest.CopyFrom(model)
    rest.ClearField("graph")
    body = before - rest.ByteSize()  # = _field(graph bytes)
    graph = next(g for g in range(body - 6, body) if g >= 0 and _field(g) == body)
    return before - body + _field(graph + delta)


def _live(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` without the decoder nodes (outputs named PREFIX...) nothing reads any more."""
    while True:
        read = outputs | {i for n in nodes for i in n.input}
        dead = [n for n in nodes if all(o.startswith(PREFIX) and o not in read for o in n.output)]
        if not dead:
            return nodes
        gone = {id(n) for n in dead}
        nodes = [n for n in nodes if id(n) not in gone]


def dense_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its packed weights unpacked (itself when nothing is packed): for the
    passes and searches that read weights (prune, quantize, sensitivity, auto)."""
    if not is_packed(model):
        return model
    logger.info("unpacking the packed weights first (pack again after this step)")
    check_size(model)
    return unpack(model)[0]
