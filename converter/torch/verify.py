"""Compare ONNX outputs with reference outputs: names, then shapes, then values.

Every failing output is collected and reported with its max-abs-diff and the tolerance used;
the caller decides once, after all outputs were checked (as optimum's exporter does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["OutputCheck", "Comparison", "compare_outputs"]


@dataclass
class OutputCheck:
    name: str
    shape: tuple[int, ...]
    max_abs: float = 0.0
    max_rel: float = 0.0
    # max over elements of |got − want| / (atol + rtol·|want|): the rule holds while ≤ 1
    worst_ratio: float = 0.0
    problem: str = ""

    @property
    def ok(self) -> bool:
        return not self.problem


@dataclass
class Comparison:
    """The result of comparing one input's outputs; ``label`` says which input."""

    label: str
    atol: float
    rtol: float
    outputs: list[OutputCheck] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and all(o.ok for o in self.outputs)

    def failures(self) -> list[str]:
        bad = [f"{o.name}: {o.problem}" for o in self.outputs if not o.ok]
        return [f"{self.label}: {p}" for p in self.problems + bad]


def _diffs(got: np.ndarray, want: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Max abs diff, max rel diff and the mask of elements outside tolerance (NaN == NaN)."""
    both_nan = np.isnan(got) & np.isnan(want) if got.dtype.kind == "f" else None
    g, w = got.astype(np.float64), want.astype(np.float64)
    diff = np.abs(g - w)
    if both_nan is not None:
        diff[both_nan] = 0.0
    rel = diff / np.maximum(np.abs(w), 1e-12)
    if both_nan is not None:
        rel[both_nan] = 0.0
    return float(np.nanmax(diff, initial=0.0)), float(np.nanmax(rel, initial=0.0)), diff


def _worst_ratio(diff: np.ndarray, allowed: np.ndarray) -> float:
    """max |d| / (atol + rtol·|ref|); inf where a difference meets a zero allowance."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(diff == 0, 0.0, diff / allowed)
    return float(np.nanmax(ratio, initial=0.0))


def compare_outputs(
    label: str,
    names: Sequence[str],
    got: Sequence[np.ndarray],
    expected_names: Sequence[str],
    want: Sequence[np.ndarray],
    atol: float,
    rtol: float,
) -> Comparison:
    result = Comparison(label, atol, rtol)
    if list(names) != list(expected_names):
        result.problems.append(f"output names {list(names)} != expected {list(expected_names)}")
    if len(got) != len(want):
        result.problems.append(f"{len(got)} outputs, reference has {len(want)}")
    for name, g, w in zip(names, got, want):
        g, w = np.asarray(g), np.asarray(w)
        check = OutputCheck(name, tuple(g.shape))
        result.outputs.append(check)
        if g.shape != w.shape:
            check.problem = f"shape {g.shape} != reference {w.shape}"
            continue
        check.max_abs, check.max_rel, diff = _diffs(g, w)
        if g.dtype.kind in "iub" and w.dtype.kind in "iub":
            bad = int(np.count_nonzero(g != w))
            if bad:
                check.problem = f"{bad} of {g.size} values differ (exact match required)"
            continue
        allowed = atol + rtol * np.abs(w.astype(np.float64))
        bad_mask = ~(diff <= allowed)
        check.worst_ratio = _worst_ratio(diff, allowed)
        bad = int(np.count_nonzero(bad_mask))
        if bad:
            check.problem = (
                f"{bad} of {g.size} values outside tolerance: max abs diff {check.max_abs:.3g} "
                f"(atol {atol:g}, rtol {rtol:g})"
            )
    return result
