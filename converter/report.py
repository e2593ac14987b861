"""The run's manifest (every artifact hashed, the recipe resolved, versions, machine, every
metric and timing) and its report: report.md and report.html with plots."""

from __future__ import annotations

import base64
import html
import logging
from pathlib import Path
from typing import Any

from converter import __version__
from converter.onnxio import atomic_path, atomic_write_text
from converter.provenance import machine, sha256_file, versions

__all__ = ["build_manifest", "write_reports", "artifact_entry", "stats_summary"]

logger = logging.getLogger(__name__)


def artifact_entry(path: Path, outdir: Path) -> dict[str, Any]:
    return {
        "path": path.relative_to(outdir).as_posix(),
        "sha256": sha256_file(path),
        "size": path.stat().st_size,
    }


def build_manifest(result: Any) -> dict[str, Any]:
    """Everything a reader needs to trust (and reproduce) the run."""
    out = result.outdir
    return {
        "onnxship": __version__,
        "recipe_file": str(result.recipe.path),
        "recipe": result.recipe.resolved(),
        "versions": versions(with_torch=result.recipe.model.spec is not None),
        "machine": machine(),
        "artifacts": {
            a.name: {**artifact_entry(a.path, out), "passes": a.passes} for a in result.artifacts
        },
        "export": _export_dict(result.export_report),
        "validation": {
            a.name: a.validation.to_dict() for a in result.artifacts if a.validation is not None
        },
        "bench": result.bench.to_dict() if result.bench is not None else None,
        "timings_s": dict(result.timings),
        "gates_passed": result.passed,
        "target": _target(result),
        "scoring": _scoring_note(result),
    }


def _target(result: Any) -> dict[str, Any]:
    from converter.targets import resolve_target, target_summary

    return {"recipe": result.recipe.target, **target_summary(resolve_target(result.recipe.target))}


def _scoring_note(result: Any) -> str:
    if result.labelled is None:
        return "The recipe has no validation data: nothing was scored."
    if not result.labelled:
        return (
            "The validation data has no labels: variants are scored by fidelity to the fp32 "
            "reference only (agreement of the argmax, cosine); there is no accuracy."
        )
    return (
        "Accuracy is scored on the validation data; agreement (argmax) and cosine "
        "compare each variant with the fp32 reference on the same samples."
    )


def _target_line(manifest: dict) -> str:
    t = manifest["target"]
    bits = "7-bit" if t["reduce_range"] else "8-bit"
    return (
        f"int8 target: {t['target']} ({bits} weights; recipe says {t['recipe']!r}), "
        f"host: {t['host_target']}."
    )


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


def stats_summary(stats: dict[str, Any]) -> str:
    """One line of a pass's stats: scalars as they are, a table of scalars inline, a table of
    listings by their sizes (``nodes: quantized 11, fp32 0``); deeper tables only in the
    manifest."""
    parts = []
    for key, value in stats.items():
        if _scalar(value) is not None:
            parts.append(f"{key} {_scalar(value)}")
        elif isinstance(value, list) and value:
            parts.append(f"{key}: {len(value)}")
        elif isinstance(value, dict) and value:
            inner = value.values()
            if all(_scalar(v) is not None for v in inner):
                text = ", ".join(f"{k} {_scalar(v)}" for k, v in value.items())
                parts.append(f"{key} ({text})")
            elif all(_is_listing(v) for v in inner):
                parts.append(f"{key}: " + ", ".join(f"{k} {len(v)}" for k, v in value.items()))
    return ", ".join(parts)


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
                "size_mb": size / 1e6,
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
    "size MB",
    "size ×",
    "accuracy",
    "agreement",
    "cosine mean",
    "cosine worst",
    "p50 ms",
    "p90 ms",
    "speedup (p50)",
    "gates",
]


def _cells(row: dict[str, Any]) -> list[str]:
    def num(v: float | None, fmt: str) -> str:
        return "—" if v is None else format(v, fmt)

    return [
        row["name"],
        num(row["size_mb"], ".3f"),
        num(row["size_ratio"], ".2f"),
        num(row["accuracy"], ".4f"),
        num(row["agreement"], ".4f"),
        num(row["cosine"], ".5f"),
        num(row["cosine_worst"], ".5f"),
        num(row["p50_ms"], ".3f"),
        num(row["p90_ms"], ".3f"),
        "—" if row["speedup"] is None else f"{row['speedup']:.2f}x",
        row["gates"],
    ]


