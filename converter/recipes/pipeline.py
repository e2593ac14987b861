"""``onnxship run RECIPE.toml``: export → passes → validate → bench → manifest and report.

Each step logs progress; a failing step names the steps already done, and the artifacts of
those steps stay in OUTDIR. Model artifacts are deterministic (same recipe and inputs →
same bytes and hashes); reports hold timings, which are not.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from converter.check.bench import bench
from converter.check.validate import validate
from converter.core.data import Dataset, model_input_specs
from converter.core.defaults import DEFAULT_OPSET, EXPORT_ATOL, EXPORT_RTOL
from converter.core.errors import BadInputError, OnnxshipError
from converter.core.executor import make_executor
from converter.core.gates import failure
from converter.core.onnxio import atomic_write_text, copy_model, load_model, save_model
from converter.recipes.checks import check_against_model
from converter.recipes.report import build_manifest, write_reports
from converter.recipes.schema import Recipe, Variant, load_recipe, to_plain
from converter.torch.export import export
from converter.torch.shrink import shrink, shrink_settings
from passes import PassRunner
from passes.registry import make_recipe_pass

__all__ = ["run_recipe", "RunResult", "ArtifactResult", "build_passes"]

logger = logging.getLogger(__name__)

REFERENCE = "fp32"
# what a run writes besides the models, the manifest last; removed from OUTDIR first
RUN_OUTPUTS = ("manifest.json", "report.md", "report.html")
_TARGETED = ("quantize", "quantize-dynamic", "quantize-static")  # passes that take `target`


@dataclass
class ArtifactResult:
    """One model of the run: the fp32 reference or a variant."""

    name: str
    path: Path
    passes: list[dict[str, Any]] = field(default_factory=list)
    validation: Any = None  # converter.check.validate.ValidationReport
    bench: Any = None  # the per-model part of converter.check.bench.BenchReport


@dataclass
class RunResult:
    recipe: Recipe
    outdir: Path
    artifacts: list[ArtifactResult]
    bench: Any = None
    manifest: Path | None = None
    report_md: Path | None = None
    report_html: Path | None = None
    export_report: Any = None
    timings: dict[str, float] = field(default_factory=dict)
    labelled: bool | None = None  # whether the validation data has labels (None: no data)

    @property
    def passed(self) -> bool:
        return all(a.validation is None or a.validation.passed for a in self.artifacts)

    def gates(self) -> list:
        """Every variant's gates, each named ``<variant>.<output>``."""

        return [
            replace(g, output=f"{a.name}.{g.output}")
            for a in self.artifacts
            if a.validation is not None
            for g in a.validation.gates
        ]

    def failed_gates(self) -> list[str]:
        return [
            f"{a.name}: {g.describe()}"
            for a in self.artifacts
            if a.validation is not None
            for g in a.validation.failed
        ]


def build_passes(variant: Variant, recipe: Recipe) -> list:
    """The pass objects of one variant; settings are checked by each pass's constructor."""

    built = []
    for i, entry in enumerate(variant.passes):
        settings = {k: v for k, v in entry.items() if k != "pass"}
        if entry["pass"] in _TARGETED:
            settings.setdefault("target", recipe.target)
        try:
            built.append(make_recipe_pass(entry["pass"], settings, recipe.data.calibration))
        except BadInputError as e:
            e.what = f"recipe variant {variant.name!r} pass {i + 1} ({entry['pass']}): {e.what}"
            raise
    return built


class _Steps:
    """Runs named steps, timing each; on failure names the steps already done."""

    def __init__(self, timings: dict[str, float]) -> None:
        self.done: list[str] = []
        self.timings = timings

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        logger.info("[%d] %s", len(self.done) + 1, name)
        start = time.perf_counter()
        try:
            value = fn()
        except OnnxshipError as e:
            done = ", ".join(self.done) or "none"
            e.what = f"step '{name}' failed (done: {done}; their artifacts are kept): {e.what}"
            raise
        self.timings[name] = round(time.perf_counter() - start, 3)
        self.done.append(name)
        return value


def run_recipe(
    recipe_path: str | os.PathLike, outdir: str | os.PathLike | None = None
) -> RunResult:
    recipe = load_recipe(recipe_path)
    for variant in recipe.variants:  # every pass setting is checked before anything runs
        build_passes(variant, recipe)
        if variant.shrink is not None:
            shrink_settings(variant.shrink, f"variant {variant.name!r} shrink")
    if recipe.model.onnx is not None:  # data files, labels, bench dims: against its inputs
        check_against_model(recipe, _input_specs(recipe.model.onnx))
    out = Path(outdir) if outdir is not None else Path("build") / recipe.name
    _prepare_outdir(out, recipe)
    result = RunResult(recipe, out, [])
    steps = _Steps(result.timings)
    reference = steps.run("export fp32 reference", lambda: _reference(recipe, out, result))
    result.artifacts.append(reference)
    if recipe.model.spec is not None:  # now that its code ran (it may write the data)
        steps.run("check data", lambda: check_against_model(recipe, _input_specs(reference.path)))
    for variant in recipe.variants:
        result.artifacts.append(
            steps.run(f"variant {variant.name}", lambda v=variant: _variant(v, recipe, out))
        )
    if recipe.data.validation is not None:
        steps.run("validate", lambda: _validate_all(result))
    steps.run("bench", lambda: _bench_all(result))
    steps.run("manifest and report", lambda: _write_outputs(result))
    return result


