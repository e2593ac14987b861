"""What ``onnxship sensitivity`` reports: each node's fidelity (:class:`Fidelity`,
:class:`NodeSensitivity`), the ranked :class:`SensitivityReport`, and its renderings — the
summary table, the per-tensor error table and JSON. :mod:`converter.check.sensitivity`
computes the numbers."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from converter.check.tensor_error import ERROR_HEADER, TensorError, error_rows
from converter.core import __version__, defaults
from converter.core.errors import BadInputError
from converter.core.gates import fmt as _fmt
from converter.core.gates import json_number as _num
from converter.core.metrics import per_sample_cosine
from passes.quant_report import describe_settings
from passes.quantize import CalibrationRanges

__all__ = ["TOOL", "Fidelity", "NodeSensitivity", "SensitivityReport"]

TOOL = "onnxship sensitivity"


@dataclass(frozen=True)
class Fidelity:
    """How close one variant's output is to fp32: ``loss`` = 1 − mean per-sample cosine;
    the lowest per-sample cosine and that sample's index."""

    loss: float
    worst_cosine: float
    worst_sample: int

    @classmethod
    def of(cls, candidate: np.ndarray, reference: np.ndarray) -> Fidelity:
        cos = per_sample_cosine(candidate, reference)
        worst = int(np.argmin(cos))
        return cls(float(1.0 - cos.mean()), float(cos[worst]), worst)

    def to_dict(self) -> dict:
        return {
            "loss": _num(self.loss),
            "worst_cosine": _num(self.worst_cosine),
            "worst_sample": self.worst_sample,
        }


@dataclass(frozen=True)
class NodeSensitivity:
    """One node: its fidelity when it alone is quantized, and (``gain=True``) how much of the
    fully quantized model's loss goes away when it alone stays fp32."""

    name: str
    op_type: str
    alone: Fidelity
    gain: float | None = None

    @property
    def loss(self) -> float:
        return self.alone.loss

    @property
    def worst_cosine(self) -> float:
        return self.alone.worst_cosine

    def to_dict(self) -> dict:
        out = {"name": self.name, "op_type": self.op_type, **self.alone.to_dict()}
        if self.gain is not None:
            out["gain"] = _num(self.gain)
        return out


