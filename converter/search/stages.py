"""auto's search stages, in order, each started only when it can still win:

1. the full-int8 configurations. On a model that looks like a transformer encoder, the
   every-op static family (Q/DQ on every op) is probed with one configuration first; its
   calibration variants are tried only when the probe comes within ``EVERY_OP_REACH`` of
   the budget (on encoders every-op Q/DQ loses to activation outliers whatever the ranges:
   all-MiniLM-L6-v2 0.82–0.865 cosine for all five variants, budget 0.997);
2. for a mode none of whose configurations meets the budget, its best one with the most
   sensitive nodes kept in fp32 (converter.search.fallback) — skipped when a configuration
   of a mode at least as fast already meets it in full int8: keeping nodes in fp32 only
   makes a model slower than its own full-int8 configuration;
3. with a sparsity grid, each pruning level alone and followed by the best quantization.

Each skipped stage is a line of ``SearchLog.notes`` (the report's notes), and each stage
logs a progress line with the time it is expected to take.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from converter.check.sensitivity import sensitivity
from converter.core.executor import Executor
from converter.core.onnxio import atomic_write_text
from converter.search import fallback
from converter.search.builder import Builder
from converter.search.candidates import Candidate, complete, log_scored, passes_of
from converter.search.tasks import Deadline
from passes.dynamic import CONV_DOMINATED
from passes.int8_share import conv_share, node_macs
from passes.quantize import looks_like_transformer

__all__ = ["search", "SearchLog", "EVERY_OP_REACH"]

logger = logging.getLogger(__name__)

EVERY_OP_REACH = 0.05  # the every-op calibration variants differ by less than this: MiniLM
# 0.82-0.865 cosine for all five; MobileNetV2 0.936-0.959 (minmax vs mean_minmax)

# How fast a mode's int8 runs, for whether its fallback can still win: static QDQ runs at
# least as fast as dynamic, which quantizes every activation at run time (on convolutions
# dynamic int8 is slower than fp32; on encoders the static transformer scheme matches
# per-channel dynamic's speed).
_SPEED_RANK = {"quantize-dynamic": 0, "quantize-static": 1}
_MODE = {"quantize-dynamic": "dynamic", "quantize-static": "static"}


@dataclass
class SearchLog:
    """What the search says besides its candidates: why a stage was skipped (the report's
    notes), the pace of building, for the progress line's time estimate, and the wall time
    of each stage (the report's and the manifest's ``stages``)."""

    notes: list[str] = field(default_factory=list)
    built: int = 0  # candidates built and scored (not read from the cache)
    seconds: float = 0.0  # the time they took
    stages: list[dict[str, Any]] = field(default_factory=list)  # name, candidates, seconds
    # its own clock: the deadline's is read once per candidate started (and tests count it)
    clock: Callable[[], float] = time.monotonic
    start: float = field(default_factory=time.monotonic)

    def pace(self) -> float | None:
        return self.seconds / self.built if self.built else None

    def stage(self, name: str, count: int, extra: str = "", known: bool = False) -> None:
        """A stage starts (the one before ends): its progress line — what, how many, the
        time it is expected to take. ``known``: it works on exactly ``count`` candidates
        (else they are counted as the stage yields them)."""
        self.end()
        each = self.pace()
        eta = f", about {count * each:.0f} s at {each:.1f} s each" if each else ""
        logger.info(
            "auto: %s: up to %d candidate%s%s%s (%.0f s so far)",
            name, count, "" if count == 1 else "s", extra, eta, self.clock() - self.start,
        )  # fmt: skip
        done = count if known else 0
        self.stages.append({"stage": name, "candidates": done, "seconds": None, "_t": self.clock()})

    def counted(self, found: Iterator[Candidate]) -> Iterator[Candidate]:
        """``found``, each candidate counted in the current stage."""
        for c in found:
            if self.stages:
                self.stages[-1]["candidates"] += 1
            yield c

    def end(self) -> None:
        """The current stage, if any, ends now."""
        if self.stages and self.stages[-1]["seconds"] is None:
            last = self.stages[-1]
            last["seconds"] = round(self.clock() - last.pop("_t"), 1)

    def note(self, text: str) -> None:
        logger.info("auto: %s", text)
        self.notes.append(text)


def search(
    builder: Builder,
    configs: list[tuple[str, dict[str, Any]]],
    sparsity_grid: list[float],
    max_excluded: int,
    executor: Executor,
    deadline: Deadline,
    log: SearchLog | None = None,
) -> Iterator[Candidate]:
    """The candidates, in search order, starting from ``configs`` (candidates.configs); those
    ``deadline`` leaves out are not yielded (they are in ``deadline.not_tried``), and later
    stages decide on the ones tried. Stages skipped are noted in ``log``."""
    log = log if log is not None else SearchLog()
    probe, variants = _every_op_probe(builder, configs)
    first = [(n, cfg) for n, cfg in configs if n not in {v for v, _ in variants}]
    base = _evaluate(builder, "full int8", first, executor, deadline, log)
    yield from (c for c, _ in base)
    if variants:
        tried = complete(builder, next((c for c, _ in base if c.name == probe), None))
        short = None if tried is None or tried.score is None else builder.threshold - tried.score
        if short is not None and short > EVERY_OP_REACH:
            log.note(
                f"{', '.join(n for n, _ in variants)} not tried: on this transformer-like model "
                f"every-op Q/DQ scored {tried.score:.4f} ({probe}), {short:.4f} below the "
                f"budget, and its calibration variants differ by less than {EVERY_OP_REACH}"
            )
        else:
            more = _evaluate(builder, "every-op static variants", variants, executor, deadline, log)
            yield from (c for c, _ in more)
            base += more
    slow_dynamic = _conv_dominated(builder.model, builder.sample_shapes)
    for mode in ("quantize-dynamic", "quantize-static"):
        if (
            mode == "quantize-dynamic"
            and slow_dynamic
            and any(cfg["pass"] == mode and c.scored() and not c.meets for c, cfg in base)
        ):
            log.note(
                "the dynamic fp32 fallback was skipped: the model is conv-dominated, and dynamic "
                "int8 convolutions run slower than fp32 (0.12x measured on EfficientNet-Lite0)"
            )
            continue
        fallback_from = _fallback_parent(builder, base, mode, log)
        if fallback_from is None:
            continue
        best, config = fallback_from
        log.stage(
            f"{_MODE[mode]} fp32 fallback from {best.name}", max_excluded,
            " after ranking the nodes by sensitivity",
        )  # fmt: skip
        steps = _exclusions(builder, best, config, max_excluded, executor, deadline, log)
        yield from log.counted(steps)
    if sparsity_grid:
        log.stage("pruning", 2 * len(sparsity_grid))
        yield from log.counted(_pruned(builder, base, sparsity_grid, executor, deadline))
    log.end()


def _fallback_parent(
    builder: Builder, base: list[tuple[Candidate, dict[str, Any]]], mode: str, log: SearchLog
) -> tuple[Candidate, dict[str, Any]] | None:
    """The full-int8 configuration of ``mode`` whose fp32 fallback can still win, or None.

    A fallback step is never faster than its parent (it keeps nodes in fp32), so a parent is
    worth repairing only if it runs more of the model in int8 than every candidate that
    already meets the budget in a mode at least as fast (static QDQ ≥ dynamic): its int8
    share of multiply-adds (unknown: read as all) above theirs by more than INT8_MARGIN —
    and above INT8_MARGIN at all: a parent that runs almost nothing in int8 (the
    ``static_transformer`` of a CNN) has nothing a fallback could keep fast.
    On a CNN, ``static_transformer`` meets a budget with 0.4 % of the MACs in int8: the
    every-op static fallback still runs. Of the parents left, the best scored one among
    those a quick speed probe finds within PARENT_SPEED of the fastest (_fast_parents): on
    x86, int8 activations run MobileNetV2 at 1.27x fp32 where uint8 runs 2.2x, for the same
    score, and no fallback step of the slow one can be fast."""
    scored = [(c, cfg) for c, cfg in base if cfg["pass"] == mode and c.scored()]
    meeting = [c for c, cfg in base if c.meets and _SPEED_RANK[cfg["pass"]] >= _SPEED_RANK[mode]]
    bar = max((_share(c) for c in meeting), default=None)
    repairable = [
        (c, cfg) for c, cfg in scored
        if not c.meets and _share(c) > (bar or 0.0) + INT8_MARGIN
    ]  # fmt: skip
    if not repairable:
        if scored and meeting and not any(c.meets for c, _ in scored):
            # (the best of them named when all were scored on the whole set: a candidate
            # decided on the subset is not scored further for a note)
            whole = [c for c, _ in scored if c.score is not None]
            best = max(whole, key=lambda c: c.score).name if len(whole) == len(scored) else None
            best = best or "the best of " + ", ".join(c.name for c, _ in scored)
            winner = max(meeting, key=_share)
            log.note(
                f"the {_MODE[mode]} fp32 fallback (from {best}) was skipped: "
                f"{winner.name} meets the budget with {_percent(winner)} of the multiply-adds "
                f"in int8 and runs at least as fast as {_MODE[mode]} int8; keeping nodes in "
                f"fp32 would only make a model slower than {best} itself"
            )
        return None
    for c, _ in repairable:  # their scores decide: the whole set's
        complete(builder, c)
    best = max(_fast_parents(builder, repairable, log), key=lambda t: t[0].score)
    if meeting:
        winner = max(meeting, key=_share)
        log.note(
            f"{winner.name} meets the budget with only {_percent(winner)} of the "
            f"multiply-adds in int8: the {_MODE[mode]} fp32 fallback from {best[0].name} "
            f"({_percent(best[0])}) runs, as it may give a faster model"
        )
    return best


INT8_MARGIN = 0.01
PARENT_SPEED = 0.9  # a parent slower than this share of the fastest one is not repaired


def _fast_parents(
    builder: Builder, parents: list[tuple[Candidate, dict[str, Any]]], log: SearchLog
) -> list[tuple[Candidate, dict[str, Any]]]:
    """The fallback parents within PARENT_SPEED of the fastest by a quick speed probe
    (Builder.speeds); all of them when there is one, or the probe could not run."""
    if len(parents) < 2:
        return parents
    try:
        speeds = builder.speeds([c for c, _ in parents])
    except (OSError, MemoryError):
        raise
    except Exception as e:  # the probe is an optimisation: without it, the best score decides
        logger.warning("warning: the speed probe of the fallback parents failed: %s", e)
        logger.debug("speed probe", exc_info=e)
        return parents
    if len(speeds) < len(parents):
        return parents
    fastest = max(speeds.values())
    fast = [(c, cfg) for c, cfg in parents if speeds[c.name] >= PARENT_SPEED * fastest]
    best, best_fast = (max(group, key=lambda t: t[0].score)[0] for group in (parents, fast))
    if best is not best_fast:
        log.note(
            f"the fp32 fallback starts from {best_fast.name} ({speeds[best_fast.name]:.2f}x fp32 "
            f"in a quick probe), not from the best scored {best.name} ({best.score:.4f}, "
            f"{speeds[best.name]:.2f}x): a fallback step is never faster than its parent"
        )
    return fast


def _conv_dominated(model: Any, sample_shapes: dict[str, Any]) -> bool:
    """More than half the multiply-adds in Conv (passes.dynamic's conv-dominated warning),
    counted at the size of the scoring samples (weights held in Constant nodes, as
    paddle2onnx writes them, included)."""
    if not any(n.op_type == "Conv" for n in model.graph.node):
        return False
    share = conv_share(model, sample_shapes)
    return share is not None and share > CONV_DOMINATED


def _share(c: Candidate) -> float:
    share = (c.int8_macs or {}).get("share")
    return 1.0 if share is None else float(share)


def _percent(c: Candidate) -> str:
    share = (c.int8_macs or {}).get("share")
    return "an unknown share" if share is None else f"{100 * share:.1f}%"


def _every_op_probe(
    builder: Builder, configs: list[tuple[str, dict[str, Any]]]
) -> tuple[str | None, list[tuple[str, dict[str, Any]]]]:
    """On a transformer-like model, the every-op static configuration tried first (the
    probe) and its variants, held back until the probe is scored; (None, []) otherwise."""
    every_op = [(n, cfg) for n, cfg in configs if _every_op(cfg)]
    if len(every_op) < 2 or not looks_like_transformer(builder.model):
        return None, []
    return every_op[0][0], every_op[1:]


def _every_op(config: dict[str, Any]) -> bool:
    return config["pass"] == "quantize-static" and config.get("scheme") == "default"


def _evaluate(
    builder: Builder,
    name: str,
    configs: list[tuple[str, dict[str, Any]]],
    executor: Executor,
    deadline: Deadline,
    log: SearchLog,
) -> list[tuple[Candidate, dict[str, Any]]]:
    """The configurations built and scored (those the deadline leaves out dropped), with
    the stage's progress line and its pace recorded."""
    log.stage(name, len(configs))
    began = log.clock()
    candidates = [Candidate(n, passes_of(cfg, [])) for n, cfg in configs]
    evaluated = deadline.evaluate(builder, candidates, executor)
    done = [(c, cfg) for c, (_, cfg) in zip(evaluated, configs) if c is not None]
    log.stages[-1]["candidates"] += len(done)
    built = sum(not c.cached for c, _ in done)
    if built:
        log.built += built
        log.seconds += log.clock() - began
    for c, _ in done:
        log_scored(c)
    return done


def _pruned(
    builder: Builder,
    base: list[tuple[Candidate, dict[str, Any]]],
    sparsity_grid: list[float],
    executor: Executor,
    deadline: Deadline,
) -> Iterator[Candidate]:
    """Each pruning level alone, and followed by the best full-int8 configuration (the best
    of those meeting the budget, else the best scored)."""
    scored = [(c, cfg) for c, cfg in base if c.scored()]
    pool = [(c, cfg) for c, cfg in scored if c.meets] or [
        (complete(builder, c), cfg) for c, cfg in scored
    ]  # (none meets: the best score decides, the whole set's)
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
            yield log_scored(c)


def _exclusions(
    builder: Builder,
    best: Candidate,
    config: dict[str, Any],
    max_excluded: int,
    executor: Executor,
    deadline: Deadline,
    log: SearchLog,
) -> Iterator[Candidate]:
    """Keep the most sensitive nodes of ``best``'s mode in fp32, one more at a time, each
    step verified in kernels (converter.search.fallback)."""
    yield from fallback.exclusions(
        builder, best, config, max_excluded, executor, deadline, rank=_ranking, note=log.note
    )


def _ranking(builder: Builder, config: dict[str, Any], executor: Executor) -> list[str]:
    """The nodes in the order the fallback keeps them in fp32: most fidelity back per fp32
    multiply-add first (cost_order), from their sensitivity under the settings of the
    candidate being repaired (the per-tensor error is not needed here: not measured).
    Cached in the candidate cache by content (model, data, settings, versions:
    Builder.key), so a re-run does not rank again."""
    mode = "static" if config["pass"] == "quantize-static" else "dynamic"
    settings = {k: v for k, v in config.items() if k not in ("pass", "per_channel", "smooth")}
    per_channel = config.get("per_channel", True)
    order = {"order": "loss per fp32 cost"}  # rankings cached before were by loss alone
    key = builder.key([{"ranking": mode, "per_channel": per_channel, **settings, **order}])
    path = builder.cache / f"ranking-{key}.json"
    cached = _cached_ranking(path)
    if cached is not None:
        logger.info("auto: sensitivity ranking read from the cache (%s)", path.name)
        return cached
    calib = builder.calib
    reads_samples = "smooth" in config or config.get("weight_rounding") == "gptq"
    if mode == "static" and not reads_samples and hasattr(builder, "static_ranges"):
        calib = builder.static_ranges(config)  # the ranges its candidates were made with
    report = sensitivity(
        builder.model,
        builder.score,
        mode=mode,
        calib=calib,
        per_channel=per_channel,
        quant_settings=settings,
        progress=False,
        executor=executor,
        tensor_errors=0,
    )
    macs = node_macs(builder.model, builder.sample_shapes)  # at the data's size
    ranked = cost_order({n.name: n.loss for n in report.nodes}, macs)
    atomic_write_text(path, json.dumps(ranked))
    return ranked


# What keeping a node in fp32 costs besides its own multiply-adds (the Q/DQ and layout
# changes around it), as a share of the model's multiply-adds.
KEEP_COST = 0.005


def cost_order(losses: dict[str, float], macs: dict[str, int | None]) -> list[str]:
    """Node names by fidelity loss per cost of keeping the node in fp32, highest first: the
    loss it alone quantized costs, divided by its share of the multiply-adds plus KEEP_COST
    (unknown: the mean share). A node that costs the most fidelity is not the one to keep
    when it is also the most expensive to run in fp32: on MobileNetV2 (u8, mse + bias
    correction, 100 held-out crops, batch 1, AMD EPYC Zen 4) the first 8 nodes by loss
    alone reach 0.9939 mean cosine at 0.82x bare onnxruntime's speed, the first 8 by loss
    per cost 0.9928 at 0.90x."""
    known = [m for m in macs.values() if m]
    total = sum(known)
    if not total:
        return sorted(losses, key=lambda n: -losses[n])
    mean = total / len(known)

    def ratio(name: str) -> float:
        share = (macs.get(name) or mean) / total
        return losses[name] / (share + KEEP_COST)

    return sorted(losses, key=lambda n: (-ratio(n), n))


def _cached_ranking(path: Any) -> list[str] | None:
    """A cached ranking, or None when absent or unreadable (then it is measured again)."""
    try:
        ranked = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        logger.warning("warning: cached ranking %s is unreadable (%s); ranking again", path, e)
        return None
    if not (isinstance(ranked, list) and all(isinstance(n, str) for n in ranked)):
        logger.warning("warning: cached ranking %s is not a list of nodes; ranking again", path)
        return None
    return ranked
