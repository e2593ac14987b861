"""auto's fp32 fallback, verified in kernels: keep the most sensitive nodes in fp32 one at a
time, and keep a step only if the shipped kernels score it no lower than the step before.

Every candidate's score is the kernel figure (validate runs onnxruntime's optimized
session). Keeping a node in fp32 can lower it: onnxruntime re-quantizes a float Conv/Gemm
that sits between a DequantizeLinear and a QuantizeLinear per tensor at load
(docs/ort-kernel-divergence.md; issue #20 measured 0.939 simulated, 0.389 in kernels). So
each step (the nodes kept so far, plus the next in the sensitivity ranking) is scored; if
its kernel score is below the last kept step's (the full-int8 configuration's, at first):

- when the step left a node that onnxruntime re-quantizes, it is retried with the float
  region widened (passes.float_region: the Q/DQ pairs around such nodes dropped,
  so they run in fp32 — and from then on every later step is widened too);
- if that is lower too (or there was nothing to widen), the node is not kept: the next step
  adds the next node to the nodes kept so far.

The walk ends at the first step that meets the budget, after ``max_excluded`` nodes of the
ranking, or when STALL nodes in a row were not kept. Every step scored is a row of the
report, with its verdict in ``Candidate.fallback``. Steps run one at a time: each depends on
the one before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Iterator
from typing import Any

from converter.core.executor import Executor
from converter.search.candidates import (
    Candidate,
    complete,
    failure_reason,
    log_scored,
    passes_of,
)
from converter.search.tasks import Deadline
from passes.float_region import FLOAT_REGION

__all__ = ["exclusions", "step_passes"]

logger = logging.getLogger(__name__)

Ranking = Callable[[Any, dict[str, Any], Executor], list[str]]


def exclusions(
    builder: Any,
    best: Candidate,
    config: dict[str, Any],
    max_excluded: int,
    executor: Executor,
    deadline: Deadline,
    rank: Ranking,
    note: Callable[[str], None] | None = None,
) -> Iterator[Candidate]:
    """The fallback steps of ``best`` (made with ``config``), in order; ``rank`` gives the
    nodes by sensitivity (``rank(builder, config, executor)``). A ranking that fails is one
    failed row; with the time spent, none is tried (``max_excluded`` listed as not tried).
    ``note`` is told why the walk stopped early (the report's notes), if it did."""
    if max_excluded == 0:  # nothing to rank for
        return
    if deadline.spent():
        deadline.not_tried += [f"{best.name}_fp32x{k}" for k in range(1, max_excluded + 1)]
        return
    try:
        ranked = rank(builder, config, executor)
    except (OSError, MemoryError):  # the environment: the search cannot go on
        raise
    except Exception as e:  # this stage failed: the report says so, the search goes on
        reason = f"ranking the nodes by sensitivity failed: {failure_reason(e)}"
        failed = Candidate(f"{best.name}_fp32x1..{max_excluded}", [], error=reason)
        logger.warning("warning: %s: %s", failed.name, failed.error)
        logger.debug("%s", failed.name, exc_info=e)
        yield failed
        return
    walk = _walk(builder, best, config, ranked[:max_excluded], executor, deadline)
    why = yield from walk
    if why:
        (note or (lambda text: logger.info("auto: %s", text)))(why)


def step_passes(config: dict[str, Any], kept: list[str], widen: bool) -> list[dict[str, Any]]:
    """The passes of a step: ``config`` with ``kept`` in fp32, the float region widened
    around the nodes onnxruntime would re-quantize when ``widen``."""
    return passes_of(config, kept) + ([{"pass": FLOAT_REGION}] if widen else [])


def _walk(
    builder: Any,
    best: Candidate,
    config: dict[str, Any],
    ranked: list[str],
    executor: Executor,
    deadline: Deadline,
) -> Generator[Candidate, None, str]:
    """The steps; returns why the walk stopped early ("" when it did not)."""
    kept: list[str] = []
    widen = False
    previous = best.score
    stalled = 0  # nodes in a row not kept
    for k, node in enumerate(ranked, start=1):
        if stalled == STALL:
            return (
                f"the fp32 fallback of {best.name} stopped after {STALL} nodes in a row that "
                f"did not raise its kernel score ({len(ranked) - k + 1} more of the ranking "
                "not tried)"
            )
        trial = kept + [node]
        for wide in (widen, True):  # a step the kernels score lower: retried widened, once
            c = _evaluate(builder, best, config, trial, wide, k, executor, deadline)
            if c is None:
                break
            if _accepted(c, previous):
                kept, previous, widen, stalled = trial, c.score, wide, 0
                yield log_scored(c)
                if c.meets:
                    return ""
                break
            yield log_scored(_explain(builder, c))
            if wide or not (c.int8_macs or {}).get("requantized"):  # nothing to widen
                stalled += 1
                break
    return ""


# The walk stops after this many nodes in a row that did not raise the kernel score: on
# EfficientNet-Lite0 (100 held-out crops, budget 0.995 / 0.98) four nodes in a row after the
# second were rejected and the one kept after them tied (0.9926); on MobileNetV2 the walk
# never rejected more than one node in a row before its last steps.
STALL = 3


def _evaluate(
    builder: Any,
    best: Candidate,
    config: dict[str, Any],
    trial: list[str],
    widen: bool,
    step: int,
    executor: Executor,
    deadline: Deadline,
) -> Candidate | None:
    name = f"{best.name}_fp32x{len(trial)}"
    if len(trial) != step:  # an earlier step was not kept
        name += f"_step{step}"
    if widen:
        name += "_wide"
    (c,) = deadline.evaluate(
        builder, [Candidate(name, step_passes(config, trial, widen))], executor
    )
    return complete(builder, c)  # its score is read at once, kept or not: the whole set's


def _explain(builder: Any, c: Candidate) -> Candidate:
    """A rejected step with its QDQ semantics figure: the report shows where the kernels
    part from the model (the figure is measured for such steps and the finalists only)."""
    measure = getattr(builder, "measure_semantics", None)
    if measure is not None and c.score is not None:
        measure(c)
    return c


def _accepted(c: Candidate, previous: float | None) -> bool:
    """Whether step ``c`` is kept (its verdict set): scored, something still in int8 (a
    widened float region can take a step's neighbours too), and its kernel score not below
    ``previous`` (the last kept step's)."""
    if c.score is None:
        c.fallback = "not kept: not scored"
        return False
    if (c.int8_macs or {}).get("int8_nodes") == 0:
        c.fallback = "not kept: no node left in int8 (the fp32 model)"
        return False
    if previous is None or c.score >= previous:
        c.fallback = "kept" + (f" (kernel score ≥ {previous:.4f})" if previous is not None else "")
        return True
    c.fallback = f"not kept: kernel score {c.score:.4f} < {previous:.4f}, the step before"
    return False
