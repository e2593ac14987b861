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
from onnx import TensorProto, numpy_helper

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
    """Rows ``[start, start + rows)`` of axis 0 of a weight, packed."""

    shape: tuple[int, ...]
    mask: np.ndarray  # uint8, ceil(n / 8) bytes
    values: np.ndarray  # a zero, then the nonzero values in flat order

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def bit_view(a: np.ndarray) -> np.ndarray:
    """The raw bits, so that -0.0 counts as a value (unpack must give back every byte)."""
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def check_chunk(c: Chunk, weight: str) -> None:
    """Refuse a chunk whose mask does not fit its shape and values (a corrupt file)."""
    n = c.size
    problem = ""
    if c.mask.dtype != np.uint8 or c.mask.ndim != 1 or c.mask.size != -(-n // 8):
        problem = f"mask of {c.mask.size} bytes for {n} elements (needs {-(-n // 8)})"
    elif n % 8 and int(c.mask[-1]) & ((1 << (8 - n % 8)) - 1):
        problem = "mask has bits set past the tensor's end"
    elif int(np.unpackbits(c.mask).sum()) != c.values.size - 1:
        problem = (
            f"mask marks {int(np.unpackbits(c.mask).sum())} values, {c.values.size - 1} stored"
        )
    elif c.values.size and bit_view(c.values[:1])[0] != 0:
        problem = "the values do not start with a zero"
    if problem:
        raise BadInputError(
            f"packed weight {weight!r} is corrupt: {problem}",
            "re-create the model with `onnxship pack` from the unpacked model",
        )


def decode(chunks: list[Chunk], weight: str = "weight") -> np.ndarray:
    """The dense array, computed the way the ONNX decoder computes it (after checking)."""
    parts = []
    for c in chunks:
        check_chunk(c, weight)
        bits = np.unpackbits(c.mask)[: c.size].astype(np.int64)
        parts.append(c.values[np.cumsum(bits) * bits].reshape(c.shape))
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


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
    total = sum(t.ByteSize() for t in model.graph.initializer)
    if total > MAX_BYTES:
        raise BadInputError(
            f"the model's weights take {total / 1e9:.2f} GB; pack supports models below 2 GB",
            "pack a model below 2 GB (e.g. after int8 quantization), or ship it unpacked",
        )


def unpack(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """``model`` with every packed weight replaced by its dense initializer, byte for byte as
    before `pack`, and the stats of that (a new model; ``model`` is not changed)."""
    dense = packed_weights(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = [n for n in out.graph.node if not (set(n.output) & set(dense))]
    nodes = _live(nodes, {o.name for o in out.graph.output})
    used = {i for n in nodes for i in n.input}
    inits = [t for t in out.graph.initializer if not t.name.startswith(PREFIX) or t.name in used]
    inits += [numpy_helper.from_array(a, name) for name, a in dense.items()]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    del out.graph.initializer[:]
    out.graph.initializer.extend(inits)
    stats = {
        "tensors_unpacked": len(dense),
        "bytes_before": model.ByteSize(),
        "bytes_after": out.ByteSize(),
        "summary": f"unpacked {len(dense)} weights" if dense else "nothing to unpack",
    }
    return out, stats


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
