"""What ``onnxship validate`` reports: the metric values, the report with its gates, and its
renderings — the summary table, JSON and JUnit XML. :mod:`converter.check.validate` computes
the numbers; this module only holds and prints them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from converter.core import __version__
from converter.core.gates import Gate, Gated, gate_lines, junit_xml
from converter.core.gates import fmt as _fmt
from converter.core.gates import json_number as _num

__all__ = ["TOOL", "MetricValue", "ValidationReport", "scoring_text"]

TOOL = "onnxship validate"


@dataclass(frozen=True)
class MetricValue:
    """One metric of one output. ``value`` is the mean over samples (the max for max-abs);
    cosine also has its lowest per-sample value and that sample's index."""

    value: float
    worst: float | None = None
    worst_sample: int | None = None

    def to_dict(self) -> dict:
        out: dict = {"value": _num(self.value)}
        if self.worst is not None:
            out["worst"] = _num(self.worst)
            out["worst_sample"] = self.worst_sample
        return out


@dataclass
class ValidationReport(Gated):
    """Every number of one validation. ``outputs[name][metric]`` for the candidate,
    ``reference_outputs[name]["accuracy"]`` for the reference (when it has labels to score)."""

    candidate: str
    data: str
    num_samples: int
    metrics: list[str]
    output: str  # the output the gates read
    outputs: dict[str, dict[str, MetricValue]]
    reference: str | None = None
    reference_outputs: dict[str, dict[str, MetricValue]] = field(default_factory=dict)
    gates: list[Gate] = field(default_factory=list)
    baseline: str | None = None
    baseline_tolerance: float | None = None
    # How the numbers were measured: samples per run, onnxruntime threads, whether a model
    # quantizes activations at run time (its outputs then depend on the batch) and why this
    # batch (see converter.check.validate.DEPLOYMENT_BATCH).
    batch_size: int = 0
    threads: int = 1
    dynamic_quantization: bool = False
    batch_reason: str = ""
    # A QDQ candidate scored both ways on its first samples (validate_kernels.KernelFigures)
    # and a quantized one's int8 share of multiply-adds (int8_share.Int8Share).
    kernel_truth: Any = None
    int8_macs: Any = None

    def scoring(self) -> dict:
        """How the scores were measured, as the reports of run and auto record it."""
        return {
            "batch_size": self.batch_size,
            "threads": self.threads,
            "samples": self.num_samples,
            "dynamic_quantization": self.dynamic_quantization,
        }

    def to_dict(self) -> dict:
        return {
            "tool": TOOL,
            "version": __version__,
            "candidate": self.candidate,
            "reference": self.reference,
            "data": self.data,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "threads": self.threads,
            "dynamic_quantization": self.dynamic_quantization,
            "batch_reason": self.batch_reason,
            "metrics": self.metrics,
            "output": self.output,
            "passed": self.passed,
            "outputs": _metrics_dict(self.outputs),
            "reference_outputs": _metrics_dict(self.reference_outputs),
            "gates": [g.to_dict() for g in self.gates],
            "baseline": self.baseline,
            "baseline_tolerance": self.baseline_tolerance,
            "kernel_truth": None if self.kernel_truth is None else self.kernel_truth.to_dict(),
            "int8_macs": None if self.int8_macs is None else self.int8_macs.to_dict(),
        }

    def to_json(self) -> str:
        """Deterministic: same model, data and options give the same bytes."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    def to_junit(self) -> str:
        """JUnit XML: one testcase per gate, every number as a suite property."""
        return _junit(self)

    def summary(self) -> str:
        return _summary(self)


# ---------------------------------------------------------------- rendering


def _metrics_dict(results: dict[str, dict[str, MetricValue]]) -> dict:
    return {out: {m: v.to_dict() for m, v in values.items()} for out, values in results.items()}


def scoring_text(scoring: dict) -> str:
    """How a score was measured, for people: ``batch 1, 1 thread, 90 samples``."""
    threads = scoring["threads"]
    return (
        f"batch {scoring['batch_size']}, {threads} thread{'s' if threads != 1 else ''}, "
        f"{scoring['samples']} samples"
    )


def _summary(r: ValidationReport) -> str:
    against = f" vs reference {r.reference}" if r.reference else ""
    lines = [f"validate {r.candidate}{against} on {r.data} ({scoring_text(r.scoring())})"]
    if r.dynamic_quantization:
        lines.append(f"  batch {r.batch_size}: {r.batch_reason}")
    rows = [("output", "metric", "value", "worst (sample)", "reference")]
    for out, values in r.outputs.items():
        for metric, v in values.items():
            worst = "" if v.worst is None else f"{_fmt(v.worst)} ({v.worst_sample})"
            ref = r.reference_outputs.get(out, {}).get(metric)
            rows.append((out, metric, _fmt(v.value), worst, "" if ref is None else _fmt(ref.value)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    if r.int8_macs is not None:
        lines.append(f"  {r.int8_macs.line()}")
    if r.kernel_truth is not None:
        lines += [f"  {line}" for line in r.kernel_truth.lines()]
    if not r.gates:
        lines.append("no gates (use --min-score, --max-drop, --min-worst or --baseline)")
        return "\n".join(lines)
    kernels = " (optimizations on: the kernels that ship)" if r.kernel_truth is not None else ""
    lines.append(f"gates on output {r.output}{kernels}:")
    lines += gate_lines(r.gates)
    return "\n".join(lines)


def _junit(r: ValidationReport) -> str:
    return junit_xml(TOOL, r.candidate, r.gates, _properties(r), r.summary(), reads="output")


def _properties(r: ValidationReport) -> list[tuple[str, str]]:
    props = [("candidate", r.candidate), ("data", r.data), ("num_samples", str(r.num_samples))]
    props += [("batch_size", str(r.batch_size)), ("threads", str(r.threads))]
    props.append(("dynamic_quantization", str(r.dynamic_quantization).lower()))
    props.append(("batch_reason", r.batch_reason))
    if r.reference:
        props.append(("reference", r.reference))
    for prefix, results in (("", r.outputs), ("reference.", r.reference_outputs)):
        for out, values in results.items():
            for metric, v in values.items():
                props.append((f"{prefix}{out}.{metric}", repr(v.value)))
                if v.worst is not None:
                    props.append((f"{prefix}{out}.{metric}.worst", repr(v.worst)))
    if r.int8_macs is not None:
        props.append(("int8_macs.share", repr(r.int8_macs.share)))
        props.append(("int8_macs.int8", str(r.int8_macs.int8_macs)))
        props.append(("int8_macs.total", str(r.int8_macs.total_macs)))
    if r.kernel_truth is not None:
        props += r.kernel_truth.properties()
    for g in r.gates:
        props.append((f"gate.{g.name}.{g.metric.replace(' ', '_')}", repr(g.value)))
    return props
