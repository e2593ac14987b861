"""auto's cheap first scoring (issue #22): every candidate is scored first on ``SAMPLES``
evenly spaced samples of the scoring set (data is often ordered by class or by photo), and
on the other samples only when it can still meet the budget.

The subset *proves* a miss when its worst-sample cosine is below ``--min-worst`` (the whole
set's worst can only be lower), or when the metric's mean could not reach the threshold even
if every other sample scored the metric's highest value (``SCORE_MAX``). A candidate so
decided keeps its subset numbers (``Candidate.subset``), never presented as a whole-set
score; a decision that reads the score of a candidate that misses (the every-op probe, the
fallback's parent, the closest candidate on a miss) completes it first: the other samples
are scored and the two parts combined — the mean weighted by the counts, the worst the lower
— which is the whole-set score (static int8 and fp32 outputs do not depend on the batch;
dynamic int8 is scored at batch 1 either way). So every decision is the one a whole-set
scoring makes, a candidate that can meet costs what it did, and only candidates no decision
needs are left at the subset.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from converter.core.data import Dataset, InputSpec
from converter.core.onnxio import atomic_path
from converter.search.budget import shown

__all__ = ["SAMPLES", "ScoreParts", "split_scoring", "stratified", "proven_miss", "combine"]

# Samples a candidate is scored on first. 32: a miss by several hundredths of cosine (every-op
# Q/DQ on an encoder, dynamic int8 of a CNN) shows on any 32 evenly spaced samples, and the
# scoring set is split only when it holds at least twice as many (else the saving is small).
SAMPLES = 32

# The highest per-sample value of each higher-is-better metric (cosine is clipped to
# [-1, 1]); the mean bound applies only to these.
SCORE_MAX = {"accuracy": 1.0, "agreement": 1.0, "cosine": 1.0}

# A bound must clear the budget by this much to prove a miss: the whole-set mean is computed
# in floating point (summed in another order), and the budget's drop gate subtracts.
_MARGIN = 1e-9


@dataclass(frozen=True)
class ScoreParts:
    """The scoring set cut in two: ``first`` (``samples`` evenly spaced samples, one .npz)
    and ``rest`` (the other ``total - samples``, a folder of .npz shards in order)."""

    first: Path
    rest: Path
    samples: int
    total: int


def stratified(total: int, samples: int) -> np.ndarray:
    """``samples`` evenly spaced indices of ``total``: the middle of each of ``samples``
    equal slices (distinct when ``total`` ≥ ``samples``)."""
    return (2 * np.arange(samples) + 1) * total // (2 * samples)


def split_scoring(
    dataset: Dataset, specs: Sequence[InputSpec], folder: Path, samples: int | None = None
) -> ScoreParts | None:
    """``dataset`` cut into its stratified subset of ``samples`` (default SAMPLES) and the
    rest, written to ``folder`` (``subset.npz`` and ``rest/``, labels kept), streaming one
    batch at a time; None (score the whole set at once) when it holds fewer than twice
    ``samples``."""
    samples = SAMPLES if samples is None else samples
    total = dataset.num_samples
    if samples < 1 or total < 2 * samples:
        return None
    chosen = np.zeros(total, dtype=bool)
    chosen[stratified(total, samples)] = True
    folder.mkdir(parents=True, exist_ok=True)
    rest = folder / "rest"
    shutil.rmtree(rest, ignore_errors=True)  # an earlier run's shards
    rest.mkdir()
    first: dict[str, list[np.ndarray]] = {}
    offset = 0
    for i, feed in enumerate(dataset.batches(specs, 256, with_labels=True)):
        n = len(next(iter(feed.values())))
        picked = chosen[offset : offset + n]
        offset += n
        for name, array in feed.items():
            first.setdefault(name, []).append(array[picked])
        if not picked.all():
            _write(rest / f"{i:06d}.npz", {k: a[~picked] for k, a in feed.items()})
    path = _write(folder / "subset.npz", {k: np.concatenate(v) for k, v in first.items()})
    return ScoreParts(path, rest, samples, total)


def _write(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return path


def proven_miss(
    parts: ScoreParts,
    metric: str,
    threshold: float,
    min_worst: float | None,
    score: float,
    worst: float,
) -> str:
    """Why a candidate scoring ``score`` (mean ``metric``) and ``worst`` (worst-sample cosine)
    on ``parts.first`` misses the budget whatever the other samples score ("" when the
    subset cannot tell)."""
    if min_worst is not None and worst < min_worst - _MARGIN:
        return f"worst cosine {worst:.4f} < {min_worst:g}"
    top = SCORE_MAX.get(metric)
    if top is None:
        return ""
    bound = (parts.samples * score + (parts.total - parts.samples) * top) / parts.total
    if bound < threshold - _MARGIN:
        return f"{metric} at most {bound:.4f} < {shown(threshold)}"
    return ""


def combine(parts: ScoreParts, first: dict[str, Any], rest: dict[str, Any]) -> dict[str, float]:
    """The whole set's score, cosine and worst from those of its two parts: the means
    weighted by the parts' sample counts, the worst the lower."""
    n_first, n_rest = parts.samples, parts.total - parts.samples
    mean = {k: (n_first * first[k] + n_rest * rest[k]) / parts.total for k in ("score", "cosine")}
    return {**mean, "worst": min(first["worst"], rest["worst"])}
