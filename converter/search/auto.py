"""``onnxship auto``: the fastest model within an accuracy budget.

The search, in order (each candidate validated on the scoring data against the fp32
reference, cached by content hash so a re-run is fast):

1. full int8 configurations: dynamic (per-channel, per-tensor; only for models with
   MatMul/Gemm), static QDQ with U8 and S8 activations, per-channel and per-tensor weights,
   minmax / percentile / entropy calibration (ranges measured once per method and reused);
2. when no configuration of a mode meets the budget: its best one again, keeping the most
   sensitive nodes (``sensitivity``) in fp32 one at a time, until it does;
3. with ``sparsity_grid``: each pruning level alone and followed by the best quantization.

Then every candidate is benched interleaved with fp32 in one process, and the fastest one
meeting the budget (ties → the higher score) is written as ``OUTDIR/model.onnx`` with a report
and a manifest; when none meets it, the closest one is written all the same, marked as a
miss. ``time_budget`` stops the search from starting new candidates once that much wall time
has passed (auto_tasks.Deadline). The calibration data is ``calib`` or, without it, every
fourth sample of ``data`` (at most 256) — kept apart from the samples that are scored; the
report says which.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from converter.check.bench import bench
from converter.check.node_error import node_errors, prepare_reference, sample_feeds
from converter.check.profile import note_unfused_dq
from converter.check.sensitivity import sensitivity
from converter.check.validate import validate
from converter.core import defaults
from converter.core.data import LABELS, Dataset, model_input_specs, open_data
from converter.core.errors import BadInputError, GateFailed, OnnxshipError
from converter.core.executor import Executor, InProcess
from converter.core.gates import failure, fmt, score_gates
from converter.core.machine import (
    Target,
    host_target,
    resolve_target,
    sha256_data,
    sha256_file,
    versions,
)
from converter.core.onnxio import atomic_path, atomic_write_text, load_model, save_model
from converter.recipes.auto_report import write_auto_outputs
from converter.search.tasks import Deadline, notes
from passes import PassRunner, fingerprint
from passes.base import quiet_passes
from passes.pack import dense_model, packed_size
from passes.quantize import StaticQuantize, default_calib_method, is_quantized
from passes.registry import make_recipe_pass

__all__ = ["auto", "AutoResult", "Budget", "Candidate", "METRICS"]

logger = logging.getLogger(__name__)

METRICS = defaults.SCORES
CALIB_SAMPLES = 256
CALIB_EVERY = 4
MAX_EXCLUDED = defaults.AUTO_MAX_EXCLUDED
SMOOTH_ALPHA = 0.8  # all-MiniLM-L6-v2, avx2: 0.9965 / 0.9924 vs 0.9947 / 0.9877 at 0.95
_GPTQ = {"weight_rounding": "gptq"}
SPEED_TIE = 0.05  # speedups within 5 % of the fastest are timing noise on a shared machine


@dataclass(frozen=True)
class Budget:
    """What a candidate must reach on the scoring data: ``metric`` ≥ ``min_score`` and at
    most ``max_drop`` below the fp32 reference's own score, worst-sample cosine ≥
    ``min_worst``."""

    metric: str
    min_score: float | None = None
    max_drop: float | None = None
    min_worst: float | None = None

    def threshold(self, reference_score: float) -> float:
        limits = [self.min_score] if self.min_score is not None else []
        if self.max_drop is not None:
            limits.append(reference_score - self.max_drop)
        return max(limits)

    def describe(self, reference_score: float) -> str:
        text = f"{self.metric} ≥ {self.threshold(reference_score):.4f}"
        return text + (f", worst cosine ≥ {self.min_worst:g}" if self.min_worst is not None else "")

    def gates(self, reference_score: float, score: float | None, worst: float | None) -> list:
        """This budget as the gates ``validate`` checks (converter.core.gates)."""
        drop = None if score is None else reference_score - score
        detail = f"reference {fmt(reference_score)}, candidate {fmt(score)}"
        return score_gates(
            "output",
            self.min_score,
            self.max_drop,
            self.min_worst,
            score=(self.metric, score),
            drop=(self.metric, drop, detail),
            worst=(worst, ""),
        )


@dataclass
class Candidate:
    name: str
    passes: list[dict[str, Any]]
    key: str = ""
    path: Path | None = None
    score: float | None = None
    cosine: float | None = None
    worst: float | None = None
    meets: bool = False
    error: str = ""
    p50_ms: float | None = None
    p90_ms: float | None = None
    speedup: float | None = None
    size: int | None = None
    cached: bool = False
    unfused_dq: float | None = None  # share of run time in unfused DequantizeLinear (static)
    node_errors: dict[str, Any] | None = None  # {"samples", "tensors"}: see _note_node_errors

    def row(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


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
    time_budget: dict[str, Any] | None = None  # with --time-budget: see _time_summary

    def closest(self) -> Candidate | None:
        scored = [c for c in self.candidates if c.score is not None]
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


# ---------------------------------------------------------------- data


def _write_npz(path: Path, parts: dict[str, list[np.ndarray]]) -> Path:
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **{k: np.concatenate(v) for k, v in parts.items()})
    return path


def _split(data: Dataset, specs: list, folder: Path, max_score: int) -> tuple[Path, Path, str]:
    """Every fourth sample (up to CALIB_SAMPLES) to calibration, the rest to scoring."""
    calib: dict[str, list[np.ndarray]] = {}
    score: dict[str, list[np.ndarray]] = {}
    offset, n_calib, n_score = 0, 0, 0
    for feed in data.batches(specs, 256, with_labels=True):
        n = len(next(iter(feed.values())))
        index = np.arange(offset, offset + n)
        to_calib = (index % CALIB_EVERY == 0) & (index // CALIB_EVERY < CALIB_SAMPLES)
        keep = np.flatnonzero(~to_calib)[: max(0, max_score - n_score)]
        for name, array in feed.items():
            if name != LABELS:
                calib.setdefault(name, []).append(array[to_calib])
            score.setdefault(name, []).append(array[keep])
        n_calib, n_score, offset = n_calib + int(to_calib.sum()), n_score + len(keep), offset + n
    if n_calib < 1 or n_score < 2:
        raise BadInputError(
            f"data {data.path} has too few samples ({data.num_samples}) to "
            "split into calibration and scoring",
            "give at least 8 samples",
        )
    folder.mkdir(parents=True, exist_ok=True)
    split = (
        f"calibration: every {CALIB_EVERY}th sample of {data.path} ({n_calib} samples); "
        f"scoring: the other {n_score} samples"
    )
    return _write_npz(folder / "calib.npz", calib), _write_npz(folder / "score.npz", score), split


# ---------------------------------------------------------------- candidates


def _configs(model: onnx.ModelProto, target: str) -> list[tuple[str, dict[str, Any]]]:
    """The full-int8 configurations to try for ``target``, as (name, pass settings)."""
    ops = {n.op_type for n in model.graph.node}
    configs = []
    if ops & {"MatMul", "Gemm"}:
        configs += [
            ("dynamic_pc", {"pass": "quantize-dynamic", "per_channel": True}),
            ("dynamic_pt", {"pass": "quantize-dynamic", "per_channel": False}),
            ("static_transformer", {"pass": "quantize-static", "scheme": "transformer"}),
        ]
    if ops & {"MatMul"} and "LayerNormalization" in ops:  # SmoothQuant folded into LayerNorm
        smooth = {"pass": "quantize-static", "scheme": "transformer", "smooth": SMOOTH_ALPHA}
        configs += [
            (f"smooth{SMOOTH_ALPHA:g}_static_transformer", smooth),
            (f"smooth{SMOOTH_ALPHA:g}_static_transformer_gptq", {**smooth, **_GPTQ}),
        ]
    # every-op Q/DQ, named explicitly (StaticQuantize's own default is "auto", which picks
    # the transformer scheme for encoders: tried above as static_transformer)
    every_op = {"pass": "quantize-static", "scheme": "default"}
    for method in ("minmax", "percentile", "entropy"):
        configs.append((f"static_u8_pc_{method}", {**every_op, "calib_method": method}))
    configs += [
        ("static_s8_pc_minmax", {**every_op, "activation_type": "int8"}),
        ("static_u8_pt_minmax", {**every_op, "per_channel": False}),
    ]
    return [(name, {**config, "target": target}) for name, config in configs]


class _Builder:
    """Builds candidates through the pass runner, reusing calibration ranges per model and
    method, and caching each result by content hash in ``cache``."""

    def __init__(
        self,
        model: onnx.ModelProto,
        calib: Path,
        score: Path,
        reference: Path,
        budget: Budget,
        cache: Path,
        target: str,
    ) -> None:

        self.model = model
        self.calib, self.score, self.reference = calib, score, reference
        self.budget = budget
        self.cache = cache
        self.target = target
        self.ranges: dict[tuple[str, str], Any] = {}
        self.reference_score = 0.0
        self.threshold = 0.0
        # Everything that feeds a cached number, besides each candidate's own passes.
        self.context = {
            "model": fingerprint(model),
            "calibration": sha256_data(calib),
            "scoring": sha256_data(score),
            "metric": budget.metric,
            "target": target,
            "versions": {k: v for k, v in versions(False).items() if k != "numpy"},
        }

    def key(self, passes: list[dict[str, Any]]) -> str:
        text = json.dumps([self.context, passes], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def evaluate(self, candidate: Candidate) -> Candidate:
        if self.read_cache(candidate):
            return candidate
        path, record = self.cache / f"{candidate.key}.onnx", self.cache / f"{candidate.key}.json"
        try:
            with quiet_passes():
                save_model(self._build(candidate.passes), path)
        except OnnxshipError as e:
            candidate.error = e.message
            logger.info("  %s: could not be built (%s)", candidate.name, e.message)
            return candidate
        candidate.path = path
        self._score(candidate)
        numbers = {k: getattr(candidate, k) for k in _CACHED}
        atomic_write_text(record, json.dumps({**numbers, "sha256": sha256_file(path)}))
        return self._judge(candidate)

    def read_cache(self, candidate: Candidate) -> bool:
        """Fill in ``candidate`` from the cache, judged; False when it is not there."""
        candidate.key = self.key(candidate.passes)
        path = self.cache / f"{candidate.key}.onnx"
        numbers = _cached(path, path.with_suffix(".json"))
        if numbers is None:
            return False
        candidate.__dict__.update(numbers, path=path, cached=True)
        self._judge(candidate)
        return True

    def _judge(self, c: Candidate) -> Candidate:
        """Whether ``c`` meets this run's budget (cached numbers may come from another)."""
        c.meets = all(g.passed for g in self.budget.gates(self.reference_score, c.score, c.worst))
        return c

    def _build(self, passes: list[dict[str, Any]]) -> onnx.ModelProto:

        model = self.model
        built = []
        for entry in passes:
            settings = {k: v for k, v in entry.items() if k != "pass"}
            if entry["pass"] == "quantize-static":
                settings = {
                    **settings,
                    "progress": False,
                    "ranges": self._ranges(model, _calib_of(settings), settings["scheme"]),
                }
                if settings.get("weight_rounding") == "gptq":  # reads the samples again
                    settings["calibration"] = self.calib
            if entry["pass"] in ("prune", "smooth"):  # later passes see the rewritten model
                rewrite = make_recipe_pass(entry["pass"], settings, self.calib)
                model, _ = PassRunner([rewrite]).run(model)
                continue
            built.append(make_recipe_pass(entry["pass"], settings))
        return PassRunner(built).run(model)[0]

    def _ranges(self, model: onnx.ModelProto, method: str, scheme: str) -> Any:

        key = (fingerprint(model), method, scheme)
        if key not in self.ranges:
            self.ranges[key] = StaticQuantize(
                calibration=self.calib,
                calib_method=method,
                progress=False,
                target=self.target,
                scheme=scheme,
            ).calibrate(model)
        return self.ranges[key]

    def _score(self, c: Candidate) -> None:

        metrics = list(dict.fromkeys([self.budget.metric, "cosine"]))
        report = validate(
            c.path, self.score, reference=self.reference, metrics=metrics, progress=False
        )
        values = report.outputs[report.output]
        c.score = values[self.budget.metric].value
        c.cosine, c.worst = values["cosine"].value, values["cosine"].worst


