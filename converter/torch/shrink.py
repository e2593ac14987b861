"""``onnxship shrink``: structured pruning + distillation recovery + verified export.

Steps, each its own function: load the module and the data (split into training and
held-out samples), prune whole channels/neurons with torch-pruning (converter.torch.structured),
recover by distilling from the unpruned model (converter.torch.distill), export and verify with
the functions ``export`` uses (converter.torch.export), then measure: params, MACs, file size,
latency before/after (interleaved, batch 1, converter.check.bench) and the held-out
accuracy/fidelity of the unpruned, the pruned and the distilled model.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from converter.check.bench import bench, check_plot_path
from converter.core import metrics
from converter.core.data import LABELS, Dataset, InputSpec
from converter.core.defaults import DEFAULT_OPSET, EXPORT_ATOL, EXPORT_RTOL
from converter.core.errors import BadInputError, DataError
from converter.core.inputs import parse_input_spec
from converter.core.metrics import speedup
from converter.core.onnxio import atomic_path, atomic_write_text, check_output_path
from converter.core.render import mb
from converter.torch import export as exporter

if TYPE_CHECKING:  # torch-side classes: imported at run time only when shrink runs
    from converter.torch.distill import DistillSettings
    from converter.torch.structured import PruneSettings

__all__ = [
    "shrink",
    "shrink_settings",
    "ShrinkResult",
    "ShrinkReport",
    "ShrinkOptions",
    "plot_loss",
    "write_json",
]

logger = logging.getLogger(__name__)

TRACE_SAMPLES = 2  # samples in the example traced by torch-pruning and the MAC counter


@dataclass(frozen=True)
class ShrinkOptions:
    """Everything but the pruning and distillation settings: ``held_out`` fraction of the
    samples kept out of training (early stopping and the report); export options as
    ``export`` takes them; ``bench_runs`` timed runs per model for the latency (0 skips
    it); ``progress`` shows the tqdm bar."""

    held_out: float = 0.2
    opset: int = DEFAULT_OPSET
    exporter: str = "auto"
    atol: float = EXPORT_ATOL
    rtol: float = EXPORT_RTOL
    bench_runs: int = 200
    progress: bool = True


@dataclass
class ShrinkReport:
    """Every number of one shrink run; ``scores`` holds, per model (unpruned, pruned,
    distilled), the held-out metrics against the labels and the unpruned model."""

    path: Path
    settings: dict
    samples: dict
    params: dict
    macs: dict
    file_size: dict
    latency_ms: dict
    scores: dict
    pruned_layers: dict
    kept_whole: list[str]
    history: Any
    seconds: dict
    export: Any = field(repr=False, default=None)

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("export", "history")}
        out["path"] = str(self.path)
        out["history"] = asdict(self.history)
        out["verification"] = [
            {"label": c.label, "ok": c.ok, "outputs": [asdict(o) for o in c.outputs]}
            for c in self.export.comparisons
        ]
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=_plain) + "\n"

    def summary(self) -> str:
        return _summary(self)


class ShrinkResult(NamedTuple):
    """``path, report, model = converter.shrink(...)``: the ONNX file, every number, and the
    pruned and distilled torch module; path and report are None on torchrun ranks other
    than 0 (rank 0 writes)."""

    path: Path | None
    report: ShrinkReport | None
    model: Any = None


def shrink_settings(settings: dict, where: str) -> tuple:
    """(PruneSettings, DistillSettings, ShrinkOptions) from one flat table of a recipe
    (`keep`, `epochs`, `held_out`, ...; its `data` is the caller's); an unknown key names the
    allowed ones. The bench of shrink itself is off: the recipe's bench measures every
    variant."""

    mods = import_torch_side()
    kinds = (mods.structured.PruneSettings, mods.distill.DistillSettings, ShrinkOptions)
    allowed = {f.name: kind for kind in kinds for f in fields(kind)}
    unknown = sorted(set(settings) - set(allowed) - {"data"})
    if unknown:
        raise BadInputError(f"{where}: unknown key(s) {unknown}", f"use {sorted(allowed)}")
    parts = {kind: {} for kind in kinds}
    for key, value in settings.items():
        if key != "data":
            parts[allowed[key]][key] = tuple(value) if key == "ignore" else value
    parts[ShrinkOptions].setdefault("bench_runs", 0)
    parts[ShrinkOptions].setdefault("progress", False)
    return tuple(kind(**parts[kind]) for kind in kinds)


def shrink(
    spec: str,
    output: str | os.PathLike,
    inputs: Sequence[InputSpec | str],
    data: str | os.PathLike,
    *,
    weights: str | os.PathLike | None = None,
    prune: PruneSettings | None = None,
    distill: DistillSettings | None = None,
    options: ShrinkOptions | None = None,
) -> ShrinkResult:
    """Prune ``file.py:callable`` to ``prune.keep`` of its channels, distill it back from
    the unpruned model on ``data``, export and verify it to ``output``. ``prune`` is a
    converter.torch.structured.PruneSettings, ``distill`` a converter.torch.distill.DistillSettings
    (defaults when None)."""
    mods = import_torch_side()
    options = options or ShrinkOptions()
    prune = prune or mods.structured.PruneSettings()
    distill = distill or mods.distill.DistillSettings()
    specs = _check(inputs, prune, distill, options)
    out = check_output_path(output, weights, data, spec.rpartition(":")[0])
    model = mods.torchload.load_module(spec)
    if weights is not None:
        mods.torchload.load_weights(model, weights)
    _check_forward_arity(model, specs)
    mods.structured.ignored_layers(model, prune)  # a bad --ignore fails before any work
    train, held = _load_split(data, specs, options.held_out, distill.seed)
    where = mods.distill.world()
    if not where.main:  # rank 0 speaks for the job
        logging.getLogger("converter").setLevel(logging.WARNING)
    try:
        state = _shrink_model(model, specs, train, held, prune, distill, options, where)
    finally:
        where.close()
    if not where.main:
        return ShrinkResult(None, None, state.student)
    return _export_and_measure(state, out, specs, data, prune, distill, options)


class _TorchSide(NamedTuple):
    torchload: Any
    structured: Any
    distill: Any


def import_torch_side() -> _TorchSide:
    """The torch-side modules, or a BadInputError naming the extra to install."""
    try:
        import torch_pruning  # noqa: F401

        from converter.torch import distill, structured
        from converter.torch import load as torchload
    except ImportError as e:
        raise BadInputError(
            f"shrink needs PyTorch and torch-pruning ({e.name} is not installed)",
            "pip install 'onnxship[torch,shrink]'",
        ) from e
    return _TorchSide(torchload, structured, distill)


def _check(inputs, prune, distill, options: ShrinkOptions) -> list[InputSpec]:

    specs = [parse_input_spec(s) if isinstance(s, str) else s for s in inputs]
    exporter.check_options(specs, options.exporter, options.opset, options.atol, options.rtol)
    prune.check()
    finite = "a finite number"
    checks = [  # flag, value, what it must be, whether it is, an example
        ("--temperature", distill.temperature, f"{finite} > 0", lambda v: v > 0, "4"),
        ("--alpha", distill.alpha, "a number in [0, 1]", lambda v: 0 <= v <= 1, "0.5"),
        ("--lr", distill.lr, f"{finite} > 0", lambda v: v > 0, "1e-3"),
        ("--held-out", options.held_out, "a number in (0, 1)", lambda v: 0 < v < 1, "0.2"),
        ("--epochs", distill.epochs, "a whole number ≥ 1", _count(1), "10"),
        ("--steps", distill.steps, "a whole number ≥ 1", _count(1), "100"),
        ("--batch-size", distill.batch_size, "a whole number ≥ 1", _count(1), "64"),
        ("--patience", distill.patience, "a whole number ≥ 0", _count(0), "3"),
        ("--bench-runs", options.bench_runs, "a whole number ≥ 0", _count(0), "200"),
    ]
    for flag, value, what, holds, example in checks:
        if value is None and flag == "--steps":
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (number and math.isfinite(value) and holds(value)):
            raise BadInputError(f"{flag} {value} is not {what}", f"e.g. {flag} {example}")
    return specs


def _count(low: int):
    """Whether a value is a whole number ≥ ``low`` (a float such as 2.0 is not)."""
    return lambda v: isinstance(v, int) and v >= low


def _check_forward_arity(model, specs: Sequence[InputSpec]) -> None:
    """The module's forward must take as many tensors as there are --input."""

    params = list(inspect.signature(model.forward).parameters.values())
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    if not len(required) <= len(specs) <= len(positional):
        names = [p.name for p in positional]
        raise BadInputError(
            f"the model's forward takes {names}, --input gives {[s.name for s in specs]}",
            "give one --input per forward() argument, in order",
        )


def _load_split(data, specs, held_out: float, seed: int) -> tuple[dict, dict]:
    """Every sample of ``data`` as tensors, split by a seeded permutation."""
    import torch

    dataset = Dataset(data)
    dataset.check(specs)
    if dataset.num_samples < 2:
        raise DataError(
            f"data {data} holds {dataset.num_samples} sample", "give at least 2 samples"
        )
    batches = list(dataset.batches(specs, 4096, check_finite=True, with_labels=True))
    arrays = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    order = np.random.default_rng(seed).permutation(dataset.num_samples)
    cut = min(max(1, round(held_out * dataset.num_samples)), dataset.num_samples - 1)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    if LABELS in tensors:
        tensors[LABELS] = tensors[LABELS].long()
    held = {k: v[order[:cut]] for k, v in tensors.items()}
    train = {k: v[order[cut:]] for k, v in tensors.items()}
    logger.debug("%d training samples, %d held out", len(order) - cut, cut)
    return train, held


@dataclass
class _State:
    teacher: Any
    student: Any
    scores: dict
    params: dict
    macs: dict
    prune_stats: dict
    history: Any
    seconds: dict
    samples: dict


def _shrink_model(model, specs, train, held, prune, distill, options, where) -> _State:
    """Prune, score, distill, score: the PyTorch part, run on every torchrun rank."""
    from converter.torch import distill as kd
    from converter.torch import structured

    names = [s.name for s in specs]
    example = [held[n][:TRACE_SAMPLES] for n in names]
    teacher = copy.deepcopy(model).eval()
    one = [t[:1] for t in example]
    macs_before, params_before = structured.count(teacher, one)
    scores = {"unpruned": _score(teacher, teacher, held, names)}
    started = time.perf_counter()
    stats = structured.prune_structured(
        model, example, prune, _taylor_loss(teacher, train, names, distill)
    )
    pruned_s = time.perf_counter() - started
    scores["pruned"] = _score(model, teacher, held, names)
    history = kd.distill(model, teacher, train, held, names, distill, options.progress, where)
    scores["distilled"] = _score(model, teacher, held, names)
    macs_after, params_after = structured.count(model, one)
    return _State(
        teacher,
        model.eval(),
        scores,
        {"before": params_before, "after": params_after},
        {"before": macs_before, "after": macs_after},
        stats,
        history,
        {"prune": pruned_s, "distill": time.perf_counter() - started - pruned_s},
        {"train": len(next(iter(train.values()))), "held_out": len(next(iter(held.values())))},
    )


def _taylor_loss(teacher, train, names, distill):
    """The loss whose gradient Taylor importance ranks by: kd_loss on one training batch."""
    from converter.torch.distill import kd_loss

    def loss(model):
        batch = {k: v[: distill.batch_size] for k, v in train.items()}
        with _no_grad():
            want = teacher(*(batch[n] for n in names))
        got = model(*(batch[n] for n in names))
        return kd_loss(got, want, distill.temperature, batch.get(LABELS), distill.alpha)

    return loss


def _no_grad():
    import torch

    return torch.no_grad()


def _score(model, teacher, held: dict, names: list[str]) -> dict:
    """Held-out metrics of ``model``: accuracy (with labels), agreement and mean cosine with
    the unpruned model; the numbers come from converter.core.metrics."""
    from converter.torch.distill import predict

    got, want = predict(model, held, names).numpy(), predict(teacher, held, names).numpy()
    out = {
        "agreement": metrics.agreement(got, want),
        "cosine": float(np.mean(metrics.per_sample_cosine(got, want))),
    }
    if LABELS in held:
        out["accuracy"] = metrics.accuracy(got, held[LABELS].numpy())
    return out


def _export_and_measure(state: _State, out: Path, specs, data, prune, distill, options):
    """Export both models exactly as ``export`` does (checker, shape inference, verification
    against torch), bench them interleaved, then move the pruned model into place; nothing
    is written to ``out`` on any failure."""
    feeds, dims = exporter.example_inputs(specs, {}, data, 0)
    settings = exporter.ExportSettings(options.exporter, options.opset, options.atol, options.rtol)
    with tempfile.TemporaryDirectory(prefix=".onnxship-", dir=out.parent) as tmp:
        before = Path(tmp) / "unpruned.onnx"
        exporter.export_module(state.teacher, before, specs, feeds, dims, settings)
        after_path = Path(tmp) / out.name
        report = exporter.export_module(
            state.student, after_path, specs, feeds, dims, settings
        ).report
        report.path = out
        latency = _latency(before, after_path, data, options.bench_runs)
        result = ShrinkReport(
            path=out,
            settings={"prune": asdict(prune), "distill": asdict(distill), **asdict(options)},
            samples=state.samples,
            params=state.params,
            macs=state.macs,
            file_size={"before": before.stat().st_size, "after": after_path.stat().st_size},
            latency_ms=latency,
            scores=state.scores,
            pruned_layers=state.prune_stats["layers"],
            kept_whole=state.prune_stats["kept_whole"],
            history=state.history,
            seconds=state.seconds,
            export=report,
        )
        exporter.move_into_place(after_path, out)
    return ShrinkResult(out, result, state.student)


def _latency(before: Path, after: Path, data, runs: int) -> dict:
    """p50 latency (ms) of both models, batch 1, one thread, interleaved in one run."""
    if runs == 0:
        return {}

    report = bench([before, after], threads=(1,), runs=runs, data=data)
    p50 = [report.get(i, 1).latency.p50_ms for i in (0, 1)]
    return {
        "before": p50[0],
        "after": p50[1],
        "speedup": speedup(p50[0], p50[1]),
        "threads": 1,
        "batch": 1,
        "runs": runs,
        "cpu": report.machine.get("cpu", ""),
    }


def _plain(obj):
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _ratio(before: float, after: float) -> str:
    return f"{after / before:.2f}x" if before else "n/a"


def _summary(r: ShrinkReport) -> str:
    keep = r.settings["prune"]["keep"]
    lines = [
        f"shrunk to {r.path} (--keep {keep:g}, {len(r.pruned_layers)} layers pruned, "
        f"kept whole: {', '.join(r.kept_whole) or 'none'})",
        f"  params {r.params['before']:,} → {r.params['after']:,} "
        f"({_ratio(r.params['before'], r.params['after'])})",
        f"  MACs   {r.macs['before']:,} → {r.macs['after']:,} "
        f"({_ratio(r.macs['before'], r.macs['after'])}), batch 1",
        f"  size   {mb(r.file_size['before'])} → {mb(r.file_size['after'])}",
    ]
    if r.latency_ms:
        lat = r.latency_ms
        lines.append(
            f"  latency p50 {lat['before']:.3f} ms → {lat['after']:.3f} ms: "
            f"{lat['speedup']:.2f}x faster (interleaved, batch 1, 1 thread, {lat['cpu']})"
        )
    lines.append(
        f"  held-out scores ({r.samples['held_out']} samples; trained on {r.samples['train']}):"
    )
    metrics = [m for m in ("accuracy", "agreement", "cosine") if m in r.scores["unpruned"]]
    lines.append("    " + f"{'model':<34}" + "".join(f"{m:>11}" for m in metrics))
    titles = {
        "unpruned": "unpruned",
        "pruned": "pruned, no distillation",
        "distilled": "pruned + distilled",
    }
    for key, title in titles.items():
        lines.append(
            "    " + f"{title:<34}" + "".join(f"{r.scores[key][m]:>11.4f}" for m in metrics)
        )
    h = r.history
    lines.append(
        f"  distillation: {len(h.train_loss)} steps, best held-out loss {min(h.eval_loss):.4f} "
        f"at step {h.best_step}{' (stopped early)' if h.stopped_early else ''}; "
        f"prune {r.seconds['prune']:.1f} s, distill {r.seconds['distill']:.1f} s"
    )
    for comp in r.export.comparisons:
        worst = max((o.max_abs for o in comp.outputs), default=0.0)
        lines.append(
            f"  verified vs torch on {comp.label}: max abs {worst:.3g} (atol {comp.atol:g})"
        )
    return "\n".join(lines)


def plot_loss(report: ShrinkReport, out: str | os.PathLike) -> Path:
    """The distillation loss curve (training loss per step, held-out loss where scored);
    png, svg or pdf from the suffix. Needs matplotlib."""

    fmt = check_plot_path(out)
    from matplotlib.figure import Figure

    h = report.history
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    ax.plot(range(1, len(h.train_loss) + 1), h.train_loss, lw=0.8, alpha=0.7, label="training")
    ax.plot(h.eval_steps, h.eval_loss, "o-", label="held-out")
    ax.axvline(h.best_step, color="k", ls=":", label=f"best (step {h.best_step})")
    ax.set_xlabel("step")
    ax.set_ylabel("distillation loss")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title(f"onnxship shrink --keep {report.settings['prune']['keep']:g}")
    out = Path(out)
    with atomic_path(out, suffix=f".{fmt}") as tmp:
        fig.savefig(tmp, format=fmt, dpi=100)
    return out


def write_json(report: ShrinkReport, out: str | os.PathLike) -> Path:
    return atomic_write_text(out, report.to_json())
