"""Kernel truth: does onnxruntime's optimized session — the fused integer kernels, what ships —
compute what a QDQ model says?

A QDQ model has two readings in onnxruntime. With graph optimizations off
(``ORT_DISABLE_ALL``) every QuantizeLinear/DequantizeLinear runs as a float op and every
Conv/MatMul/Add between them in float: the model's semantics, what calibration and
``sensitivity`` measure. With them on (``ORT_ENABLE_ALL``, every session ``validate``,
``bench`` and users make) the DQ → op → Q groups are fused into integer kernels
(QLinearConv, QLinearMatMul, QGemm, QLinearAdd...): what ships. The two should differ by
rounding only. They can differ by much more: u8×s8 pair sums saturate int16 in x86 CPUs
without VNNI (full 8-bit weights on AVX2), an int32 accumulator overflows, and onnxruntime's
``WeightBiasQuantization`` transformer quantizes a float Conv/Gemm that sits between a
DequantizeLinear and a QuantizeLinear — a node the user "kept in fp32" — to per-tensor int8
weights at session load (docs/ort-kernel-divergence.md).

:func:`kernel_truth` runs the model both ways on a few samples (one session each way, the
same threads), compares every graph output (mean and worst cosine, top-1 agreement for
logits-like outputs; each also against float reference outputs when given) and says whether
they diverged. When they did, it names the first few nodes where the tensors part: fused
kernels leave no intermediate float tensors, but every activation's QuantizeLinear output
survives fusion (the fused kernel writes it), so those integer tensors, and the graph
outputs, are made graph outputs of a copy of the model and compared both ways (two more
sessions, only then). A tensor parts where its relative error is at least
:data:`PART_FLOOR` and :data:`PART_RATIO` times that of the compared tensors it is computed
from; the nodes between those and it are named. The running sums are
:class:`converter.check.tensor_error.Sums` (those of ``sensitivity --tensor-errors``).

The figure is this host's: onnxruntime picks int8 kernels by CPU, so the result records the
host's machine line and int8 target, and the target the model was built for (its
``onnxship.target`` metadata); :attr:`KernelTruth.note` says when they differ.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from converter.check.kernel_truth_report import (
    PARTING_HEADER,
    Agreement,
    KernelTruth,
    OutputTruth,
    Parting,
    parting_rows,
)
from converter.check.tensor_error import Sums
from converter.core import defaults
from converter.core.errors import BadInputError
from converter.core.machine import METADATA_KEY, host_target, machine, machine_line
from converter.core.onnxio import load_model
from converter.core.runtime import make_session, run_session

__all__ = [
    "kernel_truth",
    "locate",
    "reference_outputs",
    "is_qdq",
    "KernelTruth",
    "OutputTruth",
    "Agreement",
    "Parting",
    "PARTING_HEADER",
    "parting_rows",
    "DEFAULT_SAMPLES",
    "DEFAULT_THRESHOLD",
    "PART_FLOOR",
    "PART_RATIO",
]

DEFAULT_SAMPLES = defaults.KERNEL_TRUTH_SAMPLES
DEFAULT_THRESHOLD = defaults.KERNEL_TRUTH_THRESHOLD
# A tensor parts where the kernels' relative error reaches PART_FLOOR and PART_RATIO times
# the largest one of the compared tensors it is computed from. Measured on MobileNetV2 (65
# activations, 8 samples): in faithful builds rounding differences grow through the network by
# at most 2.9x per kernel (to 0.37 at its last block); where onnxruntime re-quantized a Conv
# kept in fp32, the error jumps 32x (0.0006 → 0.018) and 817x (0 → 0.034).
PART_FLOOR = 0.01
PART_RATIO = 8.0

Feed = Mapping[str, np.ndarray]


def is_qdq(model: onnx.ModelProto) -> bool:
    """True when the main graph has QuantizeLinear or DequantizeLinear nodes: a model whose
    optimized session fuses them into integer kernels."""
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def reference_outputs(
    model: onnx.ModelProto | str | os.PathLike, feeds: Iterable[Feed], threads: int = 1
) -> list[dict[str, np.ndarray]]:
    """The float model's outputs on each feed, by name (the ``reference`` of
    :func:`kernel_truth`)."""
    model = _load(model, "reference model")
    session = make_session(model.SerializeToString(), threads)
    names = [o.name for o in session.get_outputs()]
    return [dict(zip(names, run_session(session, f, "the reference model"))) for f in feeds]


def kernel_truth(
    model: onnx.ModelProto | str | os.PathLike,
    feeds: Iterable[Feed],
    reference: Sequence[Mapping[str, np.ndarray]] | None = None,
    threads: int = 1,
    threshold: float = DEFAULT_THRESHOLD,
    top1_threshold: float | None = None,
    parts: int = defaults.KERNEL_TRUTH_PARTS,
) -> KernelTruth:
    """Run the QDQ ``model`` on ``feeds`` with onnxruntime's optimizations off (its
    semantics) and on (the shipped kernels), ``threads`` intra-op threads each, and compare.

    ``reference``: float outputs per feed (by output name; :func:`reference_outputs`), to
    score each reading against fp32 too. Diverged, for some output: given a reference, the
    two readings' mean cosines to it differ by more than ``threshold`` (or, with
    ``top1_threshold`` — on a few samples one flipped argmax is already 1/samples — their
    top-1 agreements by more than that); without one, the kernels' mean cosine to the
    semantics is below 1 − ``threshold`` (stricter: see :func:`_diverges`); a NaN diverges.
    Then the first ``parts`` tensors where the kernels part are named (0: not looked for).
    Deterministic for the same model, feeds, threads, onnxruntime version and CPU kind."""
    model = _load(model, "model")
    if not is_qdq(model):
        raise BadInputError(
            "kernel truth needs a QDQ model (QuantizeLinear/DequantizeLinear nodes); this one "
            "has none",
            "quantize it with `onnxship quantize --mode static` (QDQ format) first",
        )
    feeds = [dict(f) for f in feeds]
    if not feeds:
        raise BadInputError("kernel truth got no samples", "give at least one feed")
    if reference is not None and len(reference) != len(feeds):
        raise BadInputError(
            f"kernel truth got {len(reference)} reference outputs for {len(feeds)} samples",
            "give one reference per feed (reference_outputs(fp32_model, feeds))",
        )
    names = [o.name for o in model.graph.output]
    semantics = _run(model, feeds, threads, optimize=False, what="the model (optimizations off)")
    kernels = _run(model, feeds, threads, optimize=True, what="the model (optimizations on)")
    outputs = tuple(_output_truth(n, semantics, kernels, reference) for n in names)
    diverged = any(_diverges(o, threshold, top1_threshold) for o in outputs)
    found: tuple[Parting, ...] = ()
    located = None
    if diverged and parts > 0:
        found, located = _locate(model, feeds, kernels, threads, threshold, parts)
    host = machine()
    return KernelTruth(
        outputs=outputs,
        diverged=diverged,
        threshold=threshold,
        samples=sum(_rows(f) for f in feeds),
        threads=threads,
        parts=found,
        located=located,
        host=machine_line(host),
        host_target=host_target().name,
        model_target=next((p.value for p in model.metadata_props if p.key == METADATA_KEY), None),
    )


def locate(
    model: onnx.ModelProto | str | os.PathLike,
    feeds: Iterable[Feed],
    threads: int = 1,
    threshold: float = DEFAULT_THRESHOLD,
    parts: int = defaults.KERNEL_TRUTH_PARTS,
) -> tuple[tuple[Parting, ...], bool]:
    """Where the kernels part from the semantics on ``feeds`` — the first ``parts``
    partings, and whether they were located in the shipped kernels' graph (see
    :class:`KernelTruth`) — for a caller that measured the divergence itself."""
    model = _load(model, "model")
    feeds = [dict(f) for f in feeds]
    kernels = _run(model, feeds, threads, optimize=True, what="the model (optimizations on)")
    return _locate(model, feeds, kernels, threads, threshold, parts)


def _load(model: onnx.ModelProto | str | os.PathLike, what: str) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else load_model(model, what=what)


def _rows(feed: Feed) -> int:
    first = next(iter(feed.values()), None)
    return int(np.shape(first)[0]) if first is not None and np.ndim(first) else 1


def _run(
    model: onnx.ModelProto, feeds: Sequence[Feed], threads: int, optimize: bool, what: str
) -> list[dict[str, np.ndarray]]:
    """Every output of ``model`` on each feed, by name, from one session."""
    session = make_session(model.SerializeToString(), threads, optimize=optimize)
    names = [o.name for o in session.get_outputs()]
    return [dict(zip(names, run_session(session, f, what))) for f in feeds]


def _output_truth(
    name: str,
    semantics: Sequence[Mapping[str, np.ndarray]],
    kernels: Sequence[Mapping[str, np.ndarray]],
    reference: Sequence[Mapping[str, np.ndarray]] | None,
) -> OutputTruth:
    sem = [s[name] for s in semantics]
    ker = [k[name] for k in kernels]
    truth = OutputTruth(name, Agreement.of(ker, sem))
    if reference is None or any(name not in r for r in reference):
        return truth
    ref = [r[name] for r in reference]
    return OutputTruth(
        name, truth.kernels_vs_semantics, Agreement.of(sem, ref), Agreement.of(ker, ref)
    )


def _diverges(o: OutputTruth, threshold: float, top1_threshold: float | None) -> bool:
    """With a reference: the two readings' scores differ by more than ``threshold`` (mean
    cosine) or ``top1_threshold`` (top-1 agreement). Without: the kernels differ from the
    semantics by more than ``threshold`` — stricter, since in a sensitive network rounding
    differences alone grow that large (MobileNetV2 int8, faithful kernels: 0.985 on its
    embedding, with both scores to fp32 within 0.003). Written so that a NaN diverges."""
    own, ref = o.gaps()
    if ref is None:
        return not own <= threshold
    if not ref <= threshold:
        return True
    s, k = o.semantics_vs_reference, o.kernels_vs_reference
    if top1_threshold is None or s is None or k is None or s.top1 is None or k.top1 is None:
        return False
    return not abs(s.top1 - k.top1) <= top1_threshold


# ---------------------------------------------------------------- where the tensors part


class _Compared:
    """The tensors compared both ways: each activation's QuantizeLinear output (integers the
    fused kernels write too; dequantized with its scale and zero point when they are
    constants) and each graph output, in graph order, with the nodes computing each from the
    compared tensors upstream of it."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        inits = {t.name: t for t in graph.initializer}
        self.params: dict[str, tuple[np.ndarray, np.ndarray] | None] = {}
        for node in graph.node:
            if node.op_type == "QuantizeLinear" and node.input[0] not in inits:
                self.params[node.output[0]] = _constants(inits, node.input[1:3])
        for out in graph.output:
            self.params.setdefault(out.name, None)
        self.producer = {o: n for n in graph.node for o in n.output if o}
        index = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
        self.names = sorted(self.params, key=lambda t: index.get(t, -1))
        self.segments = {t: self._segment(t, inits, index) for t in self.names}

    def _segment(
        self, tensor: str, inits: Mapping, index: Mapping[str, int]
    ) -> tuple[list[onnx.NodeProto], list[str]]:
        """(the nodes between the compared tensors upstream and ``tensor``, in graph order;
        those tensors)."""
        nodes: dict[int, onnx.NodeProto] = {}
        upstream: set[str] = set()
        seen: set[str] = set()
        stack = [tensor]
        while stack:
            name = stack.pop()
            if name in seen or not name or name in inits:
                continue
            seen.add(name)
            if name != tensor and name in self.params:
                upstream.add(name)
            elif name in self.producer:
                nodes[index[name]] = node = self.producer[name]
                stack.extend(node.input)
        return [nodes[i] for i in sorted(nodes)], sorted(upstream)

    def dequantized(self, name: str, value: np.ndarray) -> np.ndarray:
        params = self.params.get(name)
        if params is None or not np.issubdtype(np.asarray(value).dtype, np.integer):
            return np.asarray(value)
        scale, zero = params
        return (np.asarray(value).astype(np.int64) - zero.astype(np.int64)) * scale.astype(
            np.float64
        )

    def augmented(self, model: onnx.ModelProto) -> onnx.ModelProto:
        out = onnx.ModelProto()
        out.CopyFrom(model)
        have = {o.name for o in out.graph.output}
        for name in self.names:
            if name not in have:
                out.graph.output.add().name = name  # onnxruntime takes them untyped
        return out