_CACHED = ("score", "cosine", "worst")


def _calib_of(settings: dict[str, Any]) -> str:
    """The calibration method a static config uses (its scheme's default when unset)."""
    return settings.get("calib_method") or default_calib_method(settings["scheme"])


def _cached(path: Path, record: Path) -> dict[str, float] | None:
    """A cache entry's numbers, or None when absent; a corrupt or truncated entry (record
    unreadable, numbers missing, model bytes not those recorded) is dropped with a warning
    and recomputed."""
    if not (path.exists() and record.exists()):
        return None
    try:
        entry = json.loads(record.read_text())
        numbers = {k: float(entry[k]) for k in _CACHED}
        if sha256_file(path) != entry["sha256"]:
            raise ValueError("the model file is not the one its numbers were measured on")
    except (ValueError, KeyError, TypeError, OSError) as e:
        logger.warning("warning: cache entry %s is corrupt (%s); recomputing it", record, e)
        return None
    return numbers


def _passes_of(config: dict[str, Any], excluded: list[str]) -> list[dict[str, Any]]:
    """The passes of a configuration; its ``smooth`` alpha becomes a SmoothQuant pass first."""
    entry = dict(config)
    alpha = entry.pop("smooth", None)
    if excluded:
        entry["nodes_to_exclude"] = sorted(excluded)
    return ([{"pass": "smooth", "alpha": alpha}] if alpha is not None else []) + [entry]


