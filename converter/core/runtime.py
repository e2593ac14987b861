"""onnxruntime sessions made one way everywhere: CPU, fixed threads, sequential."""

from __future__ import annotations

import functools
import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.capi import _pybind_state

from converter.core.errors import BadInputError, InternalError, first_line

__all__ = [
    "make_session",
    "cached_session",
    "release_sessions",
    "run_session",
    "tensor_values",
    "unknown_ops",
]


def make_session(
    model: str | os.PathLike | bytes,
    threads: int = 1,
    inter_op_threads: int = 1,
    optimize: bool = True,
    built: bool = False,
):
    """A CPU InferenceSession (``model`` is a path or serialized bytes). ``built``: the model
    is one onnxship made (a variant, an augmented copy), so onnxruntime refusing it is a bug
    of ours (InternalError, exit 3), not a bad input (exit 2)."""

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = inter_op_threads
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises Fail/InvalidGraph/NotImplemented...
        what = "the model" if isinstance(model, bytes) else str(model)
        if built:
            raise InternalError(
                f"onnxruntime cannot load a model onnxship built: {first_line(e)}"
            ) from e
        raise BadInputError(
            f"onnxruntime cannot load {what}: {first_line(e)}",
            "check that it is a valid ONNX model for the CPU execution provider",
        ) from e


class _SessionCache:
    """The last few sessions made from model bytes, by the bytes' digest: a worker scoring
    many shards of one model builds its session once (per process, not per task)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.sessions: OrderedDict[tuple[str, int], object] = OrderedDict()

    def get(self, key: str, model: bytes | str, threads: int):
        entry = (key, threads)
        if entry not in self.sessions:
            self.sessions[entry] = make_session(model, threads=threads)
            while len(self.sessions) > self.size:
                self.sessions.popitem(last=False)
        self.sessions.move_to_end(entry)
        return self.sessions[entry]

    def release(self, keys: Iterable[str]) -> int:
        """Drop the sessions of ``keys`` (any threads); how many were dropped."""
        wanted = set(keys)
        gone = [entry for entry in self.sessions if entry[0] in wanted]
        for entry in gone:
            del self.sessions[entry]
        return len(gone)


_SESSIONS = _SessionCache(size=4)  # a candidate and its reference, for two runs


def release_sessions(*keys: str) -> int:
    """Drop the cached sessions of these model digests, and with them the memory their
    runs grew (onnxruntime's arena keeps its peak: MobileNetV2 at batch 64, ~0.65 GB per
    session with fp32 Convs, ~1 GB for the fp32 model); how many were dropped."""
    return _SESSIONS.release(keys)


def cached_session(key: str, model: bytes | str, threads: int = 1):
    """A session for ``model`` (serialized bytes whose digest is ``key``, or a path), reused
    while it is among the last four this process used."""
    return _SESSIONS.get(key, model, threads)


def run_session(
    session, feed: Mapping[str, np.ndarray], what: str = "the model"
) -> list[np.ndarray]:
    """Run one feed, all outputs; an onnxruntime failure (a shape the model rejects, a token
    id out of range...) becomes a BadInputError naming ``what``."""
    try:
        return session.run(None, dict(feed))
    except Exception as e:  # onnxruntime raises Fail/InvalidArgument/RuntimeException...
        shapes = ", ".join(f"{n}{tuple(np.shape(a))}" for n, a in feed.items())
        raise BadInputError(
            f"onnxruntime failed to run {what} on {shapes}: {first_line(e)}",
            "check that the inputs fit the model (shapes, dtypes, value ranges such as token ids)",
        ) from e


def tensor_values(
    model, names: Sequence[str], feeds: Iterable[Mapping[str, np.ndarray]]
) -> Iterator[tuple[Mapping[str, np.ndarray], list[np.ndarray]]]:
    """Each batch of ``feeds`` with the values of the float tensors ``names`` (an
    ``onnx.ModelProto``; intermediate tensors are made graph outputs of a copy)."""

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for name in names:
        if name not in known:
            value = onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
            probe.graph.output.append(value)
    session = make_session(probe.SerializeToString())
    for feed in feeds:
        yield feed, session.run(list(names), dict(feed))


def unknown_ops(model: onnx.ModelProto) -> list[str]:
    """The nodes onnxruntime has no operator for, as ``name (domain:op)``: ops of a custom
    domain that are neither onnxruntime's own (com.microsoft, ai.onnx.ml, ...) nor functions
    the model defines. Standard-domain ops are left to onnxruntime to judge (by opset)."""
    known = _registered_ops()
    if known is None:  # this onnxruntime build does not list its schemas: it judges at load
        return []
    local = {(f.domain, f.name) for f in model.functions}
    found = []
    for node in _walk(model.graph):
        key = (node.domain, node.op_type)
        if node.domain not in ("", "ai.onnx") and key not in known and key not in local:
            found.append(f"{node.name or '(unnamed)'} ({node.domain}:{node.op_type})")
    return found


def _walk(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield from _walk(sub)


@functools.cache
def _registered_ops() -> frozenset[tuple[str, str]] | None:
    """(domain, op) of every operator schema this onnxruntime registers (None when the
    build does not say: minimal builds)."""
    schemas = getattr(_pybind_state, "get_all_operator_schema", None)
    return None if schemas is None else frozenset((s.domain, s.name) for s in schemas())
