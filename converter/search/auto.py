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
has passed (converter.search.tasks.Deadline). The calibration data is ``calib`` or, without
it, every fourth sample of ``data`` (at most 256; converter.search.split) — kept apart from the
samples that are scored; the report says which.

This module is the driver; the parts live beside it: ``budget`` (the budget and the checks of
the options), ``split`` (the data split), ``candidates`` (the configurations), ``builder``
(build, score, cache), ``stages`` (the search order), ``result`` (the choice and a miss).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import onnx

from converter.check.bench import bench
from converter.check.node_error import node_errors, prepare_reference, sample_feeds
from converter.check.profile import note_unfused_dq
from converter.check.validate import validate
from converter.core import defaults
from converter.core.data import Dataset, model_input_specs, open_data
from converter.core.defaults import SCORES as METRICS
from converter.core.errors import BadInputError, OnnxshipError
from converter.core.executor import Executor, InProcess
from converter.core.machine import Target, host_target, resolve_target
from converter.core.onnxio import copy_model, load_model
from converter.recipes.auto_report import write_auto_outputs
from converter.search import subset
from converter.search.budget import Budget, check_options
from converter.search.builder import Builder
from converter.search.candidates import (
    CALIBRATED,
    MIN_CALIBRATION,
    SMOOTH_ALPHA,
    Candidate,
    configs,
    failure_reason,
    passes_of,
    uses,
)
from converter.search.result import AutoResult, check_result, choose, time_note, time_summary
from converter.search.split import calibration_split, overlap
from converter.search.stages import SearchLog, search
from converter.search.tasks import Deadline, notes
from passes.base import quiet_passes
from passes.pack import dense_model, packed_size
from passes.quantize import is_quantized
from passes.registry import make_recipe_pass

__all__ = [
    "auto",
    "AutoResult",
    "Budget",
    "Candidate",
    "METRICS",
    "check_result",
    "SMOOTH_ALPHA",
]

logger = logging.getLogger(__name__)

