"""``auto``'s candidates as a map over an executor (converter.core.executor): each candidate is
built, scored and cached by ``Builder.evaluate`` (converter.search.builder) — in this
process, or in a Ray task that reads the builder (the fp32 model, the paths, the budget) from
Ray's object store.

Only the building and scoring move: latency is measured afterwards by ``auto`` itself, all
candidates interleaved on the machine that runs it, because a speedup describes the machine
it was measured on. On a cluster, OUTDIR (the candidate cache) and the data must be on a
file system every node sees at the same path.

:class:`Deadline` is ``auto --time-budget``: it hands the executor a chunk of candidates at a
time and starts no new chunk once the time is spent. It lives in the driver only: its clock
never travels to a task.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Sequence
from typing import Any

from converter.core.executor import Executor

__all__ = ["Deadline", "evaluate_all", "notes"]


def evaluate_all(builder: Any, candidates: Sequence[Any], executor: Executor) -> list[Any]:
    """``builder.evaluate`` of each candidate, results in the candidates' order."""
    if not candidates:
        return []
    return executor.map(_evaluate, list(candidates), shared=builder, desc="auto", unit="candidate")


def _evaluate(builder: Any, candidate: Any) -> Any:
    return builder.evaluate(candidate)


class Deadline:
    """auto's wall-time budget: ``seconds`` (None: no limit) counted on ``clock`` from the
    moment this is made (the start of auto: data split and fp32 score included). Once spent,
    no new candidate starts — those already started finish — and candidates found in the cache
    are still read (that costs a file hash); every other one is listed in ``not_tried``."""

    def __init__(self, seconds: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self.clock = clock
        self.start = clock()
        self.not_tried: list[str] = []

    def spent(self) -> bool:
        return self.seconds is not None and self.clock() - self.start >= self.seconds

    def elapsed(self) -> float:
        return self.clock() - self.start

    def evaluate(self, builder: Any, candidates: Sequence[Any], executor: Executor) -> list[Any]:
        """``evaluate_all`` of the candidates that fit in the time (``executor.width`` at a
        time), results in the candidates' order; None in place of each one not tried."""
        if self.seconds is None:
            return evaluate_all(builder, candidates, executor)
        results: list[Any] = []
        for i in range(0, len(candidates), executor.width):
            if self.spent():
                return results + [self._from_cache(builder, c) for c in candidates[i:]]
            results += evaluate_all(builder, candidates[i : i + executor.width], executor)
        return results

    def _from_cache(self, builder: Any, candidate: Any) -> Any:
        if builder.read_cache(candidate):
            return candidate
        self.not_tried.append(candidate.name)
        return None


def notes(executor: Executor) -> list[str]:
    """What the report says about where the work ran."""
    if executor.name == "in-process":
        return []
    return [
        f"candidates were built and scored as {executor.name} tasks ({executor.width} CPUs); "
        f"the latencies were measured here ({platform.node()}), the finalists interleaved "
        "with fp32 in one process, so they describe this machine"
    ]
