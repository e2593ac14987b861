"""Report and manifest of ``onnxship auto``: every candidate in a table, a Pareto plot of
fidelity vs speedup, and the chosen model's hash."""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path
from typing import Any

from converter.check.node_error import ERROR_HEADER, TensorError, error_rows
from converter.check.validate_report import scoring_text
from converter.core import defaults
from converter.core.machine import machine_line, target_line
from converter.core.onnxio import atomic_write_text
from converter.core.render import (
    MB,
    cell,
    embedded_png,
    figure,
    html_page,
    html_table,
    markdown_table,
    save_figure,
)
from converter.recipes.manifest import manifest_base

__all__ = ["write_auto_outputs"]

logger = logging.getLogger(__name__)

_HEADER = [
    "candidate",
    "passes",
    "score",
    "semantics score",
    "int8 MACs",
    "cosine to fp32, mean",
    "cosine to fp32, worst",
    "score batch",
    "meets budget",
    "calibrated on",
    "p50 (ms)",
    "p90 (ms)",
    "speedup (× fp32, p50)",
    "size (MB, packed)",
]


def _describe_passes(passes: list[dict[str, Any]]) -> str:
    parts = []
    for entry in passes:
        settings = ", ".join(
            f"{k}={len(v)} nodes" if k == "nodes_to_exclude" else f"{k}={v}"
            for k, v in entry.items()
            if k != "pass"
        )
        parts.append(f"{entry['pass']}({settings})")
    return " → ".join(parts)


def _semantics(c: Any) -> str:
    """The QDQ semantics figure beside the kernel score (the score column): on how many
    samples, and DIVERGES when they part; — for a model that is not QDQ."""
    s = c.semantics
    if s is None:
        static = any(p["pass"] == "quantize-static" for p in c.passes)
        scored = c.score is not None or getattr(c, "subset", None)
        return "not measured" if static and scored else "—"
    if not s:  # measured: not a QDQ model
        return "—"
    if s["semantics_score"] is None:
        return "unavailable"
    text = f"{s['semantics_score']:.4f} (first {s['samples']})"
    if s["diverged"]:
        text += " DIVERGES" + (f" at {'; '.join(s['parts'])}" if s["parts"] else "")
    return text


def _unbenched(c: Any) -> bool:
    """Built and scored, but not benched: only finalists are (converter.search.auto)."""
    return c.path is not None and not c.error and c.p50_ms is None


def _int8_macs(c: Any) -> str:
    share = (c.int8_macs or {}).get("share")
    return "—" if share is None else f"{100 * share:.1f}%"


def _on_subset(c: Any, key: str, spec: str) -> str:
    """A number of a candidate decided on the subset, saying so (never a whole-set score)."""
    s = c.subset
    return f"{s[key]:{spec}} on {s['samples']} of {s['of']}"


def _cells(c: Any) -> list[str]:
    passes = _describe_passes(c.passes) if not c.error else f"failed: {c.error}"
    if c.fallback:
        passes += f" [{c.fallback}]"
    subset = getattr(c, "subset", None)
    return [
        c.name + (" ◀ chosen" if getattr(c, "chosen", False) else ""),
        passes,
        _on_subset(c, "score", ".4f") if subset else cell(c.score, ".4f"),
        _semantics(c),
        _int8_macs(c),
        _on_subset(c, "cosine", ".5f") if subset else cell(c.cosine, ".5f"),
        _on_subset(c, "worst", ".5f") if subset else cell(c.worst, ".5f"),
        str(c.scored_at["batch_size"]) if c.scored_at else "—",
        (
            f"no: misses on {subset['samples']} of {subset['of']} samples: {subset['miss']}"
            if subset
            else ("yes" if c.meets else "no")
        ),
        "—" if c.calib_samples is None else f"{c.calib_samples} samples",
        "not benched" if _unbenched(c) else cell(c.p50_ms, ".3f"),
        cell(c.p90_ms, ".3f"),
        cell(c.speedup, ".2f", "x"),
        cell(None if c.size is None else c.size / MB, ".3f"),
    ]


_MARKERS = "osD^vP*Xph<>"


