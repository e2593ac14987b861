"""What ``onnxship bench`` reports: the measurement types, the summary table, JSON, JUnit and
the latency plot. ``bench.py`` measures; ``bench_gates.py`` checks gates on these types."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from converter.core import __version__
from converter.core.errors import BadInputError
from converter.core.gates import Gate, Gated, gate_lines, junit_xml
from converter.core.machine import machine_line
from converter.core.onnxio import atomic_path
from converter.core.render import MB

__all__ = [
    "TOOL",
    "LatencyStats",
    "ModelInfo",
    "Measurement",
    "BenchReport",
    "table_rows",
    "check_plot_path",
    "plot_latencies",
    "PLOT_FORMATS",
]

TOOL = "onnxship bench"


@dataclass(frozen=True)
class LatencyStats:
    """Latency of the timed runs of one model at one thread count, in milliseconds;
    throughput in samples per second (batch / mean latency)."""

    runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float
    max_ms: float
    throughput_per_s: float

    @classmethod
    def from_ns(cls, times_ns: np.ndarray, batch: int) -> LatencyStats:
        ms = np.asarray(times_ns, dtype=np.float64) / 1e6
        p50, p90, p99 = (float(p) for p in np.percentile(ms, [50, 90, 99]))
        mean = float(ms.mean())
        std = float(ms.std(ddof=1)) if len(ms) > 1 else 0.0
        throughput = batch * 1e3 / mean if mean > 0 else float("inf")
        return cls(len(ms), p50, p90, p99, mean, std, float(ms.min()), float(ms.max()), throughput)


@dataclass(frozen=True)
class ModelInfo:
    path: str
    file_size: int  # bytes, with external data files
    batch: int
    inputs: list[str]  # name:shape:dtype of the feeds used


@dataclass
class Measurement:
    """One model at one thread count. ``latencies_ms`` holds every timed run (not in JSON)."""

    model: int  # index into BenchReport.models
    threads: int
    latency: LatencyStats
    speedup: float  # p50 of the first model / p50 of this one, same thread count
    session_ms: float  # time to create the session (load + optimize): the cold start
    peak_rss_mb: float  # MB (10^6 bytes) of peak RSS above the RSS before this session
    latencies_ms: np.ndarray = field(repr=False)


@dataclass
class BenchReport(Gated):
    """Every measurement, and the gates checked on them (``passed`` is True without gates)."""

    models: list[ModelInfo]
    threads: list[int]
    settings: dict
    machine: dict
    results: list[Measurement]
    gates: list[Gate] = field(default_factory=list)
    baseline: str | None = None

    def get(self, model: int, threads: int) -> Measurement:
        return next(r for r in self.results if r.model == model and r.threads == threads)

    def to_dict(self) -> dict:
        return {
            "tool": TOOL,
            "version": __version__,
            "machine": self.machine,
            "settings": self.settings,
            "models": [dataclasses.asdict(m) for m in self.models],
            "results": [_result_dict(r, self.models[r.model].path) for r in self.results],
            "baseline": self.baseline,
            "passed": self.passed,
            "gates": [g.to_dict() for g in self.gates],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def to_junit(self) -> str:
        """JUnit XML: one testcase per gate, p50/p90/speedup/size as suite properties."""
        subject = " ".join(m.path for m in self.models)
        return junit_xml(TOOL, subject, self.gates, _properties(self), self.summary())

    def summary(self) -> str:
        return _summary(self)


# ---------------------------------------------------------------- rendering


def _result_dict(r: Measurement, path: str) -> dict:
    return {
        "model": path,
        "model_index": r.model,
        "threads": r.threads,
        **dataclasses.asdict(r.latency),
        "speedup_p50_vs_first": r.speedup,
        "session_create_ms": r.session_ms,
        "peak_rss_mb": r.peak_rss_mb,
    }


_COLUMNS = (
    "threads",
    "model",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "mean ms",
    "std ms",
    "min ms",
    "samples/s",
    "speedup",
    "session ms",
    "peak RSS MB",
    "size MB",
)


def table_rows(report: BenchReport) -> list[tuple[str, ...]]:
    """The summary table as rows of strings, header first (for text or markdown)."""
    rows = [_COLUMNS]
    for r in report.results:
        lat, info = r.latency, report.models[r.model]
        rows.append(
            (
                str(r.threads),
                info.path,
                *(f"{v:.3f}" for v in (lat.p50_ms, lat.p90_ms, lat.p99_ms, lat.mean_ms)),
                *(f"{v:.3f}" for v in (lat.std_ms, lat.min_ms)),
                f"{lat.throughput_per_s:.1f}",
                f"{r.speedup:.2f}x",
                f"{r.session_ms:.1f}",
                f"{r.peak_rss_mb:.1f}",
                f"{info.file_size / MB:.2f}",
            )
        )
    return rows


def _summary(report: BenchReport) -> str:
    m, s = report.machine, report.settings
    runs = f"{s['runs']} runs" if s["runs"] is not None else f"{s['seconds']:g} s of runs"
    batches = sorted({info.batch for info in report.models})
    lines = [
        f"bench on {machine_line(m)}, onnxruntime {m['onnxruntime']}",
        f"batch {','.join(map(str, batches))}, inter-op {s['inter_op_threads']}, sequential, "
        f"graph optimizations {s['graph_optimizations']}; {s['warmup']} warmup + {runs} per "
        f"model, interleaved; inputs: {s['inputs']}",
    ]
    rows = table_rows(report)
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    for row in rows:
        cells = [c.ljust(w) if i == 1 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    lines.append(
        "speedup = p50 of the first model / p50 of this one (same threads); MLPerf SingleStream "
        "reports p90; peak RSS = memory the model's session added at its peak"
    )
    if report.gates:
        lines.append("gates:")
        lines += gate_lines(report.gates, label=True)
    return "\n".join(lines)


def _properties(report: BenchReport) -> list[tuple[str, str]]:
    m = report.machine
    props = [("cpu", str(m["cpu"])), ("onnxruntime", str(m["onnxruntime"]))]
    for r in report.results:
        key = f"{report.models[r.model].path}.threads{r.threads}"
        props += [
            (f"{key}.p50_ms", repr(r.latency.p50_ms)),
            (f"{key}.p90_ms", repr(r.latency.p90_ms)),
            (f"{key}.speedup", repr(r.speedup)),
        ]
    props += [(f"{info.path}.size_bytes", str(info.file_size)) for info in report.models]
    return props


PLOT_FORMATS = ("png", "svg", "pdf")


def check_plot_path(out: str | os.PathLike) -> str:
    """The plot's format from its suffix; raises BadInputError before any measuring when the
    suffix or matplotlib is missing."""
    fmt = Path(out).suffix.lower().lstrip(".")
    if fmt not in PLOT_FORMATS:
        raise BadInputError(
            f"--plot {out}: cannot tell the format from the suffix",
            f"end the name in {', '.join('.' + f for f in PLOT_FORMATS)}",
        )
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise BadInputError("--plot needs matplotlib", "pip install 'onnxship[plot]'") from e
    return fmt


def plot_latencies(report: BenchReport, out: str | os.PathLike) -> Path:
    """The latency distributions (png, svg or pdf, from the suffix): one panel per thread
    count, one violin per model drawn up to its p99 (the slowest 1 % would flatten the
    rest; the max is written above), median, p90 and p99 marked. Needs matplotlib."""
    fmt = check_plot_path(out)
    from matplotlib.figure import Figure

    panels, count = len(report.threads), len(report.models)
    fig = Figure(figsize=(1.5 + 1.8 * count * panels, 4.5), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]  # own scale: 2 threads can be noisier
    for ax, threads in zip(axes, report.threads):
        _draw_panel(ax, [report.get(i, threads) for i in range(count)], report.models)
        ax.set_title(f"{threads} thread{'s' if threads > 1 else ''}")
    axes[0].set_ylabel("latency per run (ms)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=3, fontsize="small")
    fig.suptitle("onnxship bench: latency per run, interleaved")
    out = Path(out)
    with atomic_path(out, suffix=f".{fmt}") as tmp:
        fig.savefig(tmp, format=fmt, dpi=100)
    return out


def _draw_panel(ax, rows: list[Measurement], models: list[ModelInfo]) -> None:
    shown = [r.latencies_ms[r.latencies_ms <= r.latency.p99_ms] for r in rows]
    ax.violinplot(shown, showextrema=False, widths=0.8)
    marks = (
        ("p50_ms", "k", "-", "median"),
        ("p90_ms", "C1", "--", "p90"),
        ("p99_ms", "C3", ":", "p99"),
    )
    for pos, r in enumerate(rows, start=1):
        for key, color, style, label in marks:
            y = getattr(r.latency, key)
            ax.hlines(
                y,
                pos - 0.35,
                pos + 0.35,
                colors=color,
                linestyles=style,
                label=label if pos == 1 else None,
            )
        ax.annotate(
            f"max {r.latency.max_ms:.3g}",
            (pos, r.latency.p99_ms),
            textcoords="offset points",
            xytext=(0, 6),
            ha="center",
            fontsize="small",
        )
    names = [Path(models[r.model].path).name for r in rows]
    ax.set_xticks(range(1, len(rows) + 1), labels=names, rotation=20, ha="right")
    ax.grid(axis="y", alpha=0.3)
    ax.set_ylim(0, 1.15 * max(r.latency.p99_ms for r in rows))  # room for the max labels
