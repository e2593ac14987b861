"""``auto``'s candidates as a map over an executor (converter.executor): each candidate is
built, scored and cached by ``_Builder.evaluate`` — in this process, or in a Ray task that
reads the builder (the fp32 model, the paths, the budget) from Ray's object store.

Only the building and scoring move: latency is measured afterwards by ``auto`` itself, all
candidates interleaved on the machine that runs it, because a speedup describes the machine
it was measured on. On a cluster, OUTDIR (the candidate cache) and the data must be on a
file system every node sees at the same path.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from typing import Any

from converter.executor import Executor

__all__ = ["evaluate_all", "notes"]


def evaluate_all(builder: Any, candidates: Sequence[Any], executor: Executor) -> list[Any]:
    """``builder.evaluate`` of each candidate, results in the candidates' order."""
    if not candidates:
        return []
    return executor.map(_evaluate, list(candidates), shared=builder, desc="auto", unit="candidate")


def _evaluate(builder: Any, candidate: Any) -> Any:
    return builder.evaluate(candidate)


def notes(executor: Executor) -> list[str]:
    """What the report says about where the work ran."""
    if executor.name == "in-process":
        return []
    return [
        f"candidates were built and scored as {executor.name} tasks ({executor.width} CPUs); "
        f"the latencies were measured here ({platform.node()}), every candidate interleaved "
        "with fp32 in one process, so they describe this machine"
    ]