# ---------------------------------------------------------------- plots


def _plots(result: Any, rows: list[dict[str, Any]]) -> dict[str, Path]:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning(
            "warning: matplotlib is not installed: the report has no plots "
            "(pip install 'onnxship[plot]')"
        )
        return {}
    plots = {}
    out = result.outdir
    metric = "accuracy" if rows[0]["accuracy"] is not None else "cosine"
    if rows[0]["p50_ms"] is not None and any(r[metric] is not None for r in rows):
        fig = Figure(figsize=(6, 4), layout="constrained")
        ax = fig.subplots()
        for r in rows:
            if r[metric] is not None:
                ax.scatter(r["p50_ms"], r[metric])
                ax.annotate(
                    r["name"],
                    (r["p50_ms"], r[metric]),
                    fontsize=8,
                    xytext=(4, 4),
                    textcoords="offset points",
                )
        ax.set_xlabel("p50 latency (ms, batch 1)")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} vs latency")
        plots["accuracy_vs_latency"] = _save(fig, out / "accuracy_vs_latency.png")
    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.subplots()
    ax.bar([r["name"] for r in rows], [r["size_mb"] for r in rows])
    ax.set_ylabel("size (MB)")
    ax.set_title("model size per variant")
    ax.tick_params(axis="x", labelrotation=30)
    plots["size"] = _save(fig, out / "size.png")
    if result.bench is not None:
        from converter.benchmark import plot_latencies

        plots["latency"] = plot_latencies(result.bench, out / "latency.png")
    return plots


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


# ---------------------------------------------------------------- documents


def _pass_lines(result: Any) -> list[tuple[str, str, str]]:
    return [
        (a.name, p["pass"], stats_summary(p["stats"])) for a in result.artifacts for p in a.passes
    ]


def _markdown(result: Any, manifest: dict, rows: list, plots: dict[str, Path]) -> str:
    mach = manifest["machine"]
    lines = [
        f"# onnxship report: {result.recipe.name}",
        "",
        f"Machine: {mach['cpu']}, {mach['cores']} cores, VNNI: {'yes' if mach['vnni'] else 'no'}."
        f" onnxruntime {manifest['versions']['onnxruntime']}, onnx {manifest['versions']['onnx']}.",
        _target_line(manifest),
        _bench_line(result),
        "",
        "| " + " | ".join(_HEADER) + " |",
        "|" + "---|" * len(_HEADER),
    ]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    lines += [
        "",
        manifest["scoring"],
        "",
    ]
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


def _html(markdown_rows: list, result: Any, manifest: dict, plots: dict[str, Path]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in _HEADER)
    body = "".join(
        "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in _cells(r)) + "</tr>" for r in markdown_rows
    )
    passes = "".join(
        f"<tr><td>{esc(a)}</td><td>{esc(p)}</td><td>{esc(s)}</td></tr>"
        for a, p, s in _pass_lines(result)
    )
    images = "".join(
        f'<h3>{esc(k)}</h3><img alt="{esc(k)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}">'
        for k, p in plots.items()
    )
    failed = result.failed_gates()
    mach = manifest["machine"]
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>onnxship report: {esc(result.recipe.name)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:75em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:right}}td:first-child{{text-align:left}}
</style></head><body>
<h1>onnxship report: {esc(result.recipe.name)}</h1>
<p>Machine: {esc(str(mach["cpu"]))}, {mach["cores"]} cores, VNNI: {"yes" if mach["vnni"] else "no"}.
{esc(_target_line(manifest))} {esc(_bench_line(result))}</p>
<p>{esc(manifest["scoring"])}</p>
<table><tr>{head}</tr>{body}</table>
<h2>Passes</h2><table><tr><th>model</th><th>pass</th><th>stats</th></tr>{passes}</table>
<h2>Gates</h2><p>{esc("All gates hold." if not failed else "Failed: " + "; ".join(failed))}</p>
<h2>Plots</h2>{images}
<p>Hashes, the resolved recipe and all numbers: <code>manifest.json</code>.</p>
</body></html>
"""


def write_reports(result: Any, manifest: dict) -> tuple[Path, Path]:
    rows = _rows(result)
    plots = _plots(result, rows)
    md = atomic_write_text(result.outdir / "report.md", _markdown(result, manifest, rows, plots))
    page = atomic_write_text(result.outdir / "report.html", _html(rows, result, manifest, plots))
    return md, page
