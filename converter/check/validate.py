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
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from converter.core import __version__, defaults
from converter.core import metrics as M
from converter.core.data import Dataset, InputSpec, model_input_specs, open_data
from converter.core.errors import BadInputError, DataError, OnnxshipError
from converter.core.executor import Executor, InProcess
from converter.core.gates import Gate, Gated, gate_lines, junit_xml, score_gates
from converter.core.gates import fmt as _fmt
from converter.core.gates import json_number as _num
from converter.core.machine import warn_if_other_target
from converter.core.onnxio import load_model
from converter.core.runtime import cached_session, run_session

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

METRICS = defaults.METRICS
SCORES = defaults.SCORES
NEEDS_REFERENCE = ("agreement", "cosine", "max-abs", "mean-abs")
DEFAULT_BATCH_SIZE = defaults.DEFAULT_VALIDATE_BATCH
# One sample in 200: re-running the same model on another machine can flip a borderline
# argmax; a real regression moves more than that.
DEFAULT_BASELINE_TOLERANCE = defaults.DEFAULT_BASELINE_TOLERANCE
TOOL = "onnxship validate"


@dataclass(frozen=True)
class MetricValue:
    """One metric of one output. ``value`` is the mean over samples (the max for max-abs);
    cosine also has its lowest per-sample value and that sample's index."""

    value: float
    worst: float | None = None
    worst_sample: int | None = None

    def to_dict(self) -> dict:
        out: dict = {"value": _num(self.value)}
        if self.worst is not None:
            out["worst"] = _num(self.worst)
            out["worst_sample"] = self.worst_sample
        return out