def _pareto_plot(result: Any) -> Path | None:
    """Score vs speedup, one marker per candidate named in a legend beside the axes (names
    written next to close points would overlap); the chosen one ringed."""
    fig = figure((8.5, 4.5), "Pareto plot")
    if fig is None:
        return None
    ax = fig.subplots()
    shown = [c for c in result.candidates if c.speedup is not None and c.score is not None]
    for i, c in enumerate(shown):
        color = "C2" if c is result.best else ("C0" if c.meets else "C3")
        marker = _MARKERS[i % len(_MARKERS)]
        ax.scatter(c.speedup, c.score, color=color, marker=marker, s=50, label=c.name)
        if c is result.best:
            ax.scatter(c.speedup, c.score, s=220, facecolors="none", edgecolors="C2")
    ax.axhline(result.threshold, color="grey", linestyle="--")
    ax.axvline(1.0, color="grey", linestyle=":")
    ax.set_xlabel("speedup vs fp32 (p50, batch 1) — right is faster; dotted: fp32 speed")
    ax.set_ylabel(f"{result.budget.metric} — dashed: budget")
    ax.set_title("candidates (green = chosen, blue = meets the budget, red = misses)")
    ax.grid(alpha=0.3)
    if shown:
        ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=7, frameon=False)
    return save_figure(fig, result.outdir / "pareto.png")


def _summary_line(result: Any) -> str:
    budget = result.budget.describe(result.reference_score)
    if result.best is None:
        c = result.written
        tail = f"none {'built' if result.candidates else 'tried'}, no model.onnx written"
        if c is not None:
            tail = f"closest: {c.name} ({c.score:.4f}), written to model.onnx but **NOT within "
            tail += f"budget** ({result.miss(c)})"
        return f"No candidate meets the budget ({budget}); {tail}."
    b = result.best
    return (
        f"Chosen: **{b.name}** — {result.budget.metric} {b.score:.4f} (fp32 "
        f"{result.reference_score:.4f}, budget {budget}), worst cosine {b.worst:.4f}, "
        f"{b.speedup:.2f}x faster than fp32 (p50), written to model.onnx."
    )


def _error_table(result: Any) -> tuple[str, str, list[list[str]]] | None:
    """(Heading, explanation, header and rows) of the per-tensor error of the candidate auto
    measured it on (the chosen one, or the closest on a miss; converter/check/node_error.py)."""

    c = next((c for c in result.candidates if c.node_errors is not None), None)
    if c is None:
        return None
    errors = [TensorError.from_dict(d) for d in c.node_errors["tensors"]]
    shown = min(len(errors), defaults.NODE_ERROR_ROWS)
    which = f"All {shown}" if shown == len(errors) else f"The {shown} worst of {len(errors)}"
    text = (
        f"SQNR (dB) and cosine of each tensor {c.name} quantizes, against the fp32 model its "
        f"quantize pass was given, on {c.node_errors['samples']} scoring samples: SQNR is the "
        "tensor's int8 round trip alone, propagated its value in the int8 model (upstream "
        f"errors included). {which}, worst first (int32 biases last: bias correction "
        "moves them on purpose); manifest.json has every number."
    )
    rows = error_rows(errors, defaults.NODE_ERROR_ROWS)
    return f"Per-tensor error: {c.name}", text, [ERROR_HEADER, *rows]


def _scoring_line(result: Any) -> str:
    """How the scores were measured: batch, threads and samples per kind of candidate."""
    seen: dict[str, list[str]] = {}
    for c in result.candidates:
        if c.scored_at and not getattr(c, "subset", None):  # (the subset's: a note says)
            kind = "dynamic int8" if c.scored_at.get("dynamic_quantization") else "the others"
            text = scoring_text(c.scored_at)
            if text not in seen.setdefault(kind, []):
                seen[kind].append(text)
    if not seen:
        return "Scores: none measured."
    parts = [f"{kind} at {' / '.join(texts)}" for kind, texts in sorted(seen.items())]
    why = (
        " (dynamic int8 takes each run's activation range from that run, so it is scored at "
        "the batch it is deployed at)"
        if "dynamic int8" in seen
        else ""
    )
    kernels = (
        " Every score is the shipped kernels' (onnxruntime's optimized session); auto ranks "
        "and accepts on it. The semantics score is the QDQ model with optimizations off "
        "(Q/DQ as float ops) on the first scoring samples, measured for the finalists and "
        "for the fallback steps not kept; int8 MACs is the share of "
        "multiply-adds that run in int8."
    )
    return f"Scores: {'; '.join(parts)}{why}.{kernels}"