def _search(
    builder: _Builder,
    sparsity_grid: list[float],
    max_excluded: int,
    executor: Executor,
    deadline: Deadline,
) -> Iterator[Candidate]:
    """The candidates, in search order; those ``deadline`` leaves out are not yielded (they
    are in ``deadline.not_tried``), and later stages decide on the ones tried."""
    configs = _configs(builder.model, builder.target)
    first = [Candidate(name, _passes_of(config, [])) for name, config in configs]
    evaluated = deadline.evaluate(builder, first, executor)
    base = [(c, cfg) for c, (_, cfg) in zip(evaluated, configs) if c is not None]
    for c, _ in base:
        yield _log(c)
    for mode in ("quantize-dynamic", "quantize-static"):
        tried = [(c, cfg) for c, cfg in base if cfg["pass"] == mode and c.score is not None]
        if tried and not any(c.meets for c, _ in tried):
            best, config = max(tried, key=lambda t: t[0].score)
            yield from _exclusions(builder, best, config, max_excluded, executor, deadline)
    if not sparsity_grid:
        return
    scored = [(c, cfg) for c, cfg in base if c.score is not None]
    pool = [(c, cfg) for c, cfg in scored if c.meets] or scored
    best, config = max(pool, key=lambda t: t[0].score)
    pruned = []
    for sparsity in sparsity_grid:
        prune = {"pass": "prune", "sparsity": sparsity}
        pruned.append(Candidate(f"prune{sparsity:g}", [prune]))
        pruned.append(Candidate(f"prune{sparsity:g}+{best.name}", [prune, *_passes_of(config, [])]))
    for c in deadline.evaluate(builder, pruned, executor):
        if c is not None:
            yield _log(c)


