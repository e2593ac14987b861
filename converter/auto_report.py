"""Report and manifest of ``onnxship auto``: every candidate in a table, a Pareto plot of
fidelity vs speedup, and the chosen model's hash."""

from __future__ import annotations

import base64
import html
import json
import logging
from pathlib import Path
from typing import Any

from converter import __version__
from converter.onnxio import atomic_path, atomic_write_text
from converter.provenance import machine, versions
from converter.report import artifact_entry
from converter.targets import host_target, resolve_target, target_summary

__all__ = ["write_auto_outputs"]

logger = logging.getLogger(__name__)

_HEADER = [
    "candidate",
    "passes",
    "score",
    "cosine mean",
    "cosine worst",
    "meets budget",
    "p50 ms",
    "p90 ms",
    "speedup",
    "size MB",
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


def _cells(c: Any) -> list[str]:
    def num(v: float | None, fmt: str) -> str:
        return "—" if v is None else format(v, fmt)

    return [
        c.name + (" ◀ chosen" if getattr(c, "chosen", False) else ""),
        _describe_passes(c.passes) if not c.error else f"failed: {c.error}",
        num(c.score, ".4f"),
        num(c.cosine, ".5f"),
        num(c.worst, ".5f"),
        "yes" if c.meets else "no",
        num(c.p50_ms, ".3f"),
        num(c.p90_ms, ".3f"),
        "—" if c.speedup is None else f"{c.speedup:.2f}x",
        "—" if c.size is None else f"{c.size / 1e6:.3f}",
    ]


def _pareto_plot(result: Any) -> Path | None:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning(
            "warning: matplotlib is not installed: no Pareto plot (pip install 'onnxship[plot]')"
        )
        return None
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    shown = [c for c in result.candidates if c.speedup is not None and c.score is not None]
    for c in shown:
        color = "C2" if c is result.best else ("C0" if c.meets else "C3")
        ax.scatter(c.speedup, c.score, color=color)
        ax.annotate(
            c.name, (c.speedup, c.score), fontsize=7, xytext=(3, 3), textcoords="offset points"
        )
    ax.axhline(result.threshold, color="grey", linestyle="--", label="budget")
    ax.axvline(1.0, color="grey", linestyle=":", label="fp32 speed")
    ax.set_xlabel("speedup vs fp32 (p50, batch 1)")
    ax.set_ylabel(result.budget.metric)
    ax.set_title("candidates: fidelity vs speedup (green = chosen, red = misses budget)")
    ax.legend(fontsize="small")
    path = result.outdir / "pareto.png"
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


def _summary_line(result: Any) -> str:
    budget = result.budget.describe(result.reference_score)
    if result.best is None:
        closest = result.closest()
        tail = f"closest: {closest.name} ({closest.score:.4f})" if closest else "none built"
        return f"No candidate meets the budget ({budget}); {tail}."
    b = result.best
    return (
        f"Chosen: **{b.name}** — {result.budget.metric} {b.score:.4f} (fp32 "
        f"{result.reference_score:.4f}, budget {budget}), worst cosine {b.worst:.4f}, "
        f"{b.speedup:.2f}x faster than fp32 (p50), written to model.onnx."
    )


def _target_line(result: Any) -> str:
    t = resolve_target(result.target)
    host = host_target().name
    where = (
        "this host"
        if t.name == host
        else f"not this host ({host}): latency here is not the target's"
    )
    return f"int8 target: {t.name} ({'7' if t.reduce_range else '8'}-bit weights), {where}."


def _markdown(result: Any, mach: dict, plot: Path | None) -> str:
    lines = [
        f"# onnxship auto: {result.outdir.name}",
        "",
        _summary_line(result),
        "",
        f"Data: {result.split}.",
        f"Machine: {mach['cpu']}, VNNI: {'yes' if mach['vnni'] else 'no'}. Latency: batch 1, "
        "interleaved with fp32 in one process.",
        _target_line(result),
        "",
        "| " + " | ".join(_HEADER) + " |",
        "|" + "---|" * len(_HEADER),
    ]
    lines += ["| " + " | ".join(_cells(c)) + " |" for c in result.candidates]
    lines += [""] + [f"Note: {n}" for n in result.notes]
    if plot is not None:
        lines += ["", f"![pareto]({plot.name})"]
    return "\n".join(lines) + "\n"


def _html(result: Any, mach: dict, plot: Path | None) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in _HEADER)
    rows = "".join(
        "<tr>" + "".join(f"<td>{esc(x)}</td>" for x in _cells(c)) + "</tr>"
        for c in result.candidates
    )
    img = (
        ""
        if plot is None
        else (
            f'<img alt="pareto" src="data:image/png;base64,'
            f'{base64.b64encode(plot.read_bytes()).decode()}">'
        )
    )
    summary = esc(_summary_line(result)).replace("**", "")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>onnxship auto</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.3em .6em}}</style></head><body>
<h1>onnxship auto</h1><p>{summary}</p><p>Data: {esc(result.split)}.</p>
<p>Machine: {esc(str(mach["cpu"]))}, VNNI: {"yes" if mach["vnni"] else "no"}.
{esc(_target_line(result))}</p>
<table><tr>{head}</tr>{rows}</table>{img}
<p>All numbers and hashes: <code>manifest.json</code>.</p></body></html>
"""


def write_auto_outputs(result: Any, source_model: Any) -> None:
    for c in result.candidates:
        c.chosen = c is result.best
    mach = machine()
    plot = _pareto_plot(result)
    out = result.outdir
    artifacts = {"fp32": artifact_entry(out / "fp32.onnx", out)}
    if result.best is not None:
        artifacts["model"] = artifact_entry(out / "model.onnx", out)
    manifest = {
        "onnxship": __version__,
        "source_model": str(source_model),
        "budget": {
            **result.budget.__dict__,
            "threshold": result.threshold,
            "reference_score": result.reference_score,
        },
        "data_split": result.split,
        "chosen": None if result.best is None else result.best.name,
        "artifacts": artifacts,
        "candidates": [
            {
                **c.row(),
                "path": None if c.path is None else Path(c.path).relative_to(out).as_posix(),
            }
            for c in result.candidates
        ],
        "bench": result.bench.to_dict() if result.bench is not None else None,
        "versions": versions(with_torch=False),
        "machine": mach,
        "target": target_summary(resolve_target(result.target)),
    }
    result.manifest = atomic_write_text(
        out / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    )
    result.report_md = atomic_write_text(out / "report.md", _markdown(result, mach, plot))
    result.report_html = atomic_write_text(out / "report.html", _html(result, mach, plot))
