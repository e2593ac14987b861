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

The parts: :mod:`~converter.check.sensitivity_variants` (the model surgery: the fully
quantized model and each node's variant), :mod:`~converter.check.sensitivity_report` (the
report, its ranking and renderings); this module scores the variants and ranks them.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from converter.check.node_error import node_errors, sample_feeds
from converter.check.profile import unfused_dq_nodes, unfused_dq_share
from converter.check.sensitivity_report import Fidelity, NodeSensitivity, SensitivityReport
from converter.check.sensitivity_variants import Variants
from converter.core import defaults
from converter.core.data import model_input_specs, open_data

# DEFAULT_SENSITIVITY_SAMPLES, 64: the ranking of the 6-layer encoder benchmark matches 256
# samples' (Spearman 0.9996, same top 10; tests/benchmarks/bench_sensitivity.py --stability),
# the trained tiny_encoder's matches 450 samples' (static 0.998, same top 5; with 32 samples
# 0.986, 4 of 5).
from converter.core.defaults import DEFAULT_SENSITIVITY_BATCH as DEFAULT_BATCH_SIZE
from converter.core.defaults import DEFAULT_SENSITIVITY_SAMPLES as DEFAULT_SAMPLES
from converter.core.defaults import DEPLOYMENT_BATCH
from converter.core.defaults import SENSITIVITY_MODES as MODES
from converter.core.errors import BadInputError
from converter.core.executor import Executor, InProcess
from converter.core.onnxio import load_model
from converter.core.runtime import make_session, run_session
from passes.base import quiet_passes
from passes.pack import dense_model
from passes.quantize import CalibrationRanges, is_quantized, quantized_nodes

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

METRICS = ("cosine",)
# Settings sensitivity() sets itself (its own parameters), not through quant_settings.
_OWN_SETTINGS = ("calibration", "ranges", "per_channel", "progress")


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
    batch_size: int | None = None,
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
    the fully quantized model is measured on (0: not measured). ``batch_size``: samples
    per run; by default DEPLOYMENT_BATCH (1) in dynamic mode — its activation ranges are
    each run's, so a ranking at another batch ranks another model (validate scores dynamic
    int8 at 1 too) — and DEFAULT_BATCH_SIZE in static mode. The report records it.
    """
    if batch_size is None:
        batch_size = DEPLOYMENT_BATCH if mode == "dynamic" else DEFAULT_BATCH_SIZE
    _check_options(mode, metric, samples, batch_size, threads, tensor_errors)
    proto = _load(model)
    specs = model_input_specs(proto)
    dataset = open_data(data, specs)
    batch = dataset.batch_size_for(specs, batch_size)
    batches = dataset.batches(specs, batch, limit=samples, check_finite=True)
    scorer = _Scorer(proto, list(batches), _output_name(proto, output), threads)
    settings = {**_own_settings_absent(quant_settings), "per_channel": bool(per_channel)}
    calib = data if calib is None else calib
    variants = Variants.for_mode(mode, proto, calib, settings, progress)
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
        batch_size=batch,
    )
    if mode == "static":
        _profile_full(report, variants.full.model, scorer, threads)
    if tensor_errors:
        _tensor_errors(report, variants, data, tensor_errors, threads)
    logger.info(
        "sensitivity (%s): %d nodes scored on %d samples (batch %d) in %.1f s; most sensitive %s",
        mode,
        len(entries),
        scorer.samples,
        batch,
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
    report: SensitivityReport, variants: Variants, data, samples: int, threads: int
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


class _Scorer:
    """The scoring batches (in memory) and the fp32 reference output, computed once."""

    def __init__(self, model: onnx.ModelProto, feeds: list, output: str, threads: int) -> None:
        self.feeds = feeds
        self.output = output
        self.threads = threads
        self.samples = sum(len(next(iter(f.values()))) for f in feeds)
        self.reference = self.outputs(model, "the fp32 model", built=False)

    def outputs(self, model: onnx.ModelProto, what: str, built: bool = True) -> np.ndarray:
        """``model``'s outputs on the scoring batches; ``built``: a variant sensitivity made
        (onnxruntime refusing it is a bug of ours), not the model given."""
        session = make_session(model.SerializeToString(), threads=self.threads, built=built)
        index = [o.name for o in session.get_outputs()].index(self.output)
        return np.concatenate([run_session(session, f, what)[index] for f in self.feeds])

    def fidelity(self, model: onnx.ModelProto, what: str) -> Fidelity:
        return Fidelity.of(self.outputs(model, what), self.reference)


@dataclass(frozen=True)
class _NodeJob:
    """What scoring every node shares (put into Ray's object store once)."""

    variants: Variants
    scorer: _Scorer
    gain: bool


def _score_nodes(
    variants: Variants,
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