def _exclusions(
    builder: _Builder,
    best: Candidate,
    config: dict[str, Any],
    max_excluded: int,
    executor: Executor,
    deadline: Deadline,
) -> Iterator[Candidate]:
    """Keep the most sensitive nodes of ``best``'s mode in fp32, one more at a time (as many
    at a time as the executor runs at once; the list ends at the first that meets). The
    ranking is not cached: with the time spent, none of these is tried (``max_excluded`` of
    them are listed as not tried)."""

    if deadline.spent():
        deadline.not_tried += [f"{best.name}_fp32x{k}" for k in range(1, max_excluded + 1)]
        return
    mode = "static" if config["pass"] == "quantize-static" else "dynamic"
    settings = {k: v for k, v in config.items() if k not in ("pass", "per_channel", "smooth")}
    ranked = sensitivity(  # ranked under the settings of the candidate being repaired
        builder.model,
        builder.score,
        mode=mode,
        calib=builder.calib,
        per_channel=config.get("per_channel", True),
        quant_settings=settings,
        progress=False,
        executor=executor,
    ).ranked_nodes()
    ks = list(range(1, min(max_excluded, len(ranked)) + 1))
    for i in range(0, len(ks), executor.width):
        chunk = [
            Candidate(f"{best.name}_fp32x{k}", _passes_of(config, ranked[:k]))
            for k in ks[i : i + executor.width]
        ]
        for c in deadline.evaluate(builder, chunk, executor):
            if c is not None:
                yield _log(c)
                if c.meets:
                    return


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


# ---------------------------------------------------------------- driver


