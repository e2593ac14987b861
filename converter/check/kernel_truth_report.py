"""The records of a kernel-truth check (:mod:`converter.check.kernel_truth`): how closely two
sets of outputs agree (:class:`Agreement`), each output both ways (:class:`OutputTruth`), a
tensor where the kernels part from the model's semantics (:class:`Parting`) and the whole
result (:class:`KernelTruth`), with their JSON and their lines of text."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from converter.core.gates import json_number as _num
from converter.core.metrics import agrees, per_sample_cosine
from converter.core.render import cell

__all__ = ["Agreement", "OutputTruth", "Parting", "KernelTruth", "PARTING_HEADER", "parting_rows"]


@dataclass(frozen=True)
class Agreement:
    """Candidate outputs against reference ones over every sample: the mean and the worst
    per-sample cosine, and for a 2-D output of two or more columns (logits-like) the share of
    samples whose argmax over the last axis agrees (``top1``; None for other shapes)."""

    mean_cosine: float
    worst_cosine: float
    top1: float | None = None

    @classmethod
    def of(cls, candidate: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> Agreement:
        """From per-feed arrays (one per feed, the same shapes pairwise)."""
        cosines = np.concatenate(
            [per_sample_cosine(c, r) for c, r in zip(candidate, reference, strict=True)]
        )
        top1 = None
        if all(np.ndim(r) == 2 and np.shape(r)[-1] >= 2 for r in reference):
            hits = np.concatenate([agrees(c, r) for c, r in zip(candidate, reference)])
            top1 = float(hits.mean())
        return cls(float(cosines.mean()), float(cosines.min()), top1)

    def to_dict(self) -> dict:
        return {
            "mean_cosine": _num(self.mean_cosine),
            "worst_cosine": _num(self.worst_cosine),
            "top1": _num(self.top1),
        }


@dataclass(frozen=True)
class OutputTruth:
    """One graph output: the shipped kernels (optimizations on) against the model's semantics
    (optimizations off), and, given float reference outputs, each of them against those."""

    output: str
    kernels_vs_semantics: Agreement
    semantics_vs_reference: Agreement | None = None
    kernels_vs_reference: Agreement | None = None

    def gaps(self) -> tuple[float, float | None]:
        """(1 − mean cosine of kernels vs semantics, |semantics' − kernels' mean cosine to
        the reference| or None without a reference)."""
        own = 1.0 - self.kernels_vs_semantics.mean_cosine
        if self.semantics_vs_reference is None or self.kernels_vs_reference is None:
            return own, None
        ref = abs(self.semantics_vs_reference.mean_cosine - self.kernels_vs_reference.mean_cosine)
        return own, ref

    def to_dict(self) -> dict:
        return {
            "output": self.output,
            "kernels_vs_semantics": self.kernels_vs_semantics.to_dict(),
            "semantics_vs_reference": _opt(self.semantics_vs_reference),
            "kernels_vs_reference": _opt(self.kernels_vs_reference),
        }


def _opt(a: Agreement | None) -> dict | None:
    return None if a is None else a.to_dict()


@dataclass(frozen=True)
class Parting:
    """A compared tensor (an activation's QuantizeLinear output, or a graph output) where the
    kernels' value departs from the semantics' much more than at the tensors it is computed
    from: ``nodes`` are the nodes between those tensors and it (what onnxruntime fuses into
    one kernel, usually one Conv/MatMul/Add with its Relu/Clip), ``relative_error`` is
    ‖kernels − semantics‖ / ‖semantics‖ here (dequantized, all samples), ``upstream_error``
    the largest one among the compared tensors it is computed from (0: none)."""

    tensor: str
    nodes: tuple[str, ...]
    op_types: tuple[str, ...]
    relative_error: float
    upstream_error: float
    cosine: float

    def to_dict(self) -> dict:
        return {
            "tensor": self.tensor,
            "nodes": list(self.nodes),
            "op_types": list(self.op_types),
            "relative_error": _num(self.relative_error),
            "upstream_error": _num(self.upstream_error),
            "cosine": _num(self.cosine),
        }


PARTING_HEADER = ["tensor", "nodes", "rel. error", "upstream rel. error", "cosine"]


def parting_rows(parts: Sequence[Parting]) -> list[list[str]]:
    """Table rows (``PARTING_HEADER``) for the CLI and reports."""
    rows = []
    for p in parts:
        nodes = ", ".join(f"{n} ({t})" for n, t in zip(p.nodes, p.op_types)) or "—"
        rows.append(
            [
                p.tensor,
                nodes,
                cell(p.relative_error, ".4f"),
                cell(p.upstream_error, ".4f"),
                cell(p.cosine, ".5f"),
            ]
        )
    return rows


@dataclass(frozen=True)
class KernelTruth:
    """A QDQ model run both ways on ``samples`` samples with ``threads`` intra-op threads.

    ``diverged``: for some output, the two readings' mean cosines to the reference differ by
    more than ``threshold`` (without a reference: the kernels' mean cosine to the semantics
    is below 1 − ``threshold``; see :func:`converter.check.kernel_truth.kernel_truth`).
    ``parts``: when diverged, the first tensors (graph order) where the kernels part from the
    semantics; ``located`` is False when the copy exposing the tensors computed other outputs
    in kernels than the model (onnxruntime fused it differently: the parts may be missing).
    ``host``: the machine line of the host the kernel figure was measured on, ``host_target``
    its int8 target, and ``model_target`` the target the model was built for (its metadata;
    None when absent): when they differ, the kernel figure is this host's, not the target's
    (:attr:`note`)."""

    outputs: tuple[OutputTruth, ...]
    diverged: bool
    threshold: float
    samples: int
    threads: int
    parts: tuple[Parting, ...]
    located: bool | None
    host: str
    host_target: str
    model_target: str | None

    @property
    def note(self) -> str | None:
        """The sentence a caller prints when the kernel figure is not the target's."""
        if self.model_target is None or self.model_target == self.host_target:
            return None
        return (
            f"kernel figure is this host's ({self.host_target}), not the target's "
            f"({self.model_target}): onnxruntime picks other int8 kernels there"
        )

    def to_dict(self) -> dict:
        return {
            "diverged": self.diverged,
            "threshold": self.threshold,
            "samples": self.samples,
            "threads": self.threads,
            "outputs": [o.to_dict() for o in self.outputs],
            "parts": [p.to_dict() for p in self.parts],
            "located": self.located,
            "host": self.host,
            "host_target": self.host_target,
            "model_target": self.model_target,
            "note": self.note,
        }

    def lines(self) -> list[str]:
        """What a verb prints: one line per output, the parts when diverged, the note."""
        how = f"{self.samples} samples, {self.threads} thread{'s' if self.threads != 1 else ''}"
        head = (
            "kernels DIVERGE from the model's QDQ semantics" if self.diverged else "kernels agree"
        )
        out = [f"kernel truth ({how}; optimizations on vs off): {head}"]
        for o in self.outputs:
            ks = o.kernels_vs_semantics
            text = (
                f"  {o.output}: kernels vs semantics mean cosine {ks.mean_cosine:.4f}, "
                f"worst {ks.worst_cosine:.4f}"
            )
            if ks.top1 is not None:
                text += f", top-1 {ks.top1:.3f}"
            if o.semantics_vs_reference is not None and o.kernels_vs_reference is not None:
                s, k = o.semantics_vs_reference, o.kernels_vs_reference
                text += f"; vs fp32: semantics {s.mean_cosine:.4f}, kernels {k.mean_cosine:.4f}"
            out.append(text)
        for p in self.parts:
            where = ", ".join(p.nodes) or p.tensor
            out.append(
                f"  parts at {where}: relative error {p.relative_error:.3g} "
                f"(upstream {p.upstream_error:.3g})"
            )
        if self.diverged and self.located is False:
            out.append("  (the tensors could not be compared in the shipped kernels' graph)")
        if self.note:
            out.append(f"  {self.note}")
        return out
