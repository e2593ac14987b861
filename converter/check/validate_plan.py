"""What one validation computes and checks, decided before any model runs: the numbers
given (the score limits through :class:`~converter.core.gates.ScoreLimits`, validate's own
baseline tolerance), the metrics chosen and the one ``max_drop`` reads, the output the gates
read, the baseline's scores; and, after scoring, the gates themselves."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converter.check.validate_report import TOOL, MetricValue
from converter.core.defaults import METRICS, SCORES
from converter.core.errors import BadInputError
from converter.core.gates import Gate, ScoreLimits, check_fraction
from converter.core.gates import fmt as _fmt

__all__ = [
    "NEEDS_REFERENCE",
    "Thresholds",
    "Plan",
    "check_counts",
    "gated_output",
    "read_baseline",
    "gates",
]

NEEDS_REFERENCE = ("agreement", "cosine", "max-abs", "mean-abs")


@dataclass(frozen=True)
class Thresholds:
    """The gates asked for: the score limits ``run`` and ``auto`` share, and validate's own
    ``baseline_tolerance`` (how much lower than the baseline a score may be). Checked when
    made: a value out of its range is exit 2, naming the flag."""

    limits: ScoreLimits
    baseline_tolerance: float

    def __post_init__(self) -> None:
        check_fraction(self.baseline_tolerance, "--baseline-tolerance", 0.0, 1.0)


def check_counts(batch_size, threads) -> None:
    """``--batch-size`` and ``--threads`` are whole numbers ≥ 1."""
    for flag, value in (("--batch-size", batch_size), ("--threads", threads)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise BadInputError(f"{flag} {value} is not a whole number ≥ 1", f"e.g. {flag} 1")


@dataclass
class Plan:
    """Which metrics are asked for (``chosen``), which are computed (chosen + what the
    gates need) and which metric ``max_drop`` reads."""

    chosen: list[str]
    computed: set[str]
    drop_metric: str | None

    @property
    def wants_labels(self) -> bool:
        return "accuracy" in self.computed

    @classmethod
    def make(cls, requested, has_labels: bool, has_reference: bool, limits: ScoreLimits) -> Plan:
        chosen = _choose_metrics(requested, has_labels, has_reference, limits.min_score)
        _check_gates_have_reference(has_reference, limits)
        computed = set(chosen) | ({"cosine"} if limits.min_worst is not None else set())
        drop = None
        if limits.max_drop is not None:
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


def _check_gates_have_reference(has_reference: bool, limits: ScoreLimits) -> None:
    if has_reference:
        return
    if limits.max_drop is not None:
        raise BadInputError(
            "--max-drop measures the drop from a reference model and none was given",
            "pass --reference REF.onnx (the model before conversion)",
        )
    if limits.min_worst is not None:
        raise BadInputError(
            "--min-worst reads the per-sample cosine to a reference and none was given",
            "pass --reference REF.onnx",
        )


def gated_output(outputs: list[str], wanted: str | None) -> str:
    if wanted is None:
        return outputs[0]
    if wanted not in outputs:
        raise BadInputError(
            f"--output {wanted!r} is not an output of the candidate",
            f"use one of {', '.join(outputs)}",
        )
    return wanted


def read_baseline(
    path, output: str, num_samples: int, plan: Plan, batch: Any = None
) -> dict[str, float]:
    """The scores of ``output`` in an earlier JSON report, checked to be comparable: on as
    many samples and, for a model whose outputs depend on the batch (``batch``, the
    validate's scoring batch, given for dynamic int8 only), at the same batch."""
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
    if batch is not None and doc.get("batch_size") not in (None, batch.size):
        raise BadInputError(
            f"baseline {path} was scored at batch {doc.get('batch_size')}, this run at batch "
            f"{batch.size}, and the model quantizes activations at run time (dynamic int8): "
            "its scores depend on the batch",
            f"pass --batch-size {doc.get('batch_size')}, or record a new baseline",
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


# ---------------------------------------------------------------- gates


def gates(res, ref_res, gated: str, plan: Plan, t: Thresholds, base) -> list[Gate]:
    """The gates of output ``gated``: the score limits (:meth:`ScoreLimits.gates`), then
    one per baseline score also computed now, in METRICS order."""
    cos = res.get("cosine")
    worst = (cos.worst, f"sample {cos.worst_sample}") if cos else (None, "")
    metric = plan.chosen[0] if plan.chosen else ""
    out = t.limits.gates(
        gated,
        score=(metric, _value(res, metric)),
        drop=_drop(res, ref_res, plan.drop_metric),
        worst=worst,
    )
    for metric, old in sorted((base or {}).items(), key=lambda kv: METRICS.index(kv[0])):
        if metric in res:
            detail = f"baseline {old:.6g} − tolerance {t.baseline_tolerance:g}"
            floor = old - t.baseline_tolerance
            out.append(
                Gate.check("baseline", metric, gated, ">=", floor, res[metric].value, detail)
            )
    return out


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
