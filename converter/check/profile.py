"""Where a model's run time goes, per op type, from onnxruntime's own profiler.

A static (QDQ) int8 model is only fast when onnxruntime fuses every QuantizeLinear /
DequantizeLinear pair into an integer kernel (``QLinearMatMul``, ``MatMulIntegerToFloat``,
``QLinearConv``...). A ``DequantizeLinear`` it could not fuse runs as its own kernel on every
inference, converting int8 back to float — pure overhead, and on transformer exports it can
be most of the run time (measured on NNCF's static all-MiniLM-L6-v2: 46 %).
:func:`unfused_dq_share` measures that share: every ``DequantizeLinear`` kernel that shows
up in the profile of the optimized session is, by definition, one that was not fused.

The shares are of the summed node kernel time (``cat == "Node"`` events of the trace), over
``runs`` runs at batch size of the feed, on ``threads`` threads — a ratio measured in one
session, so it does not depend on how fast the machine is (only on its kernels).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from converter.core.data import model_input_specs, open_data

# Unfused DequantizeLinear time above this share of the run time is worth a report note.
UNFUSED_NOTE = 0.02

__all__ = ["op_time_shares", "unfused_dq_share", "unfused_dq_nodes", "first_feed"]


def op_time_shares(
    model: str | os.PathLike | bytes,
    feeds: Mapping[str, np.ndarray],
    runs: int = 20,
    threads: int = 1,
) -> dict[str, float]:
    """Op type → share (0..1) of the node kernel time of ``runs`` runs of ``feeds``, largest
    first. The op types are those of the optimized graph onnxruntime runs (fused kernels
    appear under their own names, e.g. ``MatMulIntegerToFloat``)."""

    with tempfile.TemporaryDirectory(prefix="onnxship-profile-") as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "profile")
        source = model if isinstance(model, bytes) else str(model)
        session = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            session.run(None, dict(feeds))
        trace = json.loads(Path(session.end_profiling()).read_text())
    return _shares(trace)


def _shares(trace: list[dict]) -> dict[str, float]:
    """Summed ``dur`` of the kernel-time node events per op type, as shares of their total."""
    per_op: dict[str, float] = defaultdict(float)
    for event in trace:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            per_op[event.get("args", {}).get("op_name", "?")] += float(event.get("dur", 0))
    total = sum(per_op.values()) or 1.0
    return dict(sorted(((op, t / total) for op, t in per_op.items()), key=lambda kv: -kv[1]))


def unfused_dq_share(
    model_path: str | os.PathLike | bytes,
    feeds: Mapping[str, np.ndarray],
    runs: int = 20,
    threads: int = 1,
) -> float:
    """Share (0..1) of the run time spent in ``DequantizeLinear`` kernels onnxruntime did
    not fuse. 0 for a float or dynamic-int8 model, and for a static one where every Q/DQ
    pair fused; a few percent or more means integer kernels are being fed float."""
    return op_time_shares(model_path, feeds, runs, threads).get("DequantizeLinear", 0.0)


def first_feed(data: str | os.PathLike, model) -> dict[str, np.ndarray]:
    """The first sample of ``data`` as a batch-1 feed for ``model`` (a path or proto)."""

    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    specs = model_input_specs(proto)
    return next(iter(open_data(data, specs).batches(specs, 1, limit=1)))


def unfused_dq_nodes(model: str | os.PathLike | bytes) -> int:
    """How many ``DequantizeLinear`` nodes remain in the graph onnxruntime optimizes
    ``model`` into (CPU, all optimizations): the count behind :func:`unfused_dq_share`,
    deterministic for a given onnxruntime version."""

    with tempfile.TemporaryDirectory(prefix="onnxship-profile-") as tmp:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        source = model if isinstance(model, bytes) else str(model)
        ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
        optimized = onnx.load(opts.optimized_model_filepath, load_external_data=False)
    return sum(1 for n in optimized.graph.node if n.op_type == "DequantizeLinear")


def note_unfused_dq(result, built: list, data: str | os.PathLike, threads: int = 1) -> None:
    """For ``auto``: profile each built static (QDQ) candidate on one sample of ``data``,
    store the unfused DequantizeLinear share on it (``candidate.unfused_dq``, in the
    manifest) and add a report note for those above :data:`UNFUSED_NOTE` of the run time."""
    feed = None
    for c in built:
        if not any(p.get("pass") == "quantize-static" for p in c.passes):
            continue
        feed = feed if feed is not None else first_feed(data, c.path)
        c.unfused_dq = unfused_dq_share(c.path, feed, runs=10, threads=threads)
    slow = [c for c in built if c.unfused_dq is not None and c.unfused_dq >= UNFUSED_NOTE]
    if slow:
        listed = ", ".join(f"{c.name} {100 * c.unfused_dq:.0f} %" for c in slow)
        result.notes.append(
            "run time in DequantizeLinear nodes onnxruntime did not fuse (profiled, batch 1): "
            f"{listed} — these static models pay a float conversion on every inference"
        )