def _target_line(result: Any) -> str:
    return target_line(result.target.summary())


def _markdown(result: Any, mach: dict, plot: Path | None) -> str:
    lines = [
        f"# onnxship auto: {result.outdir.name}",
        "",
        _summary_line(result),
        "",
        f"Data: {result.split}.",
        _scoring_line(result),
        f"Machine: {machine_line(mach)}. Latency: batch 1, interleaved with fp32 in one process.",
        _target_line(result),
        *([f"Time: {result.stage_line()}."] if result.stage_line() else []),
        "",
        *markdown_table(_HEADER, [_cells(c) for c in result.candidates]),
    ]
    lines += [""] + [f"Note: {n}" for n in result.notes]
    errors = _error_table(result)
    if errors is not None:
        heading, text, (header, *rows) = errors
        lines += ["", f"## {heading}", "", text, "", *markdown_table(header, rows)]
    if plot is not None:
        lines += ["", f"![pareto]({plot.name})"]
    return "\n".join(lines) + "\n"


def _html(result: Any, mach: dict, plot: Path | None) -> str:
    esc = html.escape
    summary = esc(_summary_line(result)).replace("**", "")
    verdict = "ship" if result.best is not None else "noship"
    highlight = next((i for i, c in enumerate(result.candidates) if c is result.best), None)
    notes = "".join(f'<p class="meta">Note: {esc(n)}</p>' for n in result.notes)
    errors = _error_table(result)
    if errors is not None:
        heading, text, (header, *rows) = errors
        notes += f'<h2>{esc(heading)}</h2><p class="meta">{esc(text)}</p>'
        notes += html_table(header, rows)
    body = f"""<div class="{verdict}">{summary}</div>
<p class="meta">Data: {esc(result.split)}. {esc(_scoring_line(result))}</p>
<p class="meta">Machine: {esc(machine_line(mach))}.
{esc(_target_line(result))}</p>
<p class="meta">Time: {esc(result.stage_line() or "—")}.</p>
{html_table(_HEADER, [_cells(c) for c in result.candidates], highlight)}{notes}
{"" if plot is None else embedded_png(plot, "candidates: score vs speedup")}
<p class="meta">All numbers and hashes: <code>manifest.json</code>.</p>"""
    return html_page("onnxship auto", body)


def write_auto_outputs(result: Any, source_model: Any) -> None:
    """OUTDIR/manifest.json, report.md and report.html (with pareto.png) of an auto run."""
    for c in result.candidates:
        c.chosen = c is result.best
    plot = _pareto_plot(result)
    manifest = _manifest(result, source_model)
    out, mach = result.outdir, manifest["machine"]
    result.manifest = atomic_write_text(
        out / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    )
    result.report_md = atomic_write_text(out / "report.md", _markdown(result, mach, plot))
    result.report_html = atomic_write_text(out / "report.html", _html(result, mach, plot))


def _manifest(result: Any, source_model: Any) -> dict[str, Any]:
    out = result.outdir
    artifacts = {"fp32": out / "fp32.onnx"}
    if result.written is not None:
        artifacts["model"] = out / "model.onnx"
    return {
        **manifest_base(out, artifacts, result.target.summary(), with_torch=False),
        "source_model": str(source_model),
        "budget": {
            **result.budget.__dict__,
            "threshold": result.threshold,
            "reference_score": result.reference_score,
        },
        "data_split": result.split,
        "notes": result.notes,
        "stages": result.stages,
        "chosen": None if result.best is None else result.best.name,
        "int8_macs": None if result.written is None else result.written.int8_macs,
        **result.outcome(),  # what model.onnx holds, within budget or not; --time-budget
        "candidates": [
            {
                **c.row(),
                "path": None if c.path is None else Path(c.path).relative_to(out).as_posix(),
            }
            for c in result.candidates
        ],
        "bench": result.bench.to_dict() if result.bench is not None else None,
    }
