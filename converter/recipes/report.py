"""The run's manifest (every artifact hashed, the recipe resolved, versions, machine, every
metric and timing) and its report: report.md and report.html with plots."""

from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import Any

from converter.check.bench import plot_latencies
from converter.check.validate_report import scoring_text
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
from converter.recipes.manifest import artifact_entry, manifest_base

__all__ = [
    "build_manifest",
    "write_reports",
    "artifact_entry",
    "stats_summary",
    "stats_table",
    "recommended",
    "score_vs_latency",
]

logger = logging.getLogger(__name__)


def build_manifest(result: Any) -> dict[str, Any]:
    """Everything a reader needs to trust (and reproduce) the run."""
    manifest = manifest_base(
        result.outdir,
        {a.name: a.path for a in result.artifacts},
        _target(result),
        with_torch=result.recipe.model.spec is not None,
    )
    for a in result.artifacts:
        manifest["artifacts"][a.name]["passes"] = a.passes
    return {
        **manifest,
        "recipe_file": str(result.recipe.path),
        "recipe": result.recipe.resolved(),
        "export": _export_dict(result.export_report),
        "validation": {
            a.name: a.validation.to_dict() for a in result.artifacts if a.validation is not None
        },
        "bench": result.bench.to_dict() if result.bench is not None else None,
        "timings_s": dict(result.timings),
        "gates_passed": result.passed,
        "scoring": _scoring_note(result),
    }


def _target(result: Any) -> dict[str, Any]:
    return {"recipe": result.recipe.target_as_written, **result.recipe.target.summary()}


def _scoring_note(result: Any) -> str:
    if result.labelled is None:
        return "The recipe has no validation data: nothing was scored."
    if not result.labelled:
        what = (
            "The validation data has no labels: variants are scored by fidelity to the fp32 "
            "reference only (agreement of the argmax, cosine); there is no accuracy."
        )
    else:
        what = (
            "Accuracy is scored on the validation data; agreement (argmax) and cosine "
            "compare each variant with the fp32 reference on the same samples."
        )
    return f"{what} {_measured(result)}"


def _measured(result: Any) -> str:
    """How each model was scored (batch, threads, samples); dynamic int8 at its deployment
    batch, since its outputs depend on the batch."""
    scored = [(a.name, a.validation) for a in result.artifacts if a.validation is not None]
    parts = [f"{name} at {scoring_text(v.scoring())}" for name, v in scored]
    dynamic = any(v.dynamic_quantization for _, v in scored)
    why = (
        "; dynamic int8 takes each run's activation range from that run, so it is scored at "
        "the batch it is deployed at"
        if dynamic
        else ""
    )
    return f"Scored: {', '.join(parts)}{why}." if parts else ""


def _target_line(manifest: dict) -> str:
    return f"{target_line(manifest['target'])} The recipe says {manifest['target']['recipe']!r}."


def _export_dict(report: Any) -> dict[str, Any] | None:
    if report is None:
        return None
    return {
        "exporter": report.exporter,
        "opset": report.opset,
        "inputs": report.inputs,
        "outputs": report.outputs,
        "parameters": report.parameters,
        "verification": [
            {
                "input": c.label,
                "atol": c.atol,
                "rtol": c.rtol,
                "outputs": {
                    o.name: {"max_abs": o.max_abs, "max_rel": o.max_rel, "ok": o.ok}
                    for o in c.outputs
                },
            }
            for c in report.comparisons
        ],
    }


def _scalar(value: Any) -> str | None:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (int, str, bool)):
        return str(value)
    return None


def _is_listing(value: Any) -> bool:
    """A list, or a table of name → reason: something to count."""
    return isinstance(value, list) or (
        isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
    )


def _stat_text(value: Any) -> str | None:
    """One stat as text: a scalar as it is, a table of scalars inline, a table of listings
    by their sizes (``quantized 11, fp32 0``), a list by its length; deeper tables → None
    (they are in the manifest)."""
    if _scalar(value) is not None:
        return _scalar(value)
    if isinstance(value, list):
        return str(len(value)) if value else None
    if isinstance(value, dict) and value:
        inner = value.values()
        if all(_scalar(v) is not None for v in inner):
            return ", ".join(f"{k} {_scalar(v)}" for k, v in value.items())
        if all(_is_listing(v) for v in inner):
            return ", ".join(f"{k} {len(v)}" for k, v in value.items())
        flat = {k: v for k, v in value.items() if _scalar(v) is not None}
        return ", ".join(f"{k} {_scalar(v)}" for k, v in flat.items()) or None
    return None


def stats_table(stats: dict[str, Any]) -> list[tuple[str, str]]:
    """A pass's stats as (name, text) rows, for the report's small per-pass tables."""
    rows = [(key, _stat_text(value)) for key, value in stats.items()]
    return [(k, t) for k, t in rows if t is not None]


