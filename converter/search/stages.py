"""auto's search stages, in order: the full-int8 configurations; for a mode none of whose
configurations meets the budget, its best one with the most sensitive nodes kept in fp32;
with a sparsity grid, each pruning level alone and followed by the best quantization."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from converter.check.sensitivity import sensitivity
from converter.core.executor import Executor
from converter.search import fallback
from converter.search.builder import Builder
from converter.search.candidates import Candidate, passes_of
from converter.search.tasks import Deadline

__all__ = ["search"]

logger = logging.getLogger(__name__)


def search(
    builder: Builder,
    configs: list[tuple[str, dict[str, Any]]],
    sparsity_grid: list[float],
    max_excluded: int,
    executor: Executor,
    deadline: Deadline,
) -> Iterator[Candidate]:
    """The candidates, in search order, starting from ``configs`` (candidates.configs); those
    ``deadline`` leaves out are not yielded (they are in ``deadline.not_tried``), and later
    stages decide on the ones tried."""
    first = [Candidate(name, passes_of(config, [])) for name, config in configs]
    evaluated = deadline.evaluate(builder, first, executor)
    base = [(c, cfg) for c, (_, cfg) in zip(evaluated, configs) if c is not None]
    for c, _ in base:
        yield _log(c)
    for mode in ("quantize-dynamic", "quantize-static"):
        tried = [(c, cfg) for c, cfg in base if cfg["pass"] == mode and c.score is not None]
        if tried and not any(c.meets for c, _ in tried):
            best, config = max(tried, key=lambda t: t[0].score)
            yield from _exclusions(builder, best, config, max_excluded, executor, deadline)
    if sparsity_grid:
        yield from _pruned(builder, base, sparsity_grid, executor, deadline)


def _pruned(
    builder: Builder,
    base: list[tuple[Candidate, dict[str, Any]]],
    sparsity_grid: list[float],
    executor: Executor,
    deadline: Deadline,
) -> Iterator[Candidate]:
    """Each pruning level alone, and followed by the best full-int8 configuration (the best
    of those meeting the budget, else the best scored)."""
    scored = [(c, cfg) for c, cfg in base if c.score is not None]
    pool = [(c, cfg) for c, cfg in scored if c.meets] or scored
    best, config = max(pool, key=lambda t: t[0].score) if pool else (None, {})
    pruned = []
    for sparsity in sparsity_grid:
        prune = {"pass": "prune", "sparsity": sparsity}
        pruned.append(Candidate(f"prune{sparsity:g}", [prune]))
        if best is not None:  # (every full-int8 configuration failed: pruning alone)
            quantize = passes_of(config, [])
            pruned.append(Candidate(f"prune{sparsity:g}+{best.name}", [prune, *quantize]))
    for c in deadline.evaluate(builder, pruned, executor):
        if c is not None:
            yield _log(c)


def _exclusions(
    builder: Builder,
    best: Candidate,
    config: dict[str, Any],
    max_excluded: int,
    executor: Executor,
    deadline: Deadline,
) -> Iterator[Candidate]:
    """Keep the most sensitive nodes of ``best``'s mode in fp32, one more at a time, each
    step verified in kernels (converter.search.fallback)."""
    yield from fallback.exclusions(
        builder, best, config, max_excluded, executor, deadline, rank=_ranking
    )


def _ranking(builder: Builder, config: dict[str, Any], executor: Executor) -> list[str]:
    """The nodes by sensitivity, most sensitive first, under the settings of the candidate
    being repaired (the per-tensor error is not needed here: not measured)."""
    mode = "static" if config["pass"] == "quantize-static" else "dynamic"
    settings = {k: v for k, v in config.items() if k not in ("pass", "per_channel", "smooth")}
    return sensitivity(
        builder.model,
        builder.score,
        mode=mode,
        calib=builder.calib,
        per_channel=config.get("per_channel", True),
        quant_settings=settings,
        progress=False,
        executor=executor,
        tensor_errors=0,
    ).ranked_nodes()


def _log(c: Candidate) -> Candidate:
    if c.score is not None:
        logger.info(
            "  %-34s score %.4f  worst cosine %.4f  %s%s",
            c.name,
            c.score,
            c.worst,
            "meets" if c.meets else "misses",
            " (cached)" if c.cached else "",
        )
    return c