# The names these parts had in this module before it was split (tests and benchmarks read
# them here). auto() reads the configurations through ``_configs``: patching it here narrows
# the search.
_configs, _passes_of, _choose, _Builder = configs, passes_of, choose, Builder


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
    max_excluded: int = defaults.AUTO_MAX_EXCLUDED,
    max_score_samples: int = 2000,
    bench_runs: int = defaults.AUTO_BENCH_RUNS,
    threads: int = 1,
    target: str | Target = "host",
    executor: Executor | None = None,
    time_budget: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    allow_overlap: bool = False,
) -> AutoResult:
    """Search configurations; write the fastest one meeting the budget to OUTDIR/model.onnx.
    Returns the result; ``result.best`` is None when nothing met the budget, and then the
    closest candidate is written instead (``result.written``; None when no candidate was
    scored). ``target`` is the CPU kind the int8 candidates are made for (converter.core.machine).
    ``executor`` builds and scores the candidates (default: in this process; see
    converter.search.tasks); the bench of the candidates always runs here, interleaved on this
    machine. ``time_budget``: seconds of wall time on ``clock``, counted from here, after
    which no new candidate starts (converter.search.tasks.Deadline). ``calib`` and ``data``
    may share samples only with ``allow_overlap`` (the report names it)."""
    deadline = Deadline(time_budget, clock)
    budget = check_options(
        metric, min_score, max_drop, min_worst, sparsity_grid, time_budget,
        max_excluded=max_excluded, bench_runs=bench_runs, threads=threads,
        max_score_samples=max_score_samples,
    )  # fmt: skip
    resolved = resolve_target(target)
    _warn_other_target(resolved)
    out = _check_outdir(outdir)
    fp32 = dense_model(load_model(model))  # a packed input is searched on its dense weights
    _refuse_quantized(fp32, model)
    specs, dataset = _open_data(fp32, data, metric)
    if calib is not None:  # every input checked before the first file is written
        _check_overlap(open_data(calib, specs), dataset, specs, calib, data, allow_overlap)
    with _undone_on_bad_input(out):
        out.mkdir(parents=True, exist_ok=True)
        reference = out / "fp32.onnx"
        copy_model(model, reference)  # with its external data (core/onnxio.py)
        calib_path, score_path, split = _calib_and_score(
            dataset, specs, data, calib, out, max_score_samples
        )
        # the subset each candidate is scored on first (converter.search.subset)
        parts = subset.split_scoring(open_data(score_path, specs), specs, out / "data" / "first")
        builder = Builder(
            fp32, calib_path, score_path, reference, budget, out / "cache", resolved.name, parts
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
        tried = _configs(fp32, resolved.name)
        grid = sorted(sparsity_grid or [])
        log = SearchLog()
        candidates = list(search(builder, tried, grid, max_excluded, executor, deadline, log))
        if not any(c.meets for c in candidates):  # the closest is chosen on whole-set scores
            candidates = [builder.complete(c) for c in candidates]
        result = AutoResult(
            out, budget, builder.reference_score, builder.threshold, candidates, None, split,
            target=resolved, time_budget=time_summary(deadline, len(candidates)),
        )  # fmt: skip
        result.notes += log.notes + notes(executor) + time_note(result.time_budget)
        result.stages = log.stages
        result.notes += _subset_note(candidates, parts)
        result.notes += _calibration_notes(candidates, open_data(calib_path, specs).num_samples)
        if calib is not None and allow_overlap:
            result.split += " (--allow-overlap: calibration samples may also be scored)"
        finalists = _finalists(result)
        log.stage("semantics of the finalists", len(finalists), known=True)
        for c in finalists:
            builder.measure_semantics(c)
        log.stage("bench of the finalists", len(finalists), known=True)
        _bench(result, finalists, reference, score_path, bench_runs, threads)
        result.best = choose(candidates)
        log.stage("per-tensor error of the chosen model", 1, known=True)
        _note_node_errors(result, builder, threads)
        log.end()
        _write_model(result)

        write_auto_outputs(result, model)
    return result


def _check_outdir(outdir: str | os.PathLike) -> Path:
    out = Path(outdir)
    if out.exists() and not out.is_dir():
        raise BadInputError(
            f"-o {out} is a file, not a folder",
            "give a folder: auto writes model.onnx, its report and a cache there",
        )
    return out


@contextlib.contextmanager
def _undone_on_bad_input(out: Path) -> Iterator[None]:
    """On a bad input found inside (exit 2), remove what this run added: ``out`` (and the
    folders made above it) when it did not exist, else every file and folder in it that did
    not; a file that was there before is never removed."""
    top = out.absolute()
    while not top.parent.exists():
        top = top.parent
    before = set(out.rglob("*")) if out.exists() else None
    try:
        yield
    except OnnxshipError as e:
        if e.exit_code == 2:
            _remove_new(top if before is None else out, before)
        raise


def _remove_new(folder: Path, before: set[Path] | None) -> None:
    """Remove ``folder`` whole (``before`` None), or what in it is not in ``before``."""
    new = [folder] if before is None else sorted(set(folder.rglob("*")) - before, reverse=True)
    for path in new:  # deepest first
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        except OSError as e:  # the bad input is what to report; this is a warning
            logger.warning("warning: could not remove %s: %s", path, e)


def _open_data(fp32: onnx.ModelProto, data: str | os.PathLike, metric: str) -> tuple[list, Dataset]:
    """The model's input specs and the scoring data, checked against them (and for labels
    when the metric is accuracy)."""
    specs = model_input_specs(fp32)
    dataset = open_data(data, specs)
    if metric == "accuracy" and not dataset.has_labels:
        raise BadInputError(
            f"--metric accuracy needs `labels` in {data}",
            "add labels, or use --metric agreement or cosine",
        )
    return specs, dataset


def _calib_and_score(
    dataset: Dataset,
    specs: list,
    data: str | os.PathLike,
    calib: str | os.PathLike | None,
    out: Path,
    max_score: int,
) -> tuple[Path, Path, str]:
    """The calibration and scoring data: ``calib`` and all of ``data``, or without ``calib``
    the split of ``data`` into OUTDIR/data (converter.search.split); and what the report
    says about them."""
    if calib is None:
        return calibration_split(dataset, specs, out / "data", max_score)
    split = f"calibration: {calib}; scoring: {data} (all {dataset.num_samples} samples)"
    return Path(calib), Path(data), split


def _check_overlap(
    calib: Dataset, data: Dataset, specs: list, calib_path: Any, data_path: Any, allowed: bool
) -> None:
    """Refuse calibration samples that are also scored, unless the user allows it."""
    if allowed:
        return
    shared = overlap(calib, data, specs)
    if shared:
        raise BadInputError(
            f"{shared} of the {calib.num_samples} samples in --calib {calib_path} are also in "
            f"--data {data_path}: a candidate scored on its own calibration samples looks "
            "better than it is",
            "give calibration and scoring samples that do not overlap, or pass "
            "--allow-overlap to score them anyway (the report says so)",
        )


def _calibration_notes(candidates: list[Candidate], samples: int) -> list[str]:
    """How many samples calibrated the candidates that need them, and a warning for each
    method given fewer than it needs (candidates.MIN_CALIBRATION)."""
    for c in candidates:
        if any(p["pass"] in CALIBRATED for p in c.passes):
            c.calib_samples = samples
    found = []
    for method, (least, why) in MIN_CALIBRATION.items():
        short = [c.name for c in candidates if c.calib_samples and uses(c, method)]
        if short and samples < least:
            text = (
                f"{method} calibrated on {samples} samples, fewer than the {least} it needs "
                f"({why}): {', '.join(short)} may score below what it can reach — give "
                f"--calib with at least {least} samples"
            )
            logger.warning("warning: %s", text)
            found.append(text)
    return found


def _subset_note(candidates: list[Candidate], parts: subset.ScoreParts | None) -> list[str]:
    """How many candidates were decided on the subset (converter.search.subset)."""
    decided = [c.name for c in candidates if c.subset]
    if parts is None:
        return []
    rest = parts.total - parts.samples
    if not decided:
        return [
            f"every candidate was scored on all {parts.total} scoring samples (none was "
            f"decided on the {parts.samples} scored first)"
        ]
    verb = "was" if len(decided) == 1 else "were"
    return [
        f"{len(decided)} of {len(candidates)} candidates {verb} decided on {parts.samples} "
        f"evenly spaced of the {parts.total} scoring samples: each misses the budget whatever "
        f"the other {rest} would score, and no decision read its score ({', '.join(decided)}; "
        "their rows say why); the others were scored on all of them"
    ]


def _write_model(result: AutoResult) -> None:
    """OUTDIR/model.onnx: the chosen candidate or, on a miss, the closest one; none (a stale
    one removed) when no candidate was scored."""
    result.written = result.best or result.closest()
    target = result.outdir / "model.onnx"
    if result.written is None:
        target.unlink(missing_ok=True)
        return
    copy_model(result.written.path, target)  # with its external data, if any


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


def _bench(
    result: AutoResult,
    built: list[Candidate],
    reference: Path,
    score: Path,
    runs: int,
    threads: int,
) -> None:
    """The finalists benched interleaved with fp32: every candidate meeting the budget, or
    on a miss the closest one (a candidate that misses cannot be chosen: its latency would
    only cost time). A candidate the bench cannot run is marked failed (its reason in the
    report) and the others are benched without it."""
    left = sum(c.path is not None for c in result.candidates) - len(built)
    if left:
        result.notes.append(
            f"{left} candidate{'s' if left > 1 else ''} missing the budget "
            f"{'were' if left > 1 else 'was'} not benched (only finalists are)"
        )
    try:
        result.bench = _interleaved(reference, built, score, runs, threads)
    except (OSError, MemoryError):
        raise
    except Exception:  # which candidate? each alone, one run; then the others again
        runnable = [c for c in built if _runs_alone(c, reference, score, threads)]
        if len(runnable) == len(built):  # not one candidate's failure: fp32's, the data's
            raise
        built = runnable
        result.bench = _interleaved(reference, built, score, runs, threads)
    for i, c in enumerate(built, start=1):
        m = result.bench.get(i, threads)
        c.p50_ms, c.p90_ms, c.speedup = m.latency.p50_ms, m.latency.p90_ms, m.speedup
    with quiet_passes():  # "nothing to pack" once per candidate says nothing here
        for c in result.candidates:
            if c.path is not None and not c.error:  # what shipping it costs: zeros pack away
                c.size = packed_size(c.path)
    try:
        note_unfused_dq(result, built, score, threads)
    except (OSError, MemoryError):
        raise
    except Exception as e:  # a report note, not the end of the search
        _note_failure(result, "the unfused-DequantizeLinear profile was not measured", e)


def _finalists(result: AutoResult) -> list[Candidate]:
    """The candidates worth a latency: those meeting the budget, else the closest one."""
    built = [c for c in result.candidates if c.path is not None and not c.error]
    meeting = [c for c in built if c.meets]
    if meeting:
        return meeting
    closest = result.closest()
    return [closest] if closest is not None and closest.path is not None else []


def _warn_other_target(target: Target) -> None:
    """One warning for the whole search when the candidates are made for another CPU kind
    than this host (validate and bench, called per candidate, stay quiet about it)."""
    host = host_target()
    if target.name != host.name:
        logger.warning(
            "warning: the candidates are made for target %s, but this host is %s: their "
            "latency and int8 scores here are not what the target CPU will give",
            target.name, host.name,
        )  # fmt: skip


def _interleaved(reference: Path, built: list[Candidate], score: Path, runs: int, threads: int):
    paths = [reference] + [c.path for c in built]
    return bench(paths, threads=[threads], warmup=5, runs=runs, data=score, warn_target=False)


def _runs_alone(c: Candidate, reference: Path, score: Path, threads: int) -> bool:
    """Whether the bench runs ``c`` (one run beside fp32); if not, ``c`` is marked failed."""
    try:
        paths = [reference, c.path]
        bench(paths, threads=[threads], warmup=0, runs=1, data=score, warn_target=False)
        return True
    except (OSError, MemoryError):
        raise
    except Exception as e:
        c.error, c.meets = f"the bench failed: {failure_reason(e)}", False
        logger.warning("warning: candidate %s: %s", c.name, c.error)
        return False


def _note_failure(result: AutoResult, what: str, e: Exception) -> None:
    logger.warning("warning: %s: %s", what, failure_reason(e))
    logger.debug("%s", what, exc_info=e)
    result.notes.append(f"{what}: {failure_reason(e)}")


def _note_node_errors(result: AutoResult, builder: Builder, threads: int) -> None:
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
            before = builder.build(c.passes[:at]) if at else builder.model
            # normalized as the pass takes it (Constant weights moved, opset upgraded, nodes
            # named): a paddle2onnx model's names and opset are otherwise not the int8 one's
            entry = c.passes[at]
            settings = {k: v for k, v in entry.items() if k != "pass"}
            before, _ = make_recipe_pass(entry["pass"], settings, builder.calib).accept(before)
            fp32 = prepare_reference(before, entry.get("preprocess", True))
        feeds = sample_feeds(builder.score, fp32)
        errors = node_errors(fp32, load_model(c.path), feeds, threads)
    except (OSError, MemoryError):
        raise
    except Exception as e:  # a report note, not the end of the search
        _note_failure(result, f"per-tensor error of {c.name} not measured", e)
        return
    samples = sum(len(next(iter(f.values()))) for f in feeds)
    c.node_errors = {"samples": samples, "tensors": [e.to_dict() for e in errors]}
