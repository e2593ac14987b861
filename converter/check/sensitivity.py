"""``onnxship sensitivity``: which nodes cost the most fidelity when quantized to int8.

For every quantizable node, a variant of the fp32 model with only that node quantized is
scored against the fp32 model on the scoring samples: ``loss`` = 1 − mean per-sample cosine
of the scored output (the first, or ``output=``), plus the worst sample's cosine. "Only that
node quantized" means its inputs and weights are quantized exactly as in the fully quantized
model, everything else stays fp32; its output is the next node's input and counts there. That
is, up to interactions between nodes, the error ``nodes_to_exclude=[node]`` takes away, which
is what ``auto`` does with the ranking. ``gain=True`` measures that directly, per node, on the
model ``StaticQuantize``/``DynamicQuantize(nodes_to_exclude=[node])`` builds: ``gain`` = loss
of the fully quantized model − loss of that one (slightly negative for a node that does not
matter). It costs one more quantization per node, and ranks differently where errors
interact (``ranked_nodes(by="gain")``). Dynamic mode quantizes activations per batch, so its
numbers depend on ``batch_size``.

Done once: calibration (static; or ``calib=`` ranges from an earlier
:func:`passes.quantize.calibrate`), ``quant_pre_process``, the fully quantized model, the fp32
reference outputs, the scoring batches (in memory). Per node, the variant is cut out of the
fully quantized model into the fp32 (pre-processed) one: static mode copies the Q/DQ nodes
feeding the node; dynamic mode swaps the node for the nodes that replaced it
(DynamicQuantizeLinear, MatMulInteger, ...), which gives the same outputs as
``DynamicQuantize(nodes_to_exclude=<all others>)``. That takes ~0.05 s on a 51 MB BERT-style
encoder, where one more quantization with precomputed ranges took 0.5-1.7 s (ORT reloads,
shape-infers and saves the whole model): as long as scoring 64 samples. What remains is one
session and one run over the samples per variant: time ≈ nodes × one fp32 pass.

Per-tensor error (``tensor_errors`` samples, 0 = off): the SQNR and cosine of every tensor
the fully quantized model quantizes, against the pre-processed fp32 model, on the first
samples of ``data`` one at a time (converter/check/node_error.py) — where the int8 error enters,
not what it costs at the output. ``report.tensor_errors``, worst first.

Candidates are the nodes the fully quantized model has quantized, minus the ops onnxruntime
only quantizes as 8-bit pass-through next to quantized neighbours (Reshape, Transpose,
MaxPool, ...: no error of their own) and, in static mode, nodes whose inputs are not
quantized there (a Relu fused into the Conv before it); ``not_scored`` says which and why.
Node names are those of the pre-processed model: the names ``nodes_to_exclude`` takes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from converter.check.node_error import (
    ERROR_HEADER,
    TensorError,
    error_rows,
    node_errors,
    sample_feeds,
)
from converter.check.profile import unfused_dq_nodes, unfused_dq_share
from converter.core import __version__, defaults
from converter.core.data import model_input_specs, open_data
from converter.core.errors import BadInputError
from converter.core.executor import Executor, InProcess
from converter.core.gates import fmt as _fmt
from converter.core.gates import json_number as _num
from converter.core.metrics import per_sample_cosine
from converter.core.onnxio import load_model
from converter.core.runtime import make_session, run_session
from passes.base import make_pass, quiet_passes
from passes.pack import dense_model
from passes.quant_report import describe_settings
from passes.quantize import (
    CalibrationRanges,
    DynamicQuantize,
    StaticQuantize,
    is_quantized,
    preprocess,
    quantized_nodes,
)

__all__ = [
    "sensitivity",
    "SensitivityReport",
    "NodeSensitivity",
    "Fidelity",
    "MODES",
    "METRICS",
    "DEFAULT_SAMPLES",
    "DEFAULT_BATCH_SIZE",
]

logger = logging.getLogger(__name__)

MODES = defaults.SENSITIVITY_MODES
METRICS = ("cosine",)
# 64 samples: the ranking of the 6-layer encoder benchmark matches 256 samples' (Spearman
# 0.9996, same top 10; tests/benchmarks/bench_sensitivity.py --stability), the trained
# tiny_encoder's matches 450 samples' (static 0.998, same top 5; with 32 samples 0.986, 4 of 5).
DEFAULT_SAMPLES = defaults.DEFAULT_SENSITIVITY_SAMPLES
DEFAULT_BATCH_SIZE = defaults.DEFAULT_SENSITIVITY_BATCH
TOOL = "onnxship sensitivity"
# Settings sensitivity() sets itself (its own parameters), not through quant_settings.
_OWN_SETTINGS = ("calibration", "ranges", "per_channel", "progress")


@dataclass(frozen=True)
class Fidelity:
    """How close one variant's output is to fp32: ``loss`` = 1 − mean per-sample cosine;
    the lowest per-sample cosine and that sample's index."""

    loss: float
    worst_cosine: float
    worst_sample: int

    @classmethod
    def of(cls, candidate: np.ndarray, reference: np.ndarray) -> Fidelity:
        cos = per_sample_cosine(candidate, reference)
        worst = int(np.argmin(cos))
        return cls(float(1.0 - cos.mean()), float(cos[worst]), worst)

    def to_dict(self) -> dict:
        return {
            "loss": _num(self.loss),
            "worst_cosine": _num(self.worst_cosine),
            "worst_sample": self.worst_sample,
        }


