"""auto's budget: what a candidate must reach (the score limits of
:class:`~converter.core.gates.ScoreLimits`, on one metric), and the checks of auto's options
made before any work."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from converter.core import defaults
from converter.core.errors import BadInputError
from converter.core.gates import Gate, ScoreLimits, fmt

__all__ = ["Budget", "check_options", "shown"]


@dataclass(frozen=True)
class Budget(ScoreLimits):
    """What a candidate must reach on the scoring data: ``metric`` ≥ ``min_score`` and at
    most ``max_drop`` below the fp32 reference's own score, worst-sample cosine ≥
    ``min_worst`` (the limits and their ranges: ScoreLimits)."""

    metric: str = field(kw_only=True)

    def threshold(self, reference_score: float) -> float:
        limits = [self.min_score] if self.min_score is not None else []
        if self.max_drop is not None:
            limits.append(reference_score - self.max_drop)
        return max(limits)

    def describe(self, reference_score: float) -> str:
        text = f"{self.metric} ≥ {shown(self.threshold(reference_score))}"
        return text + (f", worst cosine ≥ {self.min_worst:g}" if self.min_worst is not None else "")

    def candidate_gates(
        self, reference_score: float, score: float | None, worst: float | None
    ) -> list[Gate]:
        """This budget as the gates ``validate`` checks, for a candidate scoring ``score``
        with worst-sample cosine ``worst``."""
        drop = None if score is None else reference_score - score
        detail = f"reference {fmt(reference_score)}, candidate {fmt(score)}"
        return self.gates(
            "output",
            score=(self.metric, score),
            drop=(self.metric, drop, detail),
            worst=(worst, ""),
        )


def shown(limit: float) -> str:
    """A limit for people: 4 decimals, or as many as it has (``--min-score 0.99999`` is not
    "≥ 1.0000")."""
    four = f"{limit:.4f}"
    return four if abs(float(four) - limit) < 1e-12 else f"{limit:.10g}"


def check_options(
    metric: str,
    min_score: float | None,
    max_drop: float | None,
    min_worst: float | None,
    sparsity_grid: list[float] | None,
    time_budget: float | None = None,
    *,
    max_excluded: int = defaults.AUTO_MAX_EXCLUDED,
    bench_runs: int = defaults.AUTO_BENCH_RUNS,
    threads: int = 1,
    max_score_samples: int = 2000,
) -> Budget:
    """auto's options, checked before any work (exit 2 naming the flag); the budget."""
    if metric not in defaults.SCORES:
        raise BadInputError(
            f"unknown metric {metric!r}", f"use one of {', '.join(defaults.SCORES)}"
        )
    if min_score is None and max_drop is None:
        raise BadInputError("no budget given", "pass --min-score F and/or --max-drop F")
    budget = Budget(min_score, max_drop, min_worst, metric=metric)
    for s in sparsity_grid or []:
        if not 0.0 < s < 1.0:
            raise BadInputError(
                f"sparsity {s} in --sparsity-grid is outside (0, 1)", "e.g. --sparsity-grid 0.3,0.5"
            )
    grid = list(sparsity_grid or [])
    if len(set(grid)) != len(grid):
        raise BadInputError(f"--sparsity-grid {grid} repeats a value", "list each sparsity once")
    _check_count("--max-excluded", max_excluded, 0, "e.g. --max-excluded 8 (0: keep none in fp32)")
    _check_count("--bench-runs", bench_runs, 1, f"e.g. --bench-runs {defaults.AUTO_BENCH_RUNS}")
    _check_count("threads", threads, 1, "e.g. threads=1")
    _check_count("max_score_samples", max_score_samples, 2, "e.g. max_score_samples=2000")
    if time_budget is not None and not (math.isfinite(time_budget) and time_budget > 0):
        raise BadInputError(
            f"--time-budget {time_budget} is not a number of seconds > 0",
            "e.g. --time-budget 600, or leave it out for no limit",
        )
    return budget


def _check_count(flag: str, value: object, low: int, fix: str) -> None:
    """Refuse (exit 2, naming ``flag``) a value that is not a whole number ≥ ``low``."""
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
        raise BadInputError(f"{flag} {value} is not a whole number ≥ {low}", fix)
