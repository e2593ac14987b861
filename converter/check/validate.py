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
from converter.core.defaults import DEFAULT_BASELINE_TOLERANCE, METRICS, SCORES
from converter.core.defaults import DEFAULT_VALIDATE_BATCH as DEFAULT_BATCH_SIZE
from converter.core.errors import BadInputError, DataError
from converter.core.executor import Executor, InProcess
from converter.core.gates import Gate, ScoreLimits
from converter.core.machine import warn_if_other_target
from converter.core.onnxio import load_model

__all__ = [
    "validate",
    "ValidationReport",
    "Gate",
    "MetricValue",
    "METRICS",
    "SCORES",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_BASELINE_TOLERANCE",
]

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
    batch_size: int = DEFAULT_BATCH_SIZE,
    output: str | None = None,
    threads: int = 1,
    progress: bool = True,
    executor: Executor | None = None,
) -> ValidationReport:
    """Score ``candidate`` on ``data`` and check the gates that are given.

    metrics: any of METRICS; default accuracy when the data has labels, else cosine.
    min_score: the first metric's value must be ≥ this. max_drop: the accuracy (agreement
    when there are no labels, or when agreement comes first in ``metrics``) may fall at
    most this much below the reference's (agreement's drop is 1 − agreement). min_worst:
    the lowest per-sample cosine to the reference must be ≥ this. baseline: a JSON report
    of an earlier run; every score (accuracy, agreement, cosine) also computed now may be
    at most ``baseline_tolerance`` lower. Gates read ``output`` (default: the first).
    ``threads`` = 1 keeps the numbers independent of the machine's core count.
    ``executor`` runs the scoring of the data's shards (default: in this process; a
    RayExecutor runs one Ray task per shard); the report is identical either way.
    Bad input raises BadInputError/DataError; failed gates only set ``report.passed``.
    """
    thresholds = Thresholds(ScoreLimits(min_score, max_drop, min_worst), baseline_tolerance)
    check_counts(batch_size, threads)
    cand_specs, outputs, ref_specs = _load_interfaces(candidate, reference)
    dataset = open_data(data, cand_specs)
    if ref_specs is not None:
        _check_reference_data(dataset, ref_specs, reference)
    plan = Plan.make(metrics, dataset.has_labels, reference is not None, thresholds.limits)
    gated = gated_output(outputs, output)
    labels = read_labels(dataset) if plan.wants_labels else None
    base = read_baseline(baseline, gated, dataset.num_samples, plan) if baseline else None
    num_samples, scored = score(
        Run(candidate, reference, dataset, cand_specs, ref_specs, labels, plan, gated),
        dataset.batch_size_for(cand_specs, batch_size),
        threads,
        executor or InProcess(),
        progress,
    )
    results = {name: scored[name].result() for name in outputs}
    ref_results = {name: scored[name].reference_result() for name in outputs}
    ref_results = {n: r for n, r in ref_results.items() if r}
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
    )
    logger.debug("validated %s: %s", candidate, "passed" if report.passed else "FAILED")
    return report


# ---------------------------------------------------------------- inputs


def _load_interfaces(candidate, reference) -> tuple[list[InputSpec], list[str], list | None]:
    """Input specs and output names of the candidate; input specs of the reference."""

    model = load_model(candidate, what="candidate model")
    specs, outputs = model_input_specs(model), [o.name for o in model.graph.output]
    warn_if_other_target(model, candidate)
    if reference is None:
        return specs, outputs, None
    ref = load_model(reference, what="reference model")
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
    return specs, outputs, model_input_specs(ref)


def _check_reference_data(dataset: Dataset, ref_specs: list[InputSpec], reference) -> None:
    try:
        dataset.check(ref_specs)
    except DataError as e:
        raise DataError(f"reference model {reference}: {e.what}", e.fix) from e