@dataclass(frozen=True)
class NodeSensitivity:
    """One node: its fidelity when it alone is quantized, and (``gain=True``) how much of the
    fully quantized model's loss goes away when it alone stays fp32."""

    name: str
    op_type: str
    alone: Fidelity
    gain: float | None = None

    @property
    def loss(self) -> float:
        return self.alone.loss

    @property
    def worst_cosine(self) -> float:
        return self.alone.worst_cosine

    def to_dict(self) -> dict:
        out = {"name": self.name, "op_type": self.op_type, **self.alone.to_dict()}
        if self.gain is not None:
            out["gain"] = _num(self.gain)
        return out


@dataclass
class SensitivityReport:
    """Nodes ranked most sensitive first (highest loss; ties in graph order). ``ranges`` are
    the calibration ranges used (static), to reuse: ``StaticQuantize(ranges=report.ranges)``."""

    model: str | None
    data: str
    mode: str
    settings: dict[str, Any]
    calibration: dict[str, Any] | None  # static: data (None: precomputed), method, samples
    output: str
    samples: int
    all_quantized: Fidelity
    nodes: list[NodeSensitivity]
    not_scored: dict[str, str]
    ranges: CalibrationRanges | None = field(default=None, repr=False, compare=False)
    # Static: DequantizeLinear nodes onnxruntime could not fuse in the fully quantized model,
    # and their share of its batch-1 run time (profiled; a timing, so not in the JSON).
    unfused_dq_nodes: int | None = None
    unfused_dq_share: float | None = field(default=None, compare=False)
    # Every tensor the fully quantized model quantizes, worst SQNR first (None: not measured).
    tensor_errors: list[TensorError] | None = None
    tensor_error_samples: int = 0

    def ranked_nodes(self, by: str = "loss") -> list[str]:
        """Node names, most sensitive first: by ``loss`` (alone quantized) or by ``gain``."""
        if by == "loss":
            return [n.name for n in self.nodes]
        if by != "gain":
            raise BadInputError(f"cannot rank by {by!r}", "use by='loss' or by='gain'")
        if any(n.gain is None for n in self.nodes):
            raise BadInputError("the gains were not measured", "run sensitivity(..., gain=True)")
        order = sorted(range(len(self.nodes)), key=lambda i: (-self.nodes[i].gain, i))
        return [self.nodes[i].name for i in order]

    def to_dict(self) -> dict:
        return {
            "tool": TOOL,
            "version": __version__,
            "model": self.model,
            "data": self.data,
            "mode": self.mode,
            "settings": self.settings,
            "calibration": self.calibration,
            "metric": "cosine",
            "output": self.output,
            "samples": self.samples,
            "all_quantized": self.all_quantized.to_dict(),
            "nodes": [{"rank": i + 1, **n.to_dict()} for i, n in enumerate(self.nodes)],
            "not_scored": self.not_scored,
            "unfused_dq_nodes": self.unfused_dq_nodes,
            "tensor_error_samples": self.tensor_error_samples,
            "tensor_errors": None
            if self.tensor_errors is None
            else [e.to_dict() for e in self.tensor_errors],
        }

    def to_json(self) -> str:
        """Deterministic: the same model, data and options give the same bytes."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    def summary(self, top: int | None = None, errors: int = defaults.NODE_ERROR_ROWS) -> str:
        """The ranked table (``top`` limits it to the first rows), then the ``errors`` worst
        tensors (0: none)."""
        return _summary(self, top) + _error_summary(self, errors)


def sensitivity(
    model: str | os.PathLike | onnx.ModelProto,
    data: str | os.PathLike,
    mode: str = "static",
    calib: str | os.PathLike | CalibrationRanges | None = None,
    metric: str = "cosine",
    samples: int = DEFAULT_SAMPLES,
    per_channel: bool = True,
    output: str | None = None,
    gain: bool = False,
    quant_settings: Mapping[str, Any] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    threads: int = 1,
    progress: bool = True,
    executor: Executor | None = None,
    tensor_errors: int = defaults.NODE_ERROR_SAMPLES,
) -> SensitivityReport:
    """Rank the quantizable nodes of the fp32 ``model`` by the fidelity lost when each alone
    is quantized, scored on the first ``samples`` samples of ``data``.

    calib: static mode's calibration data (default: ``data``), or CalibrationRanges measured
    earlier on this model (``report.ranges`` returns them); dynamic mode ignores it.
    quant_settings: further settings of StaticQuantize / DynamicQuantize (calib_method,
    calib_samples, activation_type, weight_type, reduce_range, preprocess, exclude,
    exclude_ops, nodes_to_exclude); excluded nodes stay fp32 in every variant. output: the
    output compared (default the first). gain: also measure each node kept fp32 with all
    others quantized (one more quantization and run per node). ``threads`` = 1 keeps the
    numbers independent of the machine's core count. ``executor`` runs the scoring of the
    nodes (default: in this process; a RayExecutor runs one Ray task per node); the report
    is the same either way. ``tensor_errors``: samples of ``data`` the per-tensor error of
    the fully quantized model is measured on (0: not measured).
    """
    _check_options(mode, metric, samples, batch_size, threads, tensor_errors)
    proto = _load(model)
    specs = model_input_specs(proto)
    dataset = open_data(data, specs)
    batches = dataset.batches(
        specs, dataset.batch_size_for(specs, batch_size), limit=samples, check_finite=True
    )
    scorer = _Scorer(proto, list(batches), _output_name(proto, output), threads)
    settings = {**_own_settings_absent(quant_settings), "per_channel": bool(per_channel)}
    calib = data if calib is None else calib
    variants = _Variants.for_mode(mode, proto, calib, settings, progress)
    start = time.perf_counter()
    all_quantized = scorer.fidelity(variants.full.model, "the fully quantized model")
    candidates, not_scored = variants.candidates()
    entries = _score_nodes(
        variants,
        scorer,
        candidates,
        not_scored,
        all_quantized,
        gain,
        executor or InProcess(),
        progress,
    )
    # Stable: ties stay in graph order; a NaN loss (broken output) ranks first.
    entries.sort(key=lambda e: -(e.loss if math.isfinite(e.loss) else math.inf))
    report = SensitivityReport(
        model=None if isinstance(model, onnx.ModelProto) else str(model),
        data=str(data),
        mode=mode,
        settings=variants.effective_settings(),
        calibration=variants.calibration(calib),
        output=scorer.output,
        samples=scorer.samples,
        all_quantized=all_quantized,
        nodes=entries,
        not_scored=not_scored,
        ranges=variants.ranges,
    )
    if mode == "static":
        _profile_full(report, variants.full.model, scorer, threads)
    if tensor_errors:
        _tensor_errors(report, variants, data, tensor_errors, threads)
    logger.info(
        "sensitivity (%s): %d nodes scored on %d samples in %.1f s; most sensitive %s",
        mode,
        len(entries),
        scorer.samples,
        time.perf_counter() - start,
        f"{entries[0].name} (loss {entries[0].loss:.3g})" if entries else "none",
    )
    return report


def _profile_full(report: SensitivityReport, model: onnx.ModelProto, scorer, threads: int) -> None:
    """Unfused DequantizeLinear nodes of the fully quantized model, and their run time share
    on one scoring sample (converter/check/profile.py)."""

    data = model.SerializeToString()
    feed = {k: v[:1] for k, v in scorer.feeds[0].items()}
    report.unfused_dq_nodes = unfused_dq_nodes(data)
    report.unfused_dq_share = unfused_dq_share(data, feed, runs=10, threads=threads)


def _tensor_errors(
    report: SensitivityReport, variants: _Variants, data, samples: int, threads: int
) -> None:
    """The per-tensor error of the fully quantized model against the model it was made
    from (the pre-processed fp32 one: same tensor and weight names)."""

    feeds = sample_feeds(data, variants.prepared, samples)
    report.tensor_errors = node_errors(variants.prepared, variants.full.model, feeds, threads)
    report.tensor_error_samples = sum(len(next(iter(f.values()))) for f in feeds)


# ---------------------------------------------------------------- options and inputs


def _check_options(mode, metric, samples, batch_size, threads, tensor_errors) -> None:
    if mode not in MODES:
        raise BadInputError(f"unknown mode {mode!r}", f"use one of {', '.join(MODES)}")
    if metric not in METRICS:
        raise BadInputError(f"unknown metric {metric!r}", f"use one of {', '.join(METRICS)}")
    for flag, value in (
        ("--samples", samples),
        ("--batch-size", batch_size),
        ("--threads", threads),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise BadInputError(f"{flag} {value!r} is not a whole number ≥ 1", f"e.g. {flag} 64")
    if not isinstance(tensor_errors, int) or isinstance(tensor_errors, bool) or tensor_errors < 0:
        raise BadInputError(
            f"tensor_errors {tensor_errors!r} is not a whole number ≥ 0",
            f"give the samples to measure on (e.g. {defaults.NODE_ERROR_SAMPLES}), 0 for none",
        )


def _own_settings_absent(quant_settings: Mapping[str, Any] | None) -> dict[str, Any]:
    clash = sorted(set(quant_settings or {}) & set(_OWN_SETTINGS))
    if clash:
        raise BadInputError(
            f"quant_settings {clash} are parameters of sensitivity() itself",
            "pass them as calib=, per_channel=, progress= instead",
        )
    return dict(quant_settings or {})


def _load(model: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    proto = dense_model(model if isinstance(model, onnx.ModelProto) else load_model(model))
    if is_quantized(proto):
        found = quantized_nodes(proto)
        raise BadInputError(
            f"the model is already quantized ({len(found)} quantization nodes, e.g. {found[0]})",
            "run sensitivity on the original float model",
        )
    return proto


def _output_name(model: onnx.ModelProto, wanted: str | None) -> str:
    names = [o.name for o in model.graph.output]
    if wanted is None:
        return names[0]
    if wanted not in names:
        raise BadInputError(
            f"--output {wanted!r} is not an output of the model", f"use one of {', '.join(names)}"
        )
    return wanted


# ---------------------------------------------------------------- variants


class _Variants:
    """The fully quantized model and the per-node variants, for one model and settings.
    Calibration and pre-processing run once, in :meth:`for_mode`."""

    def __init__(
        self, kind, model: onnx.ModelProto, settings: dict, prepared: onnx.ModelProto, given: dict
    ) -> None:
        self.kind = kind
        self.model = model  # what the pass is given
        self.given = given  # the caller's settings, for the report
        self.prepared = prepared  # the fp32 model the pass quantizes: its node names
        self.excluded = tuple(settings.get("nodes_to_exclude", ()))
        self.settings = {k: v for k, v in settings.items() if k != "nodes_to_exclude"}
        self.ranges: CalibrationRanges | None = settings.get("ranges")
        self.full = kind(**self.settings, nodes_to_exclude=self.excluded)(model)
        self.op_types = {n.name: n.op_type for n in prepared.graph.node if n.name}

    @classmethod
    def for_mode(cls, mode: str, model, calib, settings: dict, progress: bool) -> _Variants:
        if mode == "static":
            return cls._static(model, calib, settings, progress)
        return cls._dynamic(model, settings)

    @classmethod
    def _static(cls, model, calib, settings: dict, progress: bool) -> _Variants:
        if settings.get("format", "qdq") != "qdq":
            raise BadInputError(
                "sensitivity measures QDQ models (QOperator uses the same scales and zero "
                "points: the ranking carries over)",
                "drop the format setting",
            )
        if isinstance(calib, CalibrationRanges):
            make_pass(StaticQuantize, {**settings, "ranges": calib}).requires(model)
            ranges = calib
        else:
            calibrator = make_pass(
                StaticQuantize, {**settings, "calibration": calib, "progress": progress}
            )
            ranges = calibrator.calibrate(model)
        if ranges.prepared is None:  # loaded from a file: pre-process once here
            with tempfile.TemporaryDirectory(prefix="onnxship-sensitivity-") as tmp:
                done = preprocess(model, Path(tmp), ranges.preprocess)
            prepared = done.model.SerializeToString(deterministic=True)
            ranges = dataclasses.replace(ranges, prepared=prepared, prepared_note=done.note)
        prepared = onnx.load_from_string(ranges.prepared)
        variants = {**settings, "ranges": ranges, "progress": False}
        return cls(StaticQuantize, model, variants, prepared, settings)

    @classmethod
    def _dynamic(cls, model, settings: dict) -> _Variants:
        """Pre-process once here; the pass then quantizes the pre-processed model as it is."""
        make_pass(DynamicQuantize, settings).requires(model)
        with tempfile.TemporaryDirectory(prefix="onnxship-sensitivity-") as tmp:
            prepared = preprocess(model, Path(tmp), settings.get("preprocess", True)).model
        return cls(DynamicQuantize, prepared, {**settings, "preprocess": False}, prepared, settings)

    def candidates(self) -> tuple[list[str], dict[str, str]]:
        """(The nodes to score, in graph order; pass-through nodes not scored → why.)"""
        skip = _pass_through_ops("static" if self.kind is StaticQuantize else "dynamic")
        candidates, not_scored = [], {}
        for name in self.full.stats["nodes"]["quantized"]:
            if self.op_types.get(name) in skip:
                not_scored[name] = "passes int8 data through (no error of its own)"
            else:
                candidates.append(name)
        return candidates, not_scored

    def alone(self, name: str) -> onnx.ModelProto | None:
        """The fp32 model with only node ``name`` quantized as in ``full``: its inputs and
        weights (static), the node as dynamic quantization replaced it (dynamic). None when
        ``full`` does not quantize it on its own (a Relu fused into the node before it)."""
        if self.kind is DynamicQuantize:
            return _with_replacement(self.prepared, self.full.model, name)
        chains = _input_chains(self.full.model, name)
        return _quantize_inputs(self.prepared, self.full.model, name, chains) if chains else None

    def quantize(self, keep_fp32: Sequence[str]) -> onnx.ModelProto:
        """Every node quantized but ``keep_fp32`` (and the excluded ones), by the pass. Its
        ``call`` directly: ``requires``/``ensures`` ran on the full quantization of the same
        model with the same settings; skipping them spares hashing the model three times."""
        exclude = sorted({*self.excluded, *keep_fp32})
        return self.kind(**self.settings, nodes_to_exclude=exclude).call(self.model).model

    def effective_settings(self) -> dict[str, Any]:
        """The pass settings used (defaults included), without calibration details."""
        made = self.kind(**self.given)
        drop = {"calibration", "ranges", "progress", "calib_method", "calib_samples"}
        out = {k: v for k, v in made.settings().items() if k not in drop | {"calib_batch_size"}}
        out["nodes_to_exclude"] = sorted(self.excluded)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(out.items())}

    def calibration(self, calib) -> dict[str, Any] | None:
        if self.ranges is None:
            return None
        source = None if isinstance(calib, CalibrationRanges) else str(calib)
        return {"data": source, "method": self.ranges.method, "samples": self.ranges.samples}


def _input_chains(qdq: onnx.ModelProto, name: str) -> dict[int, list[onnx.NodeProto]]:
    """Input index → the QuantizeLinear (activations) and DequantizeLinear nodes feeding node
    ``name`` in the QDQ model ``qdq``; empty when it reads no quantized input (or is gone:
    a Relu fused into the node before it)."""
    producers = {o: n for n in qdq.graph.node for o in n.output}
    node = next((n for n in qdq.graph.node if n.name == name), None)
    chains = {}
    for i, value in enumerate(node.input if node is not None else ()):
        dq = producers.get(value)
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = producers.get(dq.input[0])
        chains[i] = ([q] if q is not None and q.op_type == "QuantizeLinear" else []) + [dq]
    return chains


def _quantize_inputs(
    fp32: onnx.ModelProto,
    qdq: onnx.ModelProto,
    name: str,
    chains: Mapping[int, Sequence[onnx.NodeProto]],
) -> onnx.ModelProto:
    """A copy of ``fp32`` where node ``name`` reads its inputs through copies of ``chains``
    (Q/DQ nodes of ``qdq``, renamed apart) with their initializers and ``qdq``'s opsets.
    Tensor names are matched by input position: ORT renames tensors around fused nodes."""
    out = onnx.ModelProto()
    out.CopyFrom(fp32)
    nodes = list(out.graph.node)
    index = next(i for i, n in enumerate(nodes) if n.name == name)
    target, added = nodes[index], []
    for i, chain in sorted(chains.items()):
        value = target.input[i]  # the fp32 value a QuantizeLinear reads
        for k, original in enumerate(chain):
            node = onnx.NodeProto()
            node.CopyFrom(original)
            node.name = f"{name}/sensitivity/input{i}/{node.op_type}"
            if k or node.op_type == "QuantizeLinear":
                node.input[0] = value
            node.output[0] = value = f"{node.name}:0"
            added.append(node)
        target.input[i] = value
    have = {t.name for t in out.graph.initializer}
    needed = {x for n in added for x in n.input if x not in have}
    out.graph.initializer.extend(t for t in qdq.graph.initializer if t.name in needed)
    del out.graph.node[:]
    out.graph.node.extend(nodes[:index] + added + nodes[index:])
    del out.opset_import[:]
    out.opset_import.extend(qdq.opset_import)
    return out


def _with_replacement(
    fp32: onnx.ModelProto, quantized: onnx.ModelProto, name: str
) -> onnx.ModelProto | None:
    """A copy of ``fp32`` whose node ``name`` is replaced by the nodes that compute its outputs
    in the dynamically ``quantized`` model (DynamicQuantizeLinear, MatMulInteger, scale Muls,
    ...), back to the values the two graphs share, with their initializers and opsets. None
    when ``quantized`` computes its outputs without quantization ops. (Dynamic quantization
    replaces nodes and keeps their output names; static QDQ renames tensors around fused
    Relus, hence :func:`_quantize_inputs` there.)"""
    out = onnx.ModelProto()
    out.CopyFrom(fp32)
    nodes = list(out.graph.node)
    index = next(i for i, n in enumerate(nodes) if n.name == name)
    shared = {o for i, n in enumerate(nodes) if i != index for o in n.output}
    shared |= {v.name for v in out.graph.input}
    producers = {o: n for n in quantized.graph.node for o in n.output}
    picked, stack = set(), [o for o in nodes[index].output if o]
    while stack:
        node = producers.get(value := stack.pop())
        if value in shared or node is None or id(node) in picked:
            continue
        picked.add(id(node))
        stack.extend(i for i in node.input if i)
    added = [n for n in quantized.graph.node if id(n) in picked]
    have = {t.name for t in out.graph.initializer}
    needed = {i for n in added for i in n.input if i not in have}
    out.graph.initializer.extend(t for t in quantized.graph.initializer if t.name in needed)
    del out.graph.node[:]
    out.graph.node.extend(nodes[:index] + added + nodes[index + 1 :])
    del out.opset_import[:]
    out.opset_import.extend(quantized.opset_import)
    return out if is_quantized(out) else None


class _Scorer:
    """The scoring batches (in memory) and the fp32 reference output, computed once."""

    def __init__(self, model: onnx.ModelProto, feeds: list, output: str, threads: int) -> None:
        self.feeds = feeds
        self.output = output
        self.threads = threads
        self.samples = sum(len(next(iter(f.values()))) for f in feeds)
        self.reference = self.outputs(model, "the fp32 model")

    def outputs(self, model: onnx.ModelProto, what: str) -> np.ndarray:
        session = make_session(model.SerializeToString(), threads=self.threads)
        index = [o.name for o in session.get_outputs()].index(self.output)
        return np.concatenate([run_session(session, f, what)[index] for f in self.feeds])

    def fidelity(self, model: onnx.ModelProto, what: str) -> Fidelity:
        return Fidelity.of(self.outputs(model, what), self.reference)


def _pass_through_ops(mode: str) -> frozenset[str]:
    """Ops onnxruntime quantizes only as 8-bit pass-through (same scale in and out)."""
    from onnxruntime.quantization.operators.direct_q8 import Direct8BitOp, QDQDirect8BitOp
    from onnxruntime.quantization.registry import IntegerOpsRegistry, QDQRegistry

    registry = QDQRegistry if mode == "static" else IntegerOpsRegistry
    kinds = (Direct8BitOp, QDQDirect8BitOp)
    return frozenset(op for op, cls in registry.items() if issubclass(cls, kinds))


@dataclass(frozen=True)
class _NodeJob:
    """What scoring every node shares (put into Ray's object store once)."""

    variants: _Variants
    scorer: _Scorer
    gain: bool


def _score_nodes(
    variants: _Variants,
    scorer: _Scorer,
    candidates: Sequence[str],
    not_scored: dict[str, str],
    all_quantized: Fidelity,
    gain: bool,
    executor: Executor,
    progress: bool,
) -> list[NodeSensitivity]:
    """Each node scored by :func:`_score_node` (a map: in this process or as Ray tasks),
    gathered in graph order."""
    scored = executor.map(
        _score_node,
        list(candidates),
        shared=_NodeJob(variants, scorer, gain),
        desc="sensitivity",
        unit="node",
        progress=progress,
    )
    entries = []
    for name, (alone, lost) in zip(candidates, scored):
        if alone is None:
            not_scored[name] = "inputs not quantized (fused into the node before it)"
            continue
        kept_gain = None if lost is None else all_quantized.loss - lost
        entries.append(NodeSensitivity(name, variants.op_types[name], alone, kept_gain))
    return entries


def _score_node(job: _NodeJob, name: str) -> tuple[Fidelity | None, float | None]:
    """(The fidelity with only ``name`` quantized, or None when it cannot be quantized
    alone; with gain, the loss with all but ``name`` quantized.)"""
    with quiet_passes():
        variant = job.variants.alone(name)
        if variant is None:
            return None, None
        alone = job.scorer.fidelity(variant, f"the model with only {name} quantized")
        if not job.gain:
            return alone, None
        kept = job.variants.quantize([name])
        return alone, job.scorer.fidelity(kept, f"the model with {name} kept in fp32").loss


# ---------------------------------------------------------------- rendering


def _summary(r: SensitivityReport, top: int | None) -> str:
    lines = [f"sensitivity of {r.model or 'the model'} ({describe_settings(r.mode, r.settings)})"]
    if r.calibration is not None:
        c = r.calibration
        source = c["data"] or "precomputed ranges"
        lines.append(f"  calibrated on {source} ({c['samples']} samples, {c['method']})")
    lines.append(
        f"  scored on {r.data} ({r.samples} samples), output {r.output}: "
        "loss = 1 − mean cosine to fp32"
    )
    a = r.all_quantized
    lines.append(
        f"  fully quantized ({len(r.nodes) + len(r.not_scored)} nodes int8): "
        f"loss {_fmt(a.loss)}, worst cosine {_fmt(a.worst_cosine)} (sample {a.worst_sample})"
    )
    if r.unfused_dq_share is not None:
        lines.append(
            f"  unfused DequantizeLinear: {r.unfused_dq_nodes} nodes, "
            f"{100 * r.unfused_dq_share:.1f} % of the run time (profiled, batch 1; a fast "
            "static model has none)"
        )
    by_reason: dict[str, list[str]] = {}
    for name, reason in r.not_scored.items():
        by_reason.setdefault(reason, []).append(name)
    for reason, names in by_reason.items():
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        lines.append(f"  not scored, {reason}: {', '.join(names[:3])}{more}")
    shown = r.nodes[:top] if top else r.nodes
    with_gain = any(n.gain is not None for n in r.nodes)
    rows = [("rank", "node", "op", "loss", "worst cos") + (("gain",) if with_gain else ())]
    for i, n in enumerate(shown, start=1):
        row = (str(i), n.name, n.op_type, _fmt(n.loss), _fmt(n.worst_cosine))
        rows.append(row + ((_fmt(n.gain),) if with_gain else ()))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = {0, 3, 4, 5}
    for row in rows:
        cells = [
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))
        ]
        lines.append("  " + "  ".join(cells).rstrip())
    if len(shown) < len(r.nodes):
        lines.append(f"  ... {len(r.nodes) - len(shown)} more (--top 0 shows all, --json has all)")
    return "\n".join(lines)


def _error_summary(r: SensitivityReport, rows: int) -> str:
    """The ``rows`` worst tensors of the fully quantized model, as a table."""
    if not rows or r.tensor_errors is None:
        return ""

    lines = [
        "",
        f"  per-tensor error of the fully quantized model vs fp32 ({r.tensor_error_samples} "
        "samples): SQNR of each tensor's int8",
        "  round trip alone, and propagated = its value in the int8 model (upstream errors "
        "included); worst first",
    ]
    table = [ERROR_HEADER] + error_rows(r.tensor_errors, rows)
    widths = [max(len(row[i]) for row in table) for i in range(len(ERROR_HEADER))]
    for row in table:
        cells = [c.rjust(w) if i >= 3 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  " + "  ".join(cells).rstrip())
    if len(r.tensor_errors) > rows:
        lines.append(f"  ... {len(r.tensor_errors) - rows} more (--json has all)")
    return "\n".join(lines)