def auto(
    model: str | os.PathLike,
    data: str | os.PathLike,
    outdir: str | os.PathLike,
    metric: str = "accuracy",
    min_score: float | None = None,
    max_drop: float | None = None,
    min_worst: float | None = None,
    calib: str | os.PathLike | None = None,
    sparsity_grid: list[float] | None = None,
    max_excluded: int = MAX_EXCLUDED,
    max_score_samples: int = 2000,
    bench_runs: int = defaults.AUTO_BENCH_RUNS,
    threads: int = 1,
    target: str | Target = "host",
    executor: Executor | None = None,
    time_budget: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> AutoResult:
    """Search configurations; write the fastest one meeting the budget to OUTDIR/model.onnx.
    Returns the result; ``result.best`` is None when nothing met the budget, and then the
    closest candidate is written instead (``result.written``; None when no candidate was
    scored). ``target`` is the CPU kind the int8 candidates are made for (converter.core.machine).
    ``executor`` builds and scores the candidates (default: in this process; see
    converter.search.tasks); the bench of the candidates always runs here, interleaved on this
    machine. ``time_budget``: seconds of wall time on ``clock``, counted from here, after
    which no new candidate starts (auto_tasks.Deadline)."""
    deadline = Deadline(time_budget, clock)
    budget = _check(metric, min_score, max_drop, min_worst, sparsity_grid, time_budget)
    resolved = resolve_target(target)
    out = Path(outdir)
    fp32 = dense_model(load_model(model))  # a packed input is searched on its dense weights
    _refuse_quantized(fp32, model)
    specs = model_input_specs(fp32)
    dataset = open_data(data, specs)
    if metric == "accuracy" and not dataset.has_labels:
        raise BadInputError(
            f"--metric accuracy needs `labels` in {data}",
            "add labels, or use --metric agreement or cosine",
        )
    out.mkdir(parents=True, exist_ok=True)
    reference = out / "fp32.onnx"
    with atomic_path(reference) as tmp:
        shutil.copyfile(model, tmp)
    if calib is None:
        calib_path, score_path, split = _split(dataset, specs, out / "data", max_score_samples)
    else:
        open_data(calib, specs)
        calib_path, score_path = Path(calib), Path(data)
        split = f"calibration: {calib}; scoring: {data} (all {dataset.num_samples} samples)"
    builder = _Builder(
        fp32, calib_path, score_path, reference, budget, out / "cache", resolved.name
    )
    builder.cache.mkdir(exist_ok=True)
    builder.reference_score = _reference_score(reference, score_path, metric)
    builder.threshold = budget.threshold(builder.reference_score)
    logger.info(
        "budget: %s (fp32 scores %.4f); %s",
        budget.describe(builder.reference_score),
        builder.reference_score,
        split,
    )
    executor = executor or InProcess()
    grid = sorted(sparsity_grid or [])
    candidates = list(_search(builder, grid, max_excluded, executor, deadline))
    result = AutoResult(
        out, budget, builder.reference_score, builder.threshold, candidates, None, split,
        target=resolved, time_budget=_time_summary(deadline, len(candidates)),
    )  # fmt: skip
    result.notes += notes(executor) + _time_note(result.time_budget)
    _bench(result, reference, score_path, bench_runs, threads)
    result.best = _choose(candidates)
    _note_node_errors(result, builder, threads)
    _write_model(result)

    write_auto_outputs(result, model)
    return result


def _write_model(result: AutoResult) -> None:
    """OUTDIR/model.onnx: the chosen candidate or, on a miss, the closest one; none (a stale
    one removed) when no candidate was scored."""
    result.written = result.best or result.closest()
    target = result.outdir / "model.onnx"
    if result.written is None:
        target.unlink(missing_ok=True)
        return
    with atomic_path(target) as tmp:
        shutil.copyfile(result.written.path, tmp)


def _time_summary(deadline: Deadline, tried: int) -> dict[str, Any] | None:
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


def _time_note(summary: dict[str, Any] | None) -> list[str]:
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


def _choose(candidates: list[Candidate]) -> Candidate | None:
    """The fastest candidate meeting the budget; speedups within SPEED_TIE of the fastest
    count as equal (timing noise), and among those the higher score wins."""
    meeting = [c for c in candidates if c.meets and c.speedup is not None]
    if not meeting:
        return None
    fastest = max(c.speedup for c in meeting)
    close = [c for c in meeting if c.speedup >= fastest * (1 - SPEED_TIE)]
    return max(close, key=lambda c: (c.score, c.worst, c.speedup))


def _check(metric, min_score, max_drop, min_worst, sparsity_grid, time_budget=None) -> Budget:
    if metric not in METRICS:
        raise BadInputError(f"unknown metric {metric!r}", f"use one of {', '.join(METRICS)}")
    if min_score is None and max_drop is None:
        raise BadInputError("no budget given", "pass --min-score F and/or --max-drop F")
    for flag, value in (
        ("--min-score", min_score),
        ("--max-drop", max_drop),
        ("--min-worst", min_worst),
    ):
        if value is not None and not -1.0 <= value <= 1.0:
            raise BadInputError(f"{flag} {value} is outside [-1, 1]", f"pass {flag} as a fraction")
    for s in sparsity_grid or []:
        if not 0.0 < s < 1.0:
            raise BadInputError(
                f"sparsity {s} in --sparsity-grid is outside (0, 1)", "e.g. --sparsity-grid 0.3,0.5"
            )
    if time_budget is not None and not (math.isfinite(time_budget) and time_budget > 0):
        raise BadInputError(
            f"--time-budget {time_budget} is not a number of seconds > 0",
            "e.g. --time-budget 600, or leave it out for no limit",
        )
    return Budget(metric, min_score, max_drop, min_worst)


def _refuse_quantized(model: onnx.ModelProto, path: Any) -> None:

    if is_quantized(model):
        raise BadInputError(
            f"{path} is already quantized",
            "give auto the fp32 model; it tries the quantizations itself",
        )


def _reference_score(reference: Path, score: Path, metric: str) -> float:
    """The fp32 model's own score: its accuracy, or 1.0 for fidelity to itself."""
    if metric != "accuracy":
        return 1.0

    report = validate(reference, score, metrics=["accuracy"], progress=False)
    return report.outputs[report.output]["accuracy"].value


def _bench(result: AutoResult, reference: Path, score: Path, runs: int, threads: int) -> None:

    built = [c for c in result.candidates if c.path is not None]
    result.bench = bench(
        [reference] + [c.path for c in built], threads=[threads], warmup=5, runs=runs, data=score
    )
    for i, c in enumerate(built, start=1):
        m = result.bench.get(i, threads)
        c.p50_ms, c.p90_ms, c.speedup = m.latency.p50_ms, m.latency.p90_ms, m.speedup
        c.size = packed_size(c.path)  # what shipping it costs: pruned zeros pack away

    note_unfused_dq(result, built, score, threads)


def _note_node_errors(result: AutoResult, builder: _Builder, threads: int) -> None:
    """The per-tensor error (converter/check/node_error.py) of the chosen candidate, or of the
    closest one when none meets the budget, if it is quantized: against the model its
    quantize pass was given (after its prune/smooth passes), pre-processed as that pass
    does, on the first scoring samples. Stored on the candidate (manifest, report); a failure
    is a report note, not the end of the search."""

    c = result.best or result.closest()
    passes = c.passes if c is not None and c.path is not None else []
    at = next((i for i, p in enumerate(passes) if p["pass"].startswith("quantize")), None)
    if at is None:
        return
    try:
        with quiet_passes():
            before = builder._build(c.passes[:at]) if at else builder.model
            fp32 = prepare_reference(before, c.passes[at].get("preprocess", True))
        feeds = sample_feeds(builder.score, fp32)
        errors = node_errors(fp32, load_model(c.path), feeds, threads)
    except OnnxshipError as e:
        logger.warning("warning: per-tensor error of %s not measured: %s", c.name, e.message)
        result.notes.append(f"per-tensor error of {c.name} not measured: {e.message}")
        return
    samples = sum(len(next(iter(f.values()))) for f in feeds)
    c.node_errors = {"samples": samples, "tensors": [e.to_dict() for e in errors]}


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
        if timed.get("stopped") and not result.candidates:
            what = f"no candidate was tried within --time-budget {timed['seconds']:g} s"
        raise GateFailed(what + "; no model.onnx written", f"{more}see {result.report_md}")
    gates = result.budget.gates(result.reference_score, closest.score, closest.worst)
    raise failure(
        f"no candidate meets {result.budget.describe(result.reference_score)}; closest: "
        f"{closest.name} with {result.budget.metric} {closest.score:.4f} "
        f"({result.miss(closest)}), worst cosine {closest.worst:.4f}, written to model.onnx "
        "all the same; its gates",
        gates,
        f"{more}relax the budget, add --calib data closer to real use, or see {result.report_md}",
        None,
    )