def _constants(inits: Mapping, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """(scale, zero point) of a QuantizeLinear when both are scalar initializers (a missing
    zero point is 0), else None."""
    if not names or names[0] not in inits:
        return None
    scale = numpy_helper.to_array(inits[names[0]])
    zero = numpy_helper.to_array(inits[names[1]]) if len(names) > 1 and names[1] in inits else None
    if len(names) > 1 and names[1] and zero is None:
        return None
    zero = np.zeros((), np.int64) if zero is None else zero
    return (scale, zero) if scale.size == 1 and zero.size == 1 else None


def _locate(
    model: onnx.ModelProto,
    feeds: Sequence[Feed],
    kernels: Sequence[Mapping[str, np.ndarray]],
    threads: int,
    threshold: float,
    top: int,
) -> tuple[tuple[Parting, ...], bool]:
    """The first ``top`` partings, and whether the copy exposing the tensors computed, in
    kernels, the outputs the model did (``kernels``): exposing a tensor could change what
    onnxruntime fuses around it."""
    compared = _Compared(model)
    augmented = compared.augmented(model).SerializeToString()
    off = make_session(augmented, threads, optimize=False)
    on = make_session(augmented, threads, optimize=True)
    sums = {t: Sums() for t in compared.names}
    same = Sums()
    for feed, shipped in zip(feeds, kernels):
        sem = dict(zip([o.name for o in off.get_outputs()], run_session(off, feed, "the model")))
        ker = dict(zip([o.name for o in on.get_outputs()], run_session(on, feed, "the model")))
        for name in compared.names:
            s, k = compared.dequantized(name, sem[name]), compared.dequantized(name, ker[name])
            if np.shape(s) == np.shape(k):
                sums[name].add(s, k)
        for out in model.graph.output:
            same.add(shipped[out.name], ker[out.name])
    located = 1.0 - same.cosine() <= threshold / 10
    return _partings(compared, sums, top), located


def _relative(s: Sums) -> float:
    if s.xx > 0:
        return math.sqrt(s.dd / s.xx)
    return 0.0 if s.dd == 0 else math.inf


def _partings(compared: _Compared, sums: Mapping[str, Sums], top: int) -> tuple[Parting, ...]:
    errors = {t: _relative(s) for t, s in sums.items()}
    found = []
    for name in compared.names:
        nodes, upstream = compared.segments[name]
        inherited = max((errors[u] for u in upstream), default=0.0)
        error = errors[name]
        if not (error >= PART_FLOOR and error >= PART_RATIO * inherited):
            continue
        named = [n for n in nodes if n.op_type not in ("QuantizeLinear", "DequantizeLinear")]
        found.append(
            Parting(
                name,
                tuple(n.name for n in named),
                tuple(n.op_type for n in named),
                error,
                inherited,
                sums[name].cosine(),
            )
        )
        if len(found) == top:
            break
    return tuple(found)