def _prepare_outdir(out: Path, recipe: Recipe) -> None:
    if out.exists() and not out.is_dir():
        raise BadInputError(f"output {out} is a file", "give a folder with -o")
    sources = [recipe.path, recipe.model.onnx, recipe.data.calibration, recipe.data.validation]
    for src in sources:
        if src is not None and Path(src).resolve().parent == out.resolve():
            raise BadInputError(
                f"output folder {out} holds the input {src}",
                "write the run to another folder with -o",
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInputError(
            f"cannot create output folder {out} ({e.strerror})",
            "choose a folder you can write to with -o",
        ) from e
    for name in RUN_OUTPUTS:  # an earlier run's: they would describe other artifacts
        (out / name).unlink(missing_ok=True)


def _input_specs(path: Path) -> list:
    return model_input_specs(load_model(path, external_data=False))


def _reference(recipe: Recipe, out: Path, result: RunResult) -> ArtifactResult:
    path = out / f"{REFERENCE}.onnx"
    m = recipe.model
    if m.onnx is not None:  # with its external data (one file below 2 GB)
        return ArtifactResult(REFERENCE, copy_model(m.onnx, path))

    exported = export(
        m.spec,
        path,
        m.inputs,
        weights=m.weights,
        example=m.example,
        dims=m.dims,
        output_names=m.output_names,
        exporter=m.exporter,
        opset=m.opset or DEFAULT_OPSET,
        atol=EXPORT_ATOL if m.atol is None else m.atol,
        rtol=EXPORT_RTOL if m.rtol is None else m.rtol,
        accept_traced_branches=m.accept_traced_branches,
    )
    result.export_report = exported.report
    return ArtifactResult(REFERENCE, path)


def _variant(variant: Variant, recipe: Recipe, out: Path) -> ArtifactResult:

    passes = build_passes(variant, recipe)
    records, source = [], out / f"{REFERENCE}.onnx"
    if variant.shrink is not None:
        source, record = _shrink(variant, recipe, out)
        records.append(record)
    model, results = PassRunner(passes).run(load_model(source))
    path = save_model(model, out / f"{variant.name}.onnx")
    records += [
        {"pass": p.name, "settings": to_plain(p.settings()), "stats": r.stats}
        for p, r in zip(passes, results)
    ]
    return ArtifactResult(variant.name, path, passes=records)


def _shrink(variant: Variant, recipe: Recipe, out: Path) -> tuple[Path, dict[str, Any]]:
    """Structured pruning + distillation of the recipe's PyTorch model (`onnxship shrink`),
    exported and verified to OUTDIR/<variant>.shrunk.onnx; the variant's passes start there."""

    prune, distill, options = shrink_settings(variant.shrink, f"variant {variant.name!r} shrink")
    m = recipe.model
    path = out / f"{variant.name}.shrunk.onnx"
    result = shrink(
        m.spec,
        path,
        m.inputs,
        variant.shrink["data"],
        weights=m.weights,
        prune=prune,
        distill=distill,
        options=options,
    )
    report = result.report.to_dict()
    stats = {k: report[k] for k in ("params", "macs", "file_size", "scores", "seconds")}
    return path, {"pass": "shrink", "settings": to_plain(variant.shrink), "stats": stats}


def _validate_all(result: RunResult) -> None:

    with make_executor(result.recipe.executor, result.recipe.ray_address) as executor:
        _validate_each(result, executor)


def _validate_each(result: RunResult, executor: Any) -> None:

    gates = result.recipe.gates
    data = result.recipe.data.validation
    reference = result.artifacts[0]
    result.labelled = Dataset(data).has_labels
    if result.labelled:  # without labels the reference has nothing to be scored against
        reference.validation = validate(reference.path, data, progress=False, executor=executor)
    for artifact in result.artifacts[1:]:
        artifact.validation = validate(
            artifact.path,
            data,
            reference=reference.path,
            metrics=_metrics(gates, result),
            min_score=gates.min_score,
            max_drop=gates.max_drop,
            min_worst=gates.min_worst,
            progress=False,
            executor=executor,
        )


def _metrics(gates: Any, result: RunResult) -> list[str]:
    """The recipe's metrics (their labels checked at load), else accuracy (when the data has
    labels), agreement, cosine."""
    if gates.metrics:
        return list(gates.metrics)
    return (["accuracy"] if result.labelled else []) + ["agreement", "cosine"]


def _bench_all(result: RunResult) -> None:

    b = result.recipe.bench
    data = result.recipe.data.validation
    result.bench = bench(
        [a.path for a in result.artifacts],
        threads=b.threads,
        warmup=b.warmup,
        runs=b.runs,
        seconds=b.seconds,
        data=data,
        dims=b.dims,
        progress=False,
    )


def _write_outputs(result: RunResult) -> None:
    """The reports, then the manifest, last and atomically: a manifest in OUTDIR always
    describes the files beside it (an interrupted run leaves none)."""
    manifest = build_manifest(result)
    result.report_md, result.report_html = write_reports(result, manifest)
    result.manifest = atomic_write_text(
        result.outdir / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    )


def check_gates(result: RunResult) -> None:
    """Raise GateFailed naming every failed gate of every variant (after the report is
    written)."""

    gates = result.gates()
    if not all(g.passed for g in gates):
        raise failure(
            "gates",
            gates,
            f"see {result.report_md} for the numbers; relax [gates] or change the variants",
            None,
            label=True,
        )