@dataclass
class SensitivityReport:
    """Nodes ranked most sensitive first (highest loss; ties in graph order). ``ranges`` are
    the calibration ranges used (static), to reuse: ``StaticQuantize(ranges=report.ranges)``."""

    model: str | None
    data: str
    mode: str
    settings: dict[str, Any]
    calibration: dict[str, Any] | None  # static: data (None: precomputed), method, samples
    output: str
    samples: int
    all_quantized: Fidelity
    nodes: list[NodeSensitivity]
    not_scored: dict[str, str]
    ranges: CalibrationRanges | None = field(default=None, repr=False, compare=False)
    # Static: DequantizeLinear nodes onnxruntime could not fuse in the fully quantized model,
    # and their share of its batch-1 run time (profiled; a timing, so not in the JSON).
    unfused_dq_nodes: int | None = None
    unfused_dq_share: float | None = field(default=None, compare=False)
    # Every tensor the fully quantized model quantizes, worst SQNR first (None: not measured).
    tensor_errors: list[TensorError] | None = None
    tensor_error_samples: int = 0
    batch_size: int = 0  # samples per run the nodes were scored at

    def ranked_nodes(self, by: str = "loss") -> list[str]:
        """Node names, most sensitive first: by ``loss`` (alone quantized) or by ``gain``."""
        if by == "loss":
            return [n.name for n in self.nodes]
        if by != "gain":
            raise BadInputError(f"cannot rank by {by!r}", "use by='loss' or by='gain'")
        if any(n.gain is None for n in self.nodes):
            raise BadInputError("the gains were not measured", "run sensitivity(..., gain=True)")
        order = sorted(range(len(self.nodes)), key=lambda i: (-self.nodes[i].gain, i))
        return [self.nodes[i].name for i in order]

    def to_dict(self) -> dict:
        return {
            "tool": TOOL,
            "version": __version__,
            "model": self.model,
            "data": self.data,
            "mode": self.mode,
            "settings": self.settings,
            "calibration": self.calibration,
            "metric": "cosine",
            "output": self.output,
            "samples": self.samples,
            "batch_size": self.batch_size,
            "all_quantized": self.all_quantized.to_dict(),
            "nodes": [{"rank": i + 1, **n.to_dict()} for i, n in enumerate(self.nodes)],
            "not_scored": self.not_scored,
            "unfused_dq_nodes": self.unfused_dq_nodes,
            "tensor_error_samples": self.tensor_error_samples,
            "tensor_errors": None
            if self.tensor_errors is None
            else [e.to_dict() for e in self.tensor_errors],
        }

    def to_json(self) -> str:
        """Deterministic: the same model, data and options give the same bytes."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    def summary(self, top: int | None = None, errors: int = defaults.NODE_ERROR_ROWS) -> str:
        """The ranked table (``top`` limits it to the first rows), then the ``errors`` worst
        tensors (0: none)."""
        return _summary(self, top) + _error_summary(self, errors)


# ---------------------------------------------------------------- rendering


def _summary(r: SensitivityReport, top: int | None) -> str:
    lines = [f"sensitivity of {r.model or 'the model'} ({describe_settings(r.mode, r.settings)})"]
    if r.calibration is not None:
        c = r.calibration
        source = c["data"] or "precomputed ranges"
        lines.append(f"  calibrated on {source} ({c['samples']} samples, {c['method']})")
    lines.append(
        f"  scored on {r.data} ({r.samples} samples, batch {r.batch_size}), output {r.output}: "
        "loss = 1 − mean cosine to fp32"
    )
    a = r.all_quantized
    lines.append(
        f"  fully quantized ({len(r.nodes) + len(r.not_scored)} nodes int8): "
        f"loss {_fmt(a.loss)}, worst cosine {_fmt(a.worst_cosine)} (sample {a.worst_sample})"
    )
    if r.unfused_dq_share is not None:
        lines.append(
            f"  unfused DequantizeLinear: {r.unfused_dq_nodes} nodes, "
            f"{100 * r.unfused_dq_share:.1f} % of the run time (profiled, batch 1; a fast "
            "static model has none)"
        )
    by_reason: dict[str, list[str]] = {}
    for name, reason in r.not_scored.items():
        by_reason.setdefault(reason, []).append(name)
    for reason, names in by_reason.items():
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        lines.append(f"  not scored, {reason}: {', '.join(names[:3])}{more}")
    shown = r.nodes[:top] if top else r.nodes
    with_gain = any(n.gain is not None for n in r.nodes)
    rows = [("rank", "node", "op", "loss", "worst cos") + (("gain",) if with_gain else ())]
    for i, n in enumerate(shown, start=1):
        row = (str(i), n.name, n.op_type, _fmt(n.loss), _fmt(n.worst_cosine))
        rows.append(row + ((_fmt(n.gain),) if with_gain else ()))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = {0, 3, 4, 5}
    for row in rows:
        cells = [
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))
        ]
        lines.append("  " + "  ".join(cells).rstrip())
    if len(shown) < len(r.nodes):
        lines.append(f"  ... {len(r.nodes) - len(shown)} more (--top 0 shows all, --json has all)")
    return "\n".join(lines)


def _error_summary(r: SensitivityReport, rows: int) -> str:
    """The ``rows`` worst tensors of the fully quantized model, as a table."""
    if not rows or r.tensor_errors is None:
        return ""

    lines = [
        "",
        f"  per-tensor error of the fully quantized model vs fp32 ({r.tensor_error_samples} "
        "samples): SQNR of each tensor's int8",
        "  round trip alone, and propagated = its value in the int8 model (upstream errors "
        "included); worst first",
    ]
    table = [ERROR_HEADER] + error_rows(r.tensor_errors, rows)
    widths = [max(len(row[i]) for row in table) for i in range(len(ERROR_HEADER))]
    for row in table:
        cells = [c.rjust(w) if i >= 3 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  " + "  ".join(cells).rstrip())
    if len(r.tensor_errors) > rows:
        lines.append(f"  ... {len(r.tensor_errors) - rows} more (--json has all)")
    return "\n".join(lines)