def stats_summary(stats: dict[str, Any]) -> str:
    """A pass's stats on one line (``mode static, nodes: quantized 11, fp32 0, ...``)."""
    return ", ".join(
        f"{k} {t}" if _scalar(stats[k]) is not None else f"{k}: {t}" for k, t in stats_table(stats)
    )


def recommended(rows: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, str]:
    """The variant to ship: the fastest one that passes every gate (speedups within 5 %
    count as equal, then the smaller file), and why — or None and why not."""
    passing = [r for r in rows[1:] if r["gates"] == "pass" and r["speedup"] is not None]
    if not passing:
        gated = any(r["gates"] != "—" for r in rows[1:])
        why = "no variant passes the gates: ship fp32" if gated else "no gates set"
        return None, why
    fastest = max(r["speedup"] for r in passing)
    close = [r for r in passing if r["speedup"] >= 0.95 * fastest]
    best = min(close, key=lambda r: (r["size_mb"], -r["speedup"]))
    metric = next((m for m in ("accuracy", "cosine") if best[m] is not None), None)
    score = f", {metric} {best[metric]:.4f}" if metric else ""
    fp32 = rows[0].get(metric) if metric else None
    score += f" (fp32 {fp32:.4f})" if fp32 is not None else ""
    return best, (
        f"the fastest variant that passes every gate: {best['speedup']:.2f}x fp32 (p50)"
        f"{score}, {best['size_ratio']:.2f}x the size"
    )


# ---------------------------------------------------------------- table


def _metric(artifact: Any, metric: str, field: str = "value") -> float | None:
    v = artifact.validation
    if v is None:
        return None
    values = v.outputs.get(v.output, {}).get(metric)
    return getattr(values, field, None) if values is not None else None


def _rows(result: Any) -> list[dict[str, Any]]:
    ref_size = result.artifacts[0].path.stat().st_size
    rows = []
    for i, a in enumerate(result.artifacts):
        m = result.bench.get(i, result.bench.threads[0]) if result.bench else None
        size = a.path.stat().st_size
        rows.append(
            {
                "name": a.name,
                "size_mb": size / MB,
                "size_ratio": size / ref_size,
                "accuracy": _metric(a, "accuracy"),
                "agreement": _metric(a, "agreement"),
                "cosine": _metric(a, "cosine"),
                "cosine_worst": _metric(a, "cosine", "worst"),
                "p50_ms": m.latency.p50_ms if m else None,
                "p90_ms": m.latency.p90_ms if m else None,
                "speedup": m.speedup if m else None,
                "gates": "—"
                if a.validation is None or not a.validation.gates
                else ("pass" if a.validation.passed else "FAIL"),
            }
        )
    return rows


_HEADER = [
    "model",
    "size (MB)",
    "size (× fp32)",
    "accuracy",
    "agreement (argmax = fp32)",
    "cosine to fp32, mean",
    "cosine to fp32, worst",
    "p50 (ms)",
    "p90 (ms)",
    "speedup (× fp32, p50)",
    "gates",
]


def _cells(row: dict[str, Any]) -> list[str]:
    return [
        row["name"],
        cell(row["size_mb"], ".3f"),
        cell(row["size_ratio"], ".2f"),
        cell(row["accuracy"], ".4f"),
        cell(row["agreement"], ".4f"),
        cell(row["cosine"], ".5f"),
        cell(row["cosine_worst"], ".5f"),
        cell(row["p50_ms"], ".3f"),
        cell(row["p90_ms"], ".3f"),
        cell(row["speedup"], ".2f", "x"),
        row["gates"],
    ]


# ---------------------------------------------------------------- plots


def _plots(result: Any, rows: list[dict[str, Any]]) -> dict[str, Path]:
    fig = figure((6, 3.5), "report plots")
    if fig is None:
        return {}
    plots = {}
    out = result.outdir
    metric = "accuracy" if rows[0]["accuracy"] is not None else "cosine"
    if rows[0]["p50_ms"] is not None and any(r[metric] is not None for r in rows):
        plots["accuracy_vs_latency"] = save_figure(
            score_vs_latency(rows, metric), out / "accuracy_vs_latency.png"
        )
    ax = fig.subplots()
    ax.bar([r["name"] for r in rows], [r["size_mb"] for r in rows])
    ax.set_ylabel("size (MB)")
    ax.set_title("model size per variant")
    ax.tick_params(axis="x", labelrotation=30)
    plots["size"] = save_figure(fig, out / "size.png")
    if result.bench is not None:
        plots["latency"] = plot_latencies(result.bench, out / "latency.png")
    return plots


_MARKERS = "osD^vP*Xph<>"