@dataclass
class ValidationReport(Gated):
    """Every number of one validation. ``outputs[name][metric]`` for the candidate,
    ``reference_outputs[name]["accuracy"]`` for the reference (when it has labels to score)."""

    candidate: str
    data: str
    num_samples: int
    metrics: list[str]
    output: str  # the output the gates read
    outputs: dict[str, dict[str, MetricValue]]
    reference: str | None = None
    reference_outputs: dict[str, dict[str, MetricValue]] = field(default_factory=dict)
    gates: list[Gate] = field(default_factory=list)
    baseline: str | None = None
    baseline_tolerance: float | None = None

    def to_dict(self) -> dict:
        return {
            "tool": TOOL,
            "version": __version__,
            "candidate": self.candidate,
            "reference": self.reference,
            "data": self.data,
            "num_samples": self.num_samples,
            "metrics": self.metrics,
            "output": self.output,
            "passed": self.passed,
            "outputs": _metrics_dict(self.outputs),
            "reference_outputs": _metrics_dict(self.reference_outputs),
            "gates": [g.to_dict() for g in self.gates],
            "baseline": self.baseline,
            "baseline_tolerance": self.baseline_tolerance,
        }

    def to_json(self) -> str:
        """Deterministic: same model, data and options give the same bytes."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    def to_junit(self) -> str:
        """JUnit XML: one testcase per gate, every number as a suite property."""
        return _junit(self)

    def summary(self) -> str:
        return _summary(self)


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
    _check_numbers(min_score, max_drop, min_worst, baseline_tolerance, batch_size, threads)
    cand_specs, outputs, ref_specs = _load_interfaces(candidate, reference)
    dataset = open_data(data, cand_specs)
    if ref_specs is not None:
        _check_reference_data(dataset, ref_specs, reference)
    thresholds = _Thresholds(min_score, max_drop, min_worst, baseline_tolerance)
    plan = _Plan.make(metrics, dataset.has_labels, reference is not None, thresholds)
    gated = _gated_output(outputs, output)
    labels = _labels(dataset) if plan.wants_labels else None
    base = _read_baseline(baseline, gated, dataset.num_samples, plan) if baseline else None
    num_samples, scored = _score(
        _Run(candidate, reference, dataset, cand_specs, ref_specs, labels, plan, gated),
        dataset.batch_size_for(cand_specs, batch_size),
        threads,
        executor or InProcess(),
        progress,
    )
    results = {name: scored[name].result() for name in outputs}
    ref_results = {name: scored[name].reference_result() for name in outputs}
    ref_results = {n: r for n, r in ref_results.items() if r}
    gates = _gates(results[gated], ref_results.get(gated, {}), gated, plan, thresholds, base)
    report = ValidationReport(
        candidate=str(candidate),
        data=str(data),
        num_samples=num_samples,
        metrics=plan.chosen,
        output=gated,
        outputs=results,
        reference=None if reference is None else str(reference),
        reference_outputs=ref_results,
        gates=gates,
        baseline=None if baseline is None else str(baseline),
        baseline_tolerance=baseline_tolerance if baseline is not None else None,
    )
    logger.debug("validated %s: %s", candidate, "passed" if report.passed else "FAILED")
    return report


# ---------------------------------------------------------------- options and inputs


def _check_numbers(min_score, max_drop, min_worst, tolerance, batch_size, threads) -> None:
    ranges = {
        "--min-score": (min_score, -1.0, 1.0),
        "--max-drop": (max_drop, 0.0, 1.0),
        "--min-worst": (min_worst, -1.0, 1.0),
        "--baseline-tolerance": (tolerance, 0.0, 1.0),
    }
    for flag, (value, low, high) in ranges.items():
        if value is None:
            continue
        if not isinstance(value, (int, float)) or not low <= value <= high:
            raise BadInputError(
                f"{flag} {value} is outside [{low:g}, {high:g}]",
                "scores and drops are fractions, e.g. 0.9 for 90 %",
            )
    for flag, value in (("--batch-size", batch_size), ("--threads", threads)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise BadInputError(f"{flag} {value} is not a whole number ≥ 1", f"e.g. {flag} 1")


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


@dataclass
class _Plan:
    """Which metrics are asked for (``chosen``), which are computed (chosen + what the
    gates need) and which metric ``max_drop`` reads."""

    chosen: list[str]
    computed: set[str]
    drop_metric: str | None

    @property
    def wants_labels(self) -> bool:
        return "accuracy" in self.computed

    @classmethod
    def make(cls, requested, has_labels: bool, has_reference: bool, gates: _Thresholds) -> _Plan:
        chosen = _choose_metrics(requested, has_labels, has_reference, gates.min_score)
        _check_gates_have_reference(has_reference, gates)
        computed = set(chosen) | ({"cosine"} if gates.min_worst is not None else set())
        drop = None
        if gates.max_drop is not None:
            firsts = [m for m in chosen if m in ("accuracy", "agreement")]
            drop = firsts[0] if firsts else "accuracy" if has_labels else "agreement"
            computed.add(drop)
        return cls(chosen, computed, drop)


def _choose_metrics(requested, has_labels: bool, has_reference: bool, min_score) -> list[str]:
    chosen = list(dict.fromkeys(requested or ["accuracy" if has_labels else "cosine"]))
    unknown = [m for m in chosen if m not in METRICS]
    if unknown:
        raise BadInputError(f"unknown metric {unknown[0]!r}", f"use one of {', '.join(METRICS)}")
    if not has_labels and not has_reference:
        raise BadInputError(
            "nothing to compare with: the data has no `labels` and no reference was given",
            "add a `labels` array to the data, or pass --reference REF.onnx",
        )
    if "accuracy" in chosen and not has_labels:
        raise BadInputError(
            "metric accuracy needs labels and the data has no `labels` array",
            "save the labels in the data as `labels`, or use --metric cosine/agreement "
            "with --reference",
        )
    need_ref = [m for m in chosen if m in NEEDS_REFERENCE]
    if need_ref and not has_reference:
        raise BadInputError(
            f"metric {need_ref[0]} compares with a reference model and none was given",
            "pass --reference REF.onnx (e.g. the fp32 model), or use --metric accuracy",
        )
    if min_score is not None and chosen[0] not in SCORES:
        raise BadInputError(
            f"--min-score reads the first metric, and {chosen[0]} is an error (lower is "
            "better), not a score",
            "put a score first: --metric accuracy, agreement or cosine",
        )
    return chosen


def _check_gates_have_reference(has_reference: bool, gates: _Thresholds) -> None:
    if has_reference:
        return
    if gates.max_drop is not None:
        raise BadInputError(
            "--max-drop measures the drop from a reference model and none was given",
            "pass --reference REF.onnx (the model before conversion)",
        )
    if gates.min_worst is not None:
        raise BadInputError(
            "--min-worst reads the per-sample cosine to a reference and none was given",
            "pass --reference REF.onnx",
        )


def _gated_output(outputs: list[str], wanted: str | None) -> str:
    if wanted is None:
        return outputs[0]
    if wanted not in outputs:
        raise BadInputError(
            f"--output {wanted!r} is not an output of the candidate",
            f"use one of {', '.join(outputs)}",
        )
    return wanted


def _labels(dataset: Dataset) -> np.ndarray:
    """The labels as int64, or a DataError saying what is wrong with them."""
    labels = dataset.labels()
    where = f"data {dataset.path}: labels"
    fix = "save integer class indices, one per sample, as `labels`"
    if labels.dtype.kind == "f":
        if not np.isfinite(labels).all() or (labels != np.round(labels)).any():
            raise DataError(f"{where} are {labels.dtype.name} with non-integer values", fix)
    elif labels.dtype.kind not in "iub":
        raise DataError(f"{where} have dtype {labels.dtype}", fix)
    labels = labels.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise DataError(f"{where} hold negative values (lowest {labels.min()})", fix)
    return labels


def _read_baseline(path, output: str, num_samples: int, plan: _Plan) -> dict[str, float]:
    """The scores of ``output`` in an earlier JSON report, checked to be comparable."""
    path = Path(path)
    fix = "pass a file written by `onnxship validate --json` on the same data"
    if not path.is_file():
        raise BadInputError(f"baseline {path} does not exist", fix)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInputError(f"baseline {path} is not JSON ({e})", fix) from e
    if not isinstance(doc, dict) or doc.get("tool") != TOOL:
        raise BadInputError(f"baseline {path} is not a report of onnxship validate", fix)
    scores = (doc.get("outputs") or {}).get(output)
    if not isinstance(scores, dict):
        raise BadInputError(f"baseline {path} has no scores for output {output!r}", fix)
    if doc.get("num_samples") != num_samples:
        raise BadInputError(
            f"baseline {path} was measured on {doc.get('num_samples')} samples, this data "
            f"has {num_samples}",
            fix,
        )
    values = {
        m: float(v["value"])
        for m, v in scores.items()
        if m in SCORES and isinstance(v, dict) and isinstance(v.get("value"), (int, float))
    }
    if not values.keys() & plan.computed:
        raise BadInputError(
            f"baseline {path} has scores {sorted(values)}, this run computes "
            f"{sorted(plan.computed)}: nothing to compare",
            "ask for a metric the baseline has, e.g. --metric " + (sorted(values) or ["cosine"])[0],
        )
    return values


# ---------------------------------------------------------------- scoring


class _Running:
    """The metric sums of one output over the batches seen so far: exact hit counts for
    accuracy/agreement, per-sample cosines, per-batch max and size-weighted mean abs error.
    Shards are scored into one each and :meth:`merged` in shard order: counts add exactly,
    lists concatenate, so the result is the same however the shards were run."""

    def __init__(self) -> None:
        self.hits: dict[str, list[int]] = {}  # metric -> [hits, positions]
        self.cosines: list[np.ndarray] = []
        self.max_abs: list[float] = []
        self.abs_terms: list[float] = []  # per batch: mean abs error × elements
        self.abs_size = 0

    @classmethod
    def merged(cls, parts: Sequence[_Running]) -> _Running:
        out = cls()
        for part in parts:
            for key, (hits, n) in part.hits.items():
                entry = out.hits.setdefault(key, [0, 0])
                entry[0], entry[1] = entry[0] + hits, entry[1] + n
            out.cosines += part.cosines
            out.max_abs += part.max_abs
            out.abs_terms += part.abs_terms
            out.abs_size += part.abs_size
        return out

    def count(self, key: str, hits: np.ndarray) -> None:
        entry = self.hits.setdefault(key, [0, 0])
        entry[0] += int(np.count_nonzero(hits))
        entry[1] += int(hits.size)

    def add_reference(self, cand: np.ndarray, ref: np.ndarray, computed: set[str]) -> None:
        if "agreement" in computed and cand.ndim >= 2:
            self.count("agreement", M.agrees(cand, ref))
        if "cosine" in computed:
            self.cosines.append(M.per_sample_cosine(cand, ref))
        if "max-abs" in computed:
            self.max_abs.append(M.max_abs_error(cand, ref))
        if "mean-abs" in computed:
            self.abs_terms.append(M.mean_abs_error(cand, ref) * cand.size)
            self.abs_size += cand.size

    def result(self) -> dict[str, MetricValue]:
        out = {k: MetricValue(h / n) for k, (h, n) in self.hits.items() if n and "/" not in k}
        if self.cosines:
            cos = np.concatenate(self.cosines)
            worst = int(np.argmin(cos))
            out["cosine"] = MetricValue(float(cos.mean()), float(cos[worst]), worst)
        if self.max_abs:
            out["max-abs"] = MetricValue(float(np.max(self.max_abs)))
        if self.abs_size:
            out["mean-abs"] = MetricValue(math.fsum(self.abs_terms) / self.abs_size)
        return {m: out[m] for m in METRICS if m in out}

    def reference_result(self) -> dict[str, MetricValue]:
        hits, n = self.hits.get("reference/accuracy", (0, 0))
        return {"accuracy": MetricValue(hits / n)} if n else {}


@dataclass
class _Run:
    """What one scoring pass needs."""

    candidate: str | os.PathLike
    reference: str | os.PathLike | None
    dataset: Dataset
    specs: list[InputSpec]
    ref_specs: list[InputSpec] | None
    labels: np.ndarray | None
    plan: _Plan
    gated: str

    @functools.cached_property
    def label_max(self) -> int:
        return int(self.labels.max()) if self.labels is not None and self.labels.size else -1


@dataclass(frozen=True)
class _Model:
    """A model as the bytes that travel to the workers, with their digest (the key of the
    worker's session cache) and its path (for messages)."""

    path: str
    data: bytes
    key: str

    @classmethod
    def read(cls, path: str | os.PathLike) -> _Model:
        data = Path(path).read_bytes()
        return cls(str(path), data, hashlib.sha256(data).hexdigest())


@dataclass(frozen=True)
class _ShardJob:
    """What the scoring of every shard shares (put into Ray's object store once)."""

    data: str
    candidate: _Model
    reference: _Model | None
    specs: list[InputSpec]
    ref_specs: list[InputSpec] | None
    computed: frozenset[str]
    gated: str
    label_max: int
    batch_size: int
    threads: int


@dataclass(frozen=True)
class _Shard:
    """One .npz shard: its place in the data and its slice of the labels."""

    index: int
    path: Path
    start: int  # the index of its first sample in the whole data
    size: int
    labels: np.ndarray | None

    def describe(self, data: str) -> str:
        last = self.start + self.size - 1
        return f"shard {self.path.name} (samples {self.start}–{last} of {data})"


@dataclass
class _ShardScore:
    index: int
    samples: int
    running: dict[str, _Running]


def _score(
    run: _Run, batch_size: int, threads: int, executor: Executor, progress: bool
) -> tuple[int, dict[str, _Running]]:
    """Score every shard (a map of :func:`_score_shard`), merged in shard order: (the number
    of samples scored, the sums per output)."""
    job = _ShardJob(
        data=str(run.dataset.path),
        candidate=_Model.read(run.candidate),
        reference=None if run.reference is None else _Model.read(run.reference),
        specs=run.specs,
        ref_specs=run.ref_specs,
        computed=frozenset(run.plan.computed),
        gated=run.gated,
        label_max=run.label_max,
        batch_size=batch_size,
        threads=threads,
    )
    shards, start = [], 0
    for i, (path, size) in enumerate(zip(run.dataset.shards, run.dataset.shard_sizes)):
        labels = None if run.labels is None else run.labels[start : start + size]
        shards.append(_Shard(i, path, start, size, labels))
        start += size
    scores = executor.map(
        _score_shard, shards, shared=job, desc="validate", unit="shard", progress=progress
    )
    return _merge(scores, run.dataset)


def _merge(scores: list[_ShardScore], dataset: Dataset) -> tuple[int, dict[str, _Running]]:
    """The shards' sums in shard order, after checking each shard was scored once, whole."""
    indices, counts = [s.index for s in scores], [s.samples for s in scores]
    if indices != list(range(len(dataset.shards))) or counts != dataset.shard_sizes:
        raise OnnxshipError(
            f"scored shards {indices} with {counts} samples, the data {dataset.path} has "
            f"{dataset.shard_sizes}",
            "run again; the data must not change while it is validated",
        )
    names = list(scores[0].running)
    return sum(counts), {n: _Running.merged([s.running[n] for s in scores]) for n in names}


def _score_shard(job: _ShardJob, shard: _Shard) -> _ShardScore:
    """Score one shard: pure, so it may run anywhere (a Ray worker) and run again."""
    cand = cached_session(job.candidate.key, job.candidate.data, job.threads)
    ref = None
    if job.reference is not None:
        ref = cached_session(job.reference.key, job.reference.data, job.threads)
    names = [o.name for o in cand.get_outputs()]
    running = {name: _Running() for name in names}
    ref_dtypes = {s.name: s.dtype for s in job.ref_specs or []}
    done = 0
    for feed in _shard_batches(job, shard):
        n = len(next(iter(feed.values())))
        start = shard.start + done
        outs = run_session(cand, feed, what=f"{job.candidate.path} (samples {start}–{start + n})")
        ref_outs = None
        if ref is not None:
            ref_feed = {
                k: a.astype(ref_dtypes.get(k, a.dtype), copy=False) for k, a in feed.items()
            }
            ref_outs = run_session(ref, ref_feed, what=f"reference {job.reference.path}")
        labels = None if shard.labels is None else shard.labels[done : done + n]
        _accumulate(running, names, outs, ref_outs, labels, job, first=start == 0)
        done += n
    return _ShardScore(shard.index, done, running)


def _shard_batches(job: _ShardJob, shard: _Shard) -> Iterator[dict[str, np.ndarray]]:
    """The shard's batches; anything wrong with its data is a DataError naming the shard."""
    try:
        data = Dataset(shard.path)
        yield from data.batches(job.specs, job.batch_size, check_finite=True)
    except DataError as e:
        raise DataError(f"{shard.describe(job.data)}: {e.what}", e.fix) from e
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(
            f"{shard.describe(job.data)} cannot be read ({str(e)[:200]})",
            "write it again with numpy.savez(path, **arrays)",
        ) from e


def _accumulate(running, names, outs, ref_outs, labels, job: _ShardJob, first: bool) -> None:
    for i, name in enumerate(names):
        cand = np.asarray(outs[i])
        if labels is not None and _labels_fit(cand, labels, job.label_max, name, job.gated, first):
            running[name].count("accuracy", M.correct(cand, labels))
            if ref_outs is not None:
                running[name].count("reference/accuracy", M.correct(ref_outs[i], labels))
        if ref_outs is not None:
            ref = np.asarray(ref_outs[i])
            if cand.shape != ref.shape:
                raise BadInputError(
                    f"output {name} has shape {cand.shape} in the candidate and {ref.shape} in "
                    "the reference",
                    "compare models whose outputs have the same shapes",
                )
            running[name].add_reference(cand, ref, job.computed)


def _labels_fit(
    out: np.ndarray, labels: np.ndarray, label_max: int, name: str, gated: str, first: bool
) -> bool:
    """Whether accuracy applies to this output (class scores on the last axis, one label per
    position, every label of the data below the class count); for the gated output a misfit
    is a DataError. The same answer for every batch: it depends on shapes and ``label_max``."""
    fits = out.ndim >= 2 and labels.shape[1:] == out.shape[1:-1]
    if not fits:
        if name == gated:
            raise DataError(
                f"labels have shape {labels.shape[1:]} per sample but output {name} has "
                f"{out.shape[1:]}: accuracy needs class scores on its last axis",
                "pick an output of class scores with --output, or fix the labels",
            )
        if first:
            logger.info("no accuracy for output %s: its shape does not fit the labels", name)
        return False
    if label_max >= out.shape[-1]:
        if name != gated:
            return False
        raise DataError(
            f"labels go up to {label_max}, but output {name} has {out.shape[-1]} classes",
            "labels are class indices 0..classes-1; check the data matches the model",
        )
    return True


# ---------------------------------------------------------------- gates


@dataclass(frozen=True)
class _Thresholds:
    min_score: float | None
    max_drop: float | None
    min_worst: float | None
    baseline_tolerance: float


def _gates(res, ref_res, gated, plan: _Plan, t: _Thresholds, base) -> list[Gate]:
    cos = res.get("cosine")
    worst = (cos.worst, f"sample {cos.worst_sample}") if cos else (None, "")
    metric = plan.chosen[0] if plan.chosen else ""
    gates = score_gates(
        gated,
        t.min_score,
        t.max_drop,
        t.min_worst,
        score=(metric, _value(res, metric)),
        drop=_drop(res, ref_res, plan.drop_metric),
        worst=worst,
    )
    for metric, old in sorted((base or {}).items(), key=lambda kv: METRICS.index(kv[0])):
        if metric in res:
            detail = f"baseline {old:.6g} − tolerance {t.baseline_tolerance:g}"
            floor = old - t.baseline_tolerance
            gates.append(
                Gate.check("baseline", metric, gated, ">=", floor, res[metric].value, detail)
            )
    return gates


def _drop(res, ref_res, metric: str) -> tuple[str, float | None, str]:
    """How far the candidate falls below the reference: accuracy difference, or (without
    labels) 1 − agreement."""
    if metric == "agreement":
        agreement = _value(res, "agreement")
        drop = None if agreement is None else 1.0 - agreement
        return metric, drop, "1 − agreement with the reference"
    cand, ref = _value(res, "accuracy"), _value(ref_res, "accuracy")
    drop = None if cand is None or ref is None else ref - cand
    return metric, drop, f"reference {_fmt(ref)}, candidate {_fmt(cand)}"


def _value(results: dict[str, MetricValue], metric: str) -> float | None:
    return results[metric].value if metric in results else None


# ---------------------------------------------------------------- rendering


def _metrics_dict(results: dict[str, dict[str, MetricValue]]) -> dict:
    return {out: {m: v.to_dict() for m, v in values.items()} for out, values in results.items()}


def _summary(r: ValidationReport) -> str:
    against = f" vs reference {r.reference}" if r.reference else ""
    lines = [f"validate {r.candidate}{against} on {r.data} ({r.num_samples} samples)"]
    rows = [("output", "metric", "value", "worst (sample)", "reference")]
    for out, values in r.outputs.items():
        for metric, v in values.items():
            worst = "" if v.worst is None else f"{_fmt(v.worst)} ({v.worst_sample})"
            ref = r.reference_outputs.get(out, {}).get(metric)
            rows.append((out, metric, _fmt(v.value), worst, "" if ref is None else _fmt(ref.value)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    if not r.gates:
        lines.append("no gates (use --min-score, --max-drop, --min-worst or --baseline)")
        return "\n".join(lines)
    lines.append(f"gates on output {r.output}:")
    lines += gate_lines(r.gates)
    return "\n".join(lines)


def _junit(r: ValidationReport) -> str:
    return junit_xml(TOOL, r.candidate, r.gates, _properties(r), r.summary(), reads="output")


def _properties(r: ValidationReport) -> list[tuple[str, str]]:
    props = [("candidate", r.candidate), ("data", r.data), ("num_samples", str(r.num_samples))]
    if r.reference:
        props.append(("reference", r.reference))
    for prefix, results in (("", r.outputs), ("reference.", r.reference_outputs)):
        for out, values in results.items():
            for metric, v in values.items():
                props.append((f"{prefix}{out}.{metric}", repr(v.value)))
                if v.worst is not None:
                    props.append((f"{prefix}{out}.{metric}.worst", repr(v.worst)))
    for g in r.gates:
        props.append((f"gate.{g.name}.{g.metric.replace(' ', '_')}", repr(g.value)))
    return props
