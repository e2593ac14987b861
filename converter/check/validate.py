"""``onnxship validate``: score a candidate model on data — against the labels in the data,
against a reference model, or both — and check gates (the CI use).

One streaming pass per shard: each batch runs through the candidate (and the reference) and
the metrics accumulate per output, so one batch of outputs is in memory at a time. The shards
are scored by one pure function mapped over them by an executor (converter.core.executor: in this
process, or one Ray task per shard) and their sums are merged in shard order, so the numbers
do not depend on where the shards ran. Every number comes from :mod:`converter.core.metrics`. Gates
read one output: the first, or ``output=``.

A failed gate is not an exception here: :func:`validate` returns the report and
``report.passed`` says whether every gate held (a pipeline calling it many times needs the
numbers); the CLI turns a failure into exit 1.

The parts: :mod:`~converter.check.validate_report` (the report, its summary, JSON and JUnit),
:mod:`~converter.check.validate_plan` (the options, metrics, baseline and gates) and
:mod:`~converter.check.validate_score` (the scoring of the shards); this module runs them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from converter.check.kernel_truth import is_qdq
from converter.check.validate_kernels import KernelFigures, ReferenceCache, kernel_figures
from converter.check.validate_plan import (
    Plan,
    Thresholds,
    check_counts,
    gated_output,
    gates,
    read_baseline,
)
from converter.check.validate_report import MetricValue, ValidationReport
from converter.check.validate_score import Run, read_labels, score
from converter.core.data import Dataset, InputSpec, model_input_specs, open_data

# DEFAULT_BASELINE_TOLERANCE, one sample in 200: re-running the same model on another machine
# can flip a borderline argmax; a real regression moves more than that.
from converter.core.defaults import (
    DEFAULT_BASELINE_TOLERANCE,
    DEPLOYMENT_BATCH,
    METRICS,
    SCORES,
    VALIDATE_KERNEL_SAMPLES,
)
from converter.core.defaults import DEFAULT_VALIDATE_BATCH as DEFAULT_BATCH_SIZE
from converter.core.errors import BadInputError, DataError
from converter.core.executor import Executor, InProcess
from converter.core.gates import Gate, ScoreLimits
from converter.core.machine import warn_if_other_target
from converter.core.onnxio import load_model
from passes.int8_share import Int8Share, int8_share
from passes.quant_report import has_dynamic_quantization, is_quantized

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "validate",
    "semantics_figures",
    "ValidationReport",
    "Gate",
    "MetricValue",
    "METRICS",
    "SCORES",
    "DEFAULT_BATCH_SIZE",
    "DEPLOYMENT_BATCH",
    "SCORING_RULE",
    "DEFAULT_BASELINE_TOLERANCE",
]

SCORING_RULE = (
    f"dynamic int8 at batch {DEPLOYMENT_BATCH}, other models at batch {DEFAULT_BATCH_SIZE}"
)

logger = logging.getLogger(__name__)


def validate(
    candidate: str | os.PathLike,
    data: str | os.PathLike,
    reference: str | os.PathLike | None = None,
    metrics: Sequence[str] | None = None,
    min_score: float | None = None,
    max_drop: float | None = None,
    min_worst: float | None = None,
    baseline: str | os.PathLike | None = None,
    baseline_tolerance: float = DEFAULT_BASELINE_TOLERANCE,
    batch_size: int | None = None,
    output: str | None = None,
    threads: int = 1,
    progress: bool = True,
    executor: Executor | None = None,
    kernel_samples: int = VALIDATE_KERNEL_SAMPLES,
    references: ReferenceCache | None = None,
    warn_target: bool = True,
) -> ValidationReport:
    """Score ``candidate`` on ``data`` and check the gates that are given.

    metrics: any of METRICS; default accuracy when the data has labels, else cosine.
    min_score: the first metric's value must be ≥ this. max_drop: the accuracy (agreement
    when there are no labels, or when agreement comes first in ``metrics``) may fall at
    most this much below the reference's (agreement's drop is 1 − agreement). min_worst:
    the lowest per-sample cosine to the reference must be ≥ this. baseline: a JSON report
    of an earlier run; every score (accuracy, agreement, cosine) also computed now may be
    at most ``baseline_tolerance`` lower. Gates read ``output`` (default: the first).
    ``batch_size`` samples run at once; by default DEPLOYMENT_BATCH (1) when either model
    quantizes activations at run time (dynamic int8: its outputs depend on the batch), else
    DEFAULT_BATCH_SIZE; a model with a fixed batch dim runs at that. The report records it.
    ``threads`` = 1 keeps the numbers independent of the machine's core count.
    ``executor`` runs the scoring of the data's shards (default: in this process; a
    RayExecutor runs one Ray task per shard); the report is identical either way.
    Bad input raises BadInputError/DataError; failed gates only set ``report.passed``.
    A QDQ candidate is also scored both ways — optimizations off (its semantics) and on (the
    kernels that ship, what the gates read) — on its first ``kernel_samples`` samples (0:
    not), the reference's outputs on them kept in ``references`` when given
    (converter.check.validate_kernels); a quantized candidate's int8 share of multiply-adds
    is counted (passes.int8_share). ``warn_target`` False: no warning that the
    candidate was made for another CPU kind (a caller that warned once already: auto).
    """
    thresholds = Thresholds(ScoreLimits(min_score, max_drop, min_worst), baseline_tolerance)
    opened = _open(
        candidate, data, reference, metrics, thresholds.limits, batch_size, output, threads,
        warn_target,
    )  # fmt: skip
    cand_specs, outputs, ref_specs, dynamic, kind, dataset, batch, plan, gated, labels = opened
    base = None
    if baseline:
        base = read_baseline(baseline, gated, dataset.num_samples, plan, batch if dynamic else None)
    num_samples, scored = score(
        Run(candidate, reference, dataset, cand_specs, ref_specs, labels, plan, gated),
        batch.size,
        threads,
        executor or InProcess(),
        progress,
    )
    results = {name: scored[name].result() for name in outputs}
    ref_results = {name: scored[name].reference_result() for name in outputs}
    ref_results = {n: r for n, r in ref_results.items() if r}
    figures = None
    if kind.qdq and kernel_samples > 0:
        figures = kernel_figures(
            candidate, dataset, cand_specs, reference, ref_specs, labels, plan.chosen, gated,
            batch.size, threads, kernel_samples, cache=references,
        )  # fmt: skip
    report = ValidationReport(
        candidate=str(candidate),
        data=str(data),
        num_samples=num_samples,
        metrics=plan.chosen,
        output=gated,
        outputs=results,
        reference=None if reference is None else str(reference),
        reference_outputs=ref_results,
        gates=gates(results[gated], ref_results.get(gated, {}), gated, plan, thresholds, base),
        baseline=None if baseline is None else str(baseline),
        baseline_tolerance=baseline_tolerance if baseline is not None else None,
        batch_size=batch.size,
        threads=threads,
        dynamic_quantization=bool(dynamic),
        batch_reason=batch.reason,
        kernel_truth=figures,
        int8_macs=kind.share,
    )
    logger.debug("validated %s: %s", candidate, "passed" if report.passed else "FAILED")
    return report


def semantics_figures(
    candidate: str | os.PathLike,
    data: str | os.PathLike,
    reference: str | os.PathLike | None = None,
    metrics: Sequence[str] | None = None,
    batch_size: int | None = None,
    output: str | None = None,
    threads: int = 1,
    kernel_samples: int = VALIDATE_KERNEL_SAMPLES,
    references: ReferenceCache | None = None,
    warn_target: bool = True,
) -> KernelFigures | None:
    """What ``validate`` reports as ``kernel_truth`` — a QDQ candidate scored both ways on
    its first ``kernel_samples`` samples — without scoring the whole data set (a caller
    that has the score already: auto). None for a model that is not QDQ. The same inputs
    are checked as by ``validate``."""
    opened = _open(
        candidate, data, reference, metrics, ScoreLimits(None, None, None), batch_size, output,
        threads, warn_target,
    )  # fmt: skip
    if not (opened.kind.qdq and kernel_samples > 0):
        return None
    return kernel_figures(
        candidate, opened.dataset, opened.specs, reference, opened.ref_specs, opened.labels,
        opened.plan.chosen, opened.gated, opened.batch.size, threads, kernel_samples,
        cache=references,
    )  # fmt: skip


# ---------------------------------------------------------------- inputs


class _Opened(NamedTuple):
    specs: list[InputSpec]  # the candidate's, then what _load_interfaces says besides
    outputs: list[str]
    ref_specs: list | None
    dynamic: str
    kind: _Kind
    dataset: Dataset
    batch: _Batch
    plan: Plan
    gated: str
    labels: np.ndarray | None


def _open(
    candidate,
    data,
    reference,
    metrics,
    limits: ScoreLimits,
    batch_size,
    output,
    threads: int,
    warn_target: bool,
) -> _Opened:
    """The checked inputs of a scoring: interfaces, data, batch, metric plan, gated output,
    labels (bad input raises before any model runs)."""
    check_counts(DEFAULT_BATCH_SIZE if batch_size is None else batch_size, threads)
    loaded = _load_interfaces(candidate, reference, warn_target)
    cand_specs, outputs, ref_specs, dynamic, kind = loaded
    dataset = open_data(data, cand_specs)
    if kind.share is not None and kind.share.assumed:  # counted again at the data's size
        share = int8_share(load_model(candidate, what="candidate model"), dataset.sample_shapes())
        kind = kind._replace(share=share)
    batch = _scoring_batch(batch_size, dynamic, dataset, cand_specs)
    if ref_specs is not None:
        _check_reference_data(dataset, ref_specs, reference)
    plan = Plan.make(metrics, dataset.has_labels, reference is not None, limits)
    gated = gated_output(outputs, output)
    labels = read_labels(dataset) if plan.wants_labels else None
    return _Opened(
        cand_specs, outputs, ref_specs, dynamic, kind, dataset, batch, plan, gated, labels
    )


class _Kind(NamedTuple):
    qdq: bool  # QuantizeLinear/DequantizeLinear: scored both ways
    share: Int8Share | None  # of a quantized candidate


def _load_interfaces(
    candidate, reference, warn_target: bool = True
) -> tuple[list[InputSpec], list[str], list | None, str, _Kind]:
    """Input specs and output names of the candidate; input specs of the reference; which
    of the two quantizes activations at run time ("" when neither does); whether the
    candidate is QDQ, and its int8 share of multiply-adds when it is quantized."""

    model = load_model(candidate, what="candidate model")
    specs, outputs = model_input_specs(model), [o.name for o in model.graph.output]
    if warn_target:
        warn_if_other_target(model, candidate)
    dynamic = "candidate" if has_dynamic_quantization(model) else ""
    kind = _Kind(is_qdq(model), int8_share(model) if is_quantized(model) else None)
    del model
    if reference is None:
        return specs, outputs, None, dynamic, kind
    ref = load_model(reference, what="reference model")
    if not dynamic and has_dynamic_quantization(ref):
        dynamic = "reference"
    ref_outputs = [o.name for o in ref.graph.output]
    if len(ref_outputs) != len(outputs):
        raise BadInputError(
            f"candidate has outputs {outputs}, reference {ref_outputs}",
            "compare models with the same outputs (outputs are paired in order)",
        )
    if ref_outputs != outputs:
        logger.info(
            "outputs paired in order: %s", ", ".join(map("=".join, zip(outputs, ref_outputs)))
        )
    return specs, outputs, model_input_specs(ref), dynamic, kind


class _Batch(NamedTuple):
    size: int
    reason: str  # why this batch, for the report


def _scoring_batch(wanted: int | None, dynamic: str, dataset: Dataset, specs) -> _Batch:
    """The batch the samples are scored at, and why (see DEPLOYMENT_BATCH)."""
    default = DEPLOYMENT_BATCH if dynamic else DEFAULT_BATCH_SIZE
    size = dataset.batch_size_for(specs, default if wanted is None else wanted)
    if size != (default if wanted is None else wanted):
        return _Batch(size, f"the model's fixed batch dimension is {size}")
    if wanted is not None:
        reason = "set by --batch-size"
        if dynamic:
            reason += (
                f"; the {dynamic} quantizes activations at run time (dynamic int8), so these "
                f"scores hold at batch {size} only"
            )
        return _Batch(size, reason)
    if dynamic:
        return _Batch(
            size,
            f"the {dynamic} quantizes activations at run time (dynamic int8): its outputs "
            f"depend on the batch, so it is scored at the deployment batch, {size} (pass "
            "--batch-size to score another)",
        )
    return _Batch(size, "the default: outputs do not depend on the batch")


def _check_reference_data(dataset: Dataset, ref_specs: list[InputSpec], reference) -> None:
    try:
        dataset.check(ref_specs)
    except DataError as e:
        raise DataError(f"reference model {reference}: {e.what}", e.fix) from e
