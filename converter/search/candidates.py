"""auto's candidates: the full-int8 configurations it tries, the passes each one runs, and
the :class:`Candidate` record that the builder, the bench and the reports fill in."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from converter.core.errors import InternalError, OnnxshipError, first_line

__all__ = [
    "Candidate",
    "complete",
    "CALIBRATED",
    "MIN_CALIBRATION",
    "uses",
    "configs",
    "passes_of",
    "failure_reason",
    "bug_of",
    "SMOOTH_ALPHA",
    "log_scored",
]

logger = logging.getLogger(__name__)

SMOOTH_ALPHA = 0.8  # all-MiniLM-L6-v2, avx2: 0.9965 / 0.9924 vs 0.9947 / 0.9877 at 0.95
_GPTQ = {"weight_rounding": "gptq"}

CALIBRATED = ("quantize-static", "smooth")  # the passes that read the calibration samples
# The fewest calibration samples a method needs, and why.
MIN_CALIBRATION = {
    "GPTQ rounding": (
        128,
        "the GPTQ paper calibrates on 128 samples; all-MiniLM-L6-v2 on 15 sentences scored "
        "0.9940 / 0.9767, on 200 others 0.9971 / 0.9931",
    ),
}


@dataclass
class Candidate:
    name: str
    passes: list[dict[str, Any]]
    key: str = ""
    path: Path | None = None
    score: float | None = None
    cosine: float | None = None
    worst: float | None = None
    meets: bool = False
    error: str = ""
    p50_ms: float | None = None
    p90_ms: float | None = None
    speedup: float | None = None
    size: int | None = None
    cached: bool = False
    unfused_dq: float | None = None  # share of run time in unfused DequantizeLinear (static)
    node_errors: dict[str, Any] | None = None  # {"samples", "tensors"}: see auto's node errors
    scored_at: dict[str, Any] | None = None  # how the score was measured: ValidationReport.scoring
    # The QDQ semantics figure beside the kernel one (validate_kernels.KernelFigures.compact),
    # the int8 share of multiply-adds (int8_share.Int8Share.to_dict) and, for a step of the
    # fp32 fallback, its verdict (converter.search.fallback).
    semantics: dict[str, Any] | None = None
    int8_macs: dict[str, Any] | None = None
    fallback: str = ""
    calib_samples: int | None = None  # the calibration samples its passes read (None: none)
    # Decided on the subset (converter.search.subset): {"score", "cosine", "worst" there,
    # "samples", "of" (the whole set's), "miss": why it misses whatever the rest scores};
    # score, cosine and worst stay None until Builder.complete scores the rest.
    subset: dict[str, Any] | None = None

    def row(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}

    def scored(self) -> bool:
        """Scored, on the whole set or (``subset``) on the subset only."""
        return self.score is not None or self.subset is not None


def complete(builder: Any, c: Candidate | None) -> Candidate | None:
    """``c`` scored on the whole set if it was decided on the subset (Builder.complete): what
    a decision reading the score of a candidate that misses the budget calls first (a
    builder without subset-first scoring returns ``c`` as it is)."""
    finish = getattr(builder, "complete", None)
    return finish(c) if c is not None and finish is not None else c


def uses(candidate: Candidate, method: str) -> bool:
    """Whether ``candidate``'s passes use ``method`` (a key of MIN_CALIBRATION)."""
    if method == "GPTQ rounding":
        return any(p.get("weight_rounding") == "gptq" for p in candidate.passes)
    return False


def log_scored(c: Candidate) -> Candidate:
    """The progress line of a scored candidate (a fallback step's verdict after a dash)."""
    if c.subset:
        s = c.subset
        logger.info(
            "  %-34s misses on %d of %d samples: %s (there: score %.4f, worst cosine %.4f)%s",
            c.name, s["samples"], s["of"], s["miss"], s["score"], s["worst"],
            " (cached)" if c.cached else "",
        )  # fmt: skip
    elif c.score is not None:
        logger.info(
            "  %-34s score %.4f  worst cosine %.4f  %s%s%s",
            c.name,
            c.score,
            c.worst,
            "meets" if c.meets else "misses",
            " (cached)" if c.cached else "",
            f" — {c.fallback}" if c.fallback else "",
        )
    return c


def failure_reason(e: Exception) -> str:
    """The one line the report gives a candidate (or a stage) that failed: our error's
    message, or for an exception onnxship did not expect, the internal error it is. The
    search goes on without it; only the environment (OSError, MemoryError) and signals
    end the search, and callers let those through."""
    return e.message if isinstance(e, OnnxshipError) else InternalError(first_line(e)).message


def bug_of(reason: str) -> str | None:
    """What a failure reason made by :func:`failure_reason` says of a bug of onnxship (an
    internal error), without the advice; None for any other failure."""
    _, found, rest = reason.partition("internal error: ")
    return rest.rsplit(" — ", 1)[0] if found else None


def configs(model: onnx.ModelProto, target: str) -> list[tuple[str, dict[str, Any]]]:
    """The full-int8 configurations to try for ``target``, as (name, pass settings)."""
    ops = {n.op_type for n in model.graph.node}
    found = []
    if ops & {"MatMul", "Gemm"}:
        found += [
            ("dynamic_pc", {"pass": "quantize-dynamic", "per_channel": True}),
            ("dynamic_pt", {"pass": "quantize-dynamic", "per_channel": False}),
            ("static_transformer", {"pass": "quantize-static", "scheme": "transformer"}),
        ]
    if ops & {"MatMul"} and "LayerNormalization" in ops:  # SmoothQuant folded into LayerNorm
        smooth = {"pass": "quantize-static", "scheme": "transformer", "smooth": SMOOTH_ALPHA}
        found += [
            (f"smooth{SMOOTH_ALPHA:g}_static_transformer", smooth),
            (f"smooth{SMOOTH_ALPHA:g}_static_transformer_gptq", {**smooth, **_GPTQ}),
        ]
    # every-op Q/DQ, named explicitly (StaticQuantize's own default is "auto", which picks
    # the transformer scheme for encoders: tried above as static_transformer)
    # (the calibration method always named: the pass's default may change); mse is the
    # default scheme's own default, and with bias correction its best on real CNNs
    every_op = {"pass": "quantize-static", "scheme": "default"}
    for method in ("minmax", "mse", "percentile", "entropy"):
        found.append((f"static_u8_pc_{method}", {**every_op, "calib_method": method}))
    mse = {**every_op, "calib_method": "mse"}
    found += [
        ("static_s8_pc_mse", {**mse, "activation_type": "int8"}),
        ("static_u8_pt_mse", {**mse, "per_channel": False}),
    ]
    return [(name, {**config, "target": target}) for name, config in found]


def passes_of(config: dict[str, Any], excluded: list[str]) -> list[dict[str, Any]]:
    """The passes of a configuration; its ``smooth`` alpha becomes a SmoothQuant pass first."""
    entry = dict(config)
    alpha = entry.pop("smooth", None)
    if excluded:
        entry["nodes_to_exclude"] = sorted(excluded)
    return ([{"pass": "smooth", "alpha": alpha}] if alpha is not None else []) + [entry]