def score_vs_latency(rows: list[dict[str, Any]], metric: str) -> Any:
    """One point per model, each with its own marker and colour, named in a legend beside
    the axes (labels written next to close points would overlap)."""
    fig = figure((7.5, 4), "score plot")
    ax = fig.subplots()
    for i, r in enumerate(row for row in rows if row[metric] is not None):
        ax.scatter(
            r["p50_ms"], r[metric], marker=_MARKERS[i % len(_MARKERS)], s=60, label=r["name"]
        )
    ax.set_xlabel("p50 latency (ms, batch 1) — left is faster")
    ax.set_ylabel(f"{metric} — up is better")
    ax.set_title(f"{metric} vs latency")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    return fig


# ---------------------------------------------------------------- documents


def _pass_lines(result: Any) -> list[tuple[str, str, str]]:
    return [
        (a.name, p["pass"], stats_summary(p["stats"])) for a in result.artifacts for p in a.passes
    ]


def _markdown(result: Any, manifest: dict, rows: list, plots: dict[str, Path]) -> str:
    best, why = recommended(rows)
    lines = [
        f"# onnxship report: {result.recipe.name}",
        "",
        f"**Recommended: {best['name']}** — {why}." if best else f"**No recommendation**: {why}.",
        "",
        f"Machine: {machine_line(manifest['machine'])}. onnxruntime "
        f"{manifest['versions']['onnxruntime']}, onnx {manifest['versions']['onnx']}.",
        _target_line(manifest),
        _bench_line(result),
        "",
    ]
    cells = [_cells(r) for r in rows]
    for row, r in zip(cells, rows):
        if r is best:
            row[0] = f"**{row[0]}** (recommended)"
    lines += markdown_table(_HEADER, cells)
    lines += ["", manifest["scoring"], ""]
    if _pass_lines(result):
        lines += ["## Passes", "", "| model | pass | stats |", "|---|---|---|"]
        lines += [f"| {a} | {p} | {s} |" for a, p, s in _pass_lines(result)]
        lines.append("")
    failed = result.failed_gates()
    lines += [
        "## Gates",
        "",
        "All gates hold." if not failed else "Failed: " + "; ".join(failed),
        "",
    ]
    if plots:
        lines += ["## Plots", ""] + [f"![{k}]({p.name})" for k, p in plots.items()] + [""]
    lines += [
        "Every artifact's sha256 and size, the resolved recipe and all numbers are in "
        "`manifest.json`.",
        "",
    ]
    return "\n".join(lines)


def _bench_line(result: Any) -> str:
    if result.bench is None:
        return ""
    s = result.bench.settings
    return (
        f"Latency: batch 1, {result.bench.threads[0]} thread(s), interleaved with fp32, "
        f"{s['warmup']} warmup + {s['runs'] or str(s['seconds']) + ' s'} runs per model; "
        "speedup = fp32 p50 / variant p50."
    )


def _html_passes(result: Any) -> str:
    esc = html.escape
    boxes = []
    for a in result.artifacts:
        for p in a.passes:
            rows = "".join(
                f"<tr><th>{esc(k)}</th><td>{esc(t)}</td></tr>" for k, t in stats_table(p["stats"])
            )
            boxes.append(
                f'<div class="pass"><h3>{esc(a.name)}: {esc(p["pass"])}</h3>'
                f"<table>{rows}</table></div>"
            )
    return f'<div class="passes">{"".join(boxes)}</div>' if boxes else "<p>No passes.</p>"


def _html(rows: list, result: Any, manifest: dict, plots: dict[str, Path]) -> str:
    esc = html.escape
    best, why = recommended(rows)
    verdict = (
        f'<div class="ship">Recommended: <b>{esc(best["name"])}</b> — {esc(why)}.</div>'
        if best
        else f'<div class="noship">No recommendation: {esc(why)}.</div>'
    )
    images = "".join(embedded_png(p, k.replace("_", " ")) for k, p in plots.items())
    failed = result.failed_gates()
    gates = "All gates hold." if not failed else "Failed: " + "; ".join(failed)
    meta = (
        f"Machine: {machine_line(manifest['machine'])}. {_target_line(manifest)} "
        f"{_bench_line(result)}"
    )
    highlight = next((i for i, r in enumerate(rows) if r is best), None)
    body = f"""{verdict}
<p class="meta">{esc(meta)}</p>
{html_table(_HEADER, [_cells(r) for r in rows], highlight)}
<p class="meta">{esc(manifest["scoring"])}</p>
<h2>Gates</h2><p{' class="fail"' if failed else ""}>{esc(gates)}</p>
<h2>Passes</h2>{_html_passes(result)}
<h2>Plots</h2>{images}
<p class="meta">Hashes, the resolved recipe and all numbers: <code>manifest.json</code>.</p>"""
    return html_page(f"onnxship report: {result.recipe.name}", body)


def write_reports(result: Any, manifest: dict) -> tuple[Path, Path]:
    rows = _rows(result)
    plots = _plots(result, rows)
    md = atomic_write_text(result.outdir / "report.md", _markdown(result, manifest, rows, plots))
    page = atomic_write_text(result.outdir / "report.html", _html(rows, result, manifest, plots))
    return md, page
