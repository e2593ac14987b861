"""auto's result: every candidate, the one chosen (the fastest within the budget), what
OUTDIR/model.onnx holds, the time budget's record, and the exit-1 error of a miss."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from converter.core.errors import GateFailed, InternalError
from converter.core.gates import failure
from converter.core.machine import Target, host_target
from converter.search.budget import Budget
from converter.search.candidates import Candidate, bug_of
from converter.search.tasks import Deadline

__all__ = ["AutoResult", "choose", "check_result", "time_summary", "time_note", "SPEED_TIE"]

SPEED_TIE = 0.05  # speedups within 5 % of the fastest are timing noise on a shared machine


@dataclass
class AutoResult:
    outdir: Path
    budget: Budget
    reference_score: float
    threshold: float
    candidates: list[Candidate]
    best: Candidate | None
    split: str
    bench: Any = None
    manifest: Path | None = None
    report_md: Path | None = None
    report_html: Path | None = None
    notes: list[str] = field(default_factory=list)
    target: Target = field(default_factory=host_target)  # of every candidate
    written: Candidate | None = None  # in OUTDIR/model.onnx: best, or on a miss the closest
    time_budget: dict[str, Any] | None = None  # with --time-budget: see time_summary
    stages: list[dict[str, Any]] = field(default_factory=list)  # wall time of each stage

    def stage_line(self) -> str:
        """Where the time went: "full int8 (6 candidates) 61 s; bench ... 4 s"."""
        parts = [
            f"{s['stage']} ({s['candidates']} candidate{'' if s['candidates'] == 1 else 's'}) "
            f"{s['seconds']:.0f} s"
            for s in self.stages
            if s.get("seconds") is not None
        ]
        return "; ".join(parts)

    def closest(self) -> Candidate | None:
        scored = [c for c in self.candidates if c.score is not None and not c.error]
        return max(scored, key=lambda c: c.score) if scored else None

    def shortfall(self, c: Candidate) -> dict[str, float]:
        """How far ``c`` is from the budget: its score below the threshold, its worst cosine
        below --min-worst (0.0 where it meets)."""
        short = {"score": max(0.0, self.threshold - c.score)}
        if self.budget.min_worst is not None:
            short["worst"] = max(0.0, self.budget.min_worst - c.worst)
        return short

    def miss(self, c: Candidate) -> str:
        """``c``'s shortfall for people: "accuracy short by 0.0123, worst cosine short by
        0.0040" (what it meets left out)."""
        short = self.shortfall(c)
        names = {"score": self.budget.metric, "worst": "worst cosine"}
        parts = [f"{names[k]} short by {v:.4f}" for k, v in short.items() if v > 0]
        return ", ".join(parts) or "within budget"

    def outcome(self) -> dict[str, Any]:
        """What the manifest says about OUTDIR/model.onnx and the time budget."""
        c, written = self.written, None
        if c is not None:
            met = c is self.best
            written = {
                "candidate": c.name,
                "within_budget": met,
                "short_by": {} if met else self.shortfall(c),
            }
        return {"written": written, "time_budget": self.time_budget}


def choose(candidates: list[Candidate]) -> Candidate | None:
    """The fastest candidate meeting the budget; speedups within SPEED_TIE of the fastest
    count as equal (timing noise), and among those the higher score wins."""
    meeting = [c for c in candidates if c.meets and c.speedup is not None and not c.error]
    if not meeting:
        return None
    fastest = max(c.speedup for c in meeting)
    close = [c for c in meeting if c.speedup >= fastest * (1 - SPEED_TIE)]
    return max(close, key=lambda c: (c.score, c.worst, c.speedup))


def time_summary(deadline: Deadline, tried: int) -> dict[str, Any] | None:
    """The manifest's record of --time-budget: whether the search stopped at it, after how
    many of how many candidates, and which were not tried."""
    if deadline.seconds is None:
        return None
    skipped = deadline.not_tried
    return {
        "seconds": deadline.seconds,
        "elapsed": round(deadline.elapsed(), 3),
        "stopped": bool(skipped),
        "tried": tried,
        "planned": tried + len(skipped),
        "not_tried": list(skipped),
    }


def time_note(summary: dict[str, Any] | None) -> list[str]:
    """The report's note on --time-budget (none without one)."""
    if summary is None:
        return []
    spent = f"--time-budget {summary['seconds']:g} s ({summary['elapsed']:.3g} s spent)"
    if not summary["stopped"]:
        return [f"{spent}: every candidate of the search was tried."]
    return [
        f"the search stopped at the time budget, {spent}, after {summary['tried']} of "
        f"{summary['planned']} candidates; not tried: {', '.join(summary['not_tried'])}. "
        "Candidates found in the cache were still read."
    ]


def check_result(result: AutoResult) -> None:
    """Raise GateFailed when nothing met the budget, naming the closest candidate (written to
    OUTDIR/model.onnx all the same) and, when the search stopped at it, the time budget."""
    if result.best is not None:
        return
    closest, timed = result.closest(), result.time_budget or {}
    more = ""
    if timed.get("stopped"):
        more = (
            f"raise --time-budget ({timed['tried']} of {timed['planned']} candidates tried "
            f"in {timed['seconds']:g} s), "
        )
    if closest is None:
        what = "no candidate could be built"
        bugs = [(c.name, bug_of(c.error)) for c in result.candidates if bug_of(c.error)]
        if bugs:  # our failure, not a verdict on the model: exit 3
            name, bug = bugs[0]
            raise InternalError(f"{what} ({name}: {bug}); no model.onnx written")
        if timed.get("stopped") and not result.candidates:
            what = f"no candidate was tried within --time-budget {timed['seconds']:g} s"
        raise GateFailed(what + "; no model.onnx written", f"{more}see {result.report_md}")
    budget = result.budget
    gates = budget.candidate_gates(result.reference_score, closest.score, closest.worst)
    raise failure(
        f"no candidate meets {budget.describe(result.reference_score)}; closest: "
        f"{closest.name} with {budget.metric} {closest.score:.4f} "
        f"({result.miss(closest)}), worst cosine {closest.worst:.4f}, written to model.onnx "
        "all the same; its gates",
        gates,
        f"{more}relax the budget, add --calib data closer to real use, or see {result.report_md}",
        None,
    )
