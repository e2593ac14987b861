"""``validate``'s kernel truth: a QDQ model's score both ways on the first samples.

``validate`` scores a model in onnxruntime's optimized session — the fused integer kernels,
what ships — and its gates read that figure. For a QDQ model this module also scores the
first :data:`DEFAULT_SAMPLES` samples with optimizations off (QuantizeLinear and
DequantizeLinear as float ops: the model's semantics, what calibration and ``sensitivity``
measured) and with them on, the same metrics of the gated output against the same labels and
reference outputs (:mod:`converter.check.validate_score`'s sums). When the two figures differ
by more than ``threshold`` in mean cosine or in accuracy/agreement (0.01: one point), the
nodes where the tensors part are named (:func:`converter.check.kernel_truth.locate`, on the
first few of those samples).

If onnxruntime cannot run the model with optimizations off, the semantics figure is
unavailable, with the reason; that is not a failure of the validation. The reference's
outputs on those samples are kept in a :class:`ReferenceCache` that ``auto`` shares between
its candidates, so each candidate costs two runs of itself only.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from converter.check.kernel_truth import locate
from converter.check.kernel_truth_report import Parting
from converter.check.validate_report import MetricValue
from converter.check.validate_score import Running
from converter.core import defaults
from converter.core import metrics as M
from converter.core.data import Dataset, InputSpec
from converter.core.errors import BadInputError
from converter.core.gates import json_number as _num
from converter.core.machine import METADATA_KEY, host_target
from converter.core.runtime import make_session, run_session

__all__ = [
    "KernelFigures",
    "ReferenceCache",
    "kernel_figures",
    "DEFAULT_SAMPLES",
    "FIGURE_METRICS",
]

logger = logging.getLogger(__name__)

DEFAULT_SAMPLES = defaults.VALIDATE_KERNEL_SAMPLES
FIGURE_METRICS = ("accuracy", "agreement", "cosine")  # the scores compared both ways

Feeds = list[dict[str, np.ndarray]]


@dataclass(frozen=True)
class KernelFigures:
    """The gated ``output`` scored on the first ``samples`` samples both ways: ``kernels``
    (optimizations on) and ``semantics`` (off; None when onnxruntime could not run it, and
    ``unavailable`` says why), each metric → value. ``metric`` is the score validate gates
    on. ``diverged``: some score differs by more than ``threshold``; then ``parts`` (named on
    the first ``located_on`` samples; ``located`` as in KernelTruth). ``target_note``: the
    model was built for another int8 target than this host's."""

    output: str
    metric: str
    samples: int
    batch_size: int
    threads: int
    threshold: float
    kernels: dict[str, MetricValue]
    semantics: dict[str, MetricValue] | None
    unavailable: str | None = None
    diverged: bool = False
    parts: tuple[Parting, ...] = ()
    located: bool | None = None
    located_on: int = 0
    target_note: str | None = None

    def score(self, which: str) -> float | None:
        """The gated metric's value, ``which`` = "kernels" or "semantics"."""
        values = getattr(self, which)
        return None if values is None or self.metric not in values else values[self.metric].value

    def to_dict(self) -> dict:
        def values(v: dict[str, MetricValue] | None) -> dict | None:
            return None if v is None else {m: x.to_dict() for m, x in v.items()}

        return {
            "output": self.output,
            "metric": self.metric,
            "samples": self.samples,
            "batch_size": self.batch_size,
            "threads": self.threads,
            "threshold": self.threshold,
            "semantics_score": _num(self.score("semantics")),
            "kernel_score": _num(self.score("kernels")),
            "semantics": values(self.semantics),
            "kernels": values(self.kernels),
            "semantics_unavailable": self.unavailable,
            "diverged": self.diverged,
            "parts": [p.to_dict() for p in self.parts],
            "located": self.located,
            "located_on": self.located_on,
            "target_note": self.target_note,
        }

    def compact(self) -> dict:
        """What auto keeps per candidate: both scores, the verdict, the nodes named."""
        return {
            "samples": self.samples,
            "semantics_score": _num(self.score("semantics")),
            "kernel_score": _num(self.score("kernels")),
            "semantics_unavailable": self.unavailable,
            "diverged": self.diverged,
            "parts": [", ".join(p.nodes) or p.tensor for p in self.parts],
        }

    def lines(self) -> list[str]:
        """What validate prints."""
        head = f"kernel truth on the first {self.samples} samples ({self.output}, {self.metric})"
        k = self.score("kernels")
        if self.semantics is None:
            out = [
                f"{head}: kernels {k:.4f}; semantics (optimizations off) unavailable: "
                f"{self.unavailable}"
            ]
        else:
            s = self.score("semantics")
            verdict = "DIVERGE" if self.diverged else "agree"
            out = [f"{head}: kernels {k:.4f}, semantics {s:.4f} — {verdict}"]
            if self.diverged:
                out.append(
                    f"  the shipped kernels compute something other than the model's QDQ "
                    f"semantics (by more than {self.threshold:g} mean cosine or "
                    f"{100 * self.threshold:g} point{'s' if self.threshold != 0.01 else ''} "
                    "accuracy); the gates read the kernel figure"
                )
            for p in self.parts:
                where = ", ".join(p.nodes) or p.tensor
                out.append(
                    f"  parts at {where}: relative error {p.relative_error:.3g} "
                    f"(upstream {p.upstream_error:.3g}, first {self.located_on} samples)"
                )
            if self.diverged and not self.parts:
                out.append("  (no node where the tensors part was found on the first samples)")
        if self.target_note:
            out.append(f"  {self.target_note}")
        return out

    def properties(self) -> list[tuple[str, str]]:
        """JUnit properties."""
        props = [
            ("kernel_truth.samples", str(self.samples)),
            ("kernel_truth.kernel_score", repr(self.score("kernels"))),
            ("kernel_truth.semantics_score", repr(self.score("semantics"))),
            ("kernel_truth.diverged", str(self.diverged).lower()),
        ]
        if self.unavailable:
            props.append(("kernel_truth.semantics_unavailable", self.unavailable))
        if self.parts:
            nodes = "; ".join(", ".join(p.nodes) or p.tensor for p in self.parts)
            props.append(("kernel_truth.parts", nodes))
        if self.target_note:
            props.append(("kernel_truth.target_note", self.target_note))
        return props


@dataclass
class ReferenceCache:
    """The reference model's outputs on the first samples of a data set, by (reference,
    data, samples, batch): computed once per scoring set, shared by every candidate."""

    entries: dict[tuple, list[list[np.ndarray]]] = field(default_factory=dict)

    def outputs(
        self,
        reference: str | os.PathLike,
        feeds: Feeds,
        key: tuple,
        ref_specs: Sequence[InputSpec],
        threads: int,
    ) -> list[list[np.ndarray]]:
        full = (_digest(reference), *key)
        if full not in self.entries:
            session = make_session(str(reference), threads)
            dtypes = {s.name: s.dtype for s in ref_specs}
            self.entries[full] = [
                run_session(
                    session,
                    {k: a.astype(dtypes.get(k, a.dtype), copy=False) for k, a in f.items()},
                    f"reference {reference}",
                )
                for f in feeds
            ]
        return self.entries[full]


def _digest(path: str | os.PathLike) -> str:
    p = Path(path)
    return f"{p.resolve()}:{hashlib.sha256(p.read_bytes()).hexdigest()}"


def kernel_figures(
    candidate: str | os.PathLike,
    dataset: Dataset,
    specs: Sequence[InputSpec],
    reference: str | os.PathLike | None,
    ref_specs: Sequence[InputSpec] | None,
    labels: np.ndarray | None,
    metrics: Sequence[str],
    output: str,
    batch_size: int,
    threads: int = 1,
    samples: int = DEFAULT_SAMPLES,
    threshold: float = defaults.KERNEL_TRUTH_THRESHOLD,
    cache: ReferenceCache | None = None,
) -> KernelFigures:
    """Score the QDQ ``candidate``'s ``output`` on the first ``samples`` samples of
    ``dataset`` both ways (see the module docstring). ``metrics``: validate's chosen ones;
    those in FIGURE_METRICS that the labels/reference allow are compared (cosine always,
    with a reference)."""
    model = onnx.load(str(candidate), load_external_data=False)
    names = [o.name for o in model.graph.output]
    index = names.index(output)
    feeds = list(dataset.batches(specs, batch_size, limit=samples))
    count = sum(len(next(iter(f.values()))) for f in feeds)
    refs = None
    if reference is not None:
        cache = cache if cache is not None else ReferenceCache()
        key = (str(dataset.path), count, batch_size)
        refs = cache.outputs(reference, feeds, key, ref_specs or specs, threads)
    wanted = [m for m in FIGURE_METRICS if m in metrics or (m == "cosine" and refs is not None)]
    wanted = [m for m in wanted if (refs is not None if m != "accuracy" else labels is not None)]
    metric = next((m for m in metrics if m in wanted), wanted[0])
    kernels = _reading(candidate, True, feeds, index, refs, labels, wanted, threads)
    semantics, unavailable = None, None
    try:
        semantics = _reading(candidate, False, feeds, index, refs, labels, wanted, threads)
    except BadInputError as e:  # onnxruntime cannot run its float reading: say so, go on
        unavailable = e.what
        logger.info("kernel truth: semantics unavailable: %s", e.what)
    diverged = semantics is not None and _diverges(kernels, semantics, threshold)
    parts, located, located_on = (), None, 0
    if diverged:
        first = _first(feeds, defaults.KERNEL_TRUTH_SAMPLES)
        located_on = sum(len(next(iter(f.values()))) for f in first)
        try:
            parts, located = locate(str(candidate), first, threads, threshold)
        except BadInputError as e:
            logger.info("kernel truth: partings not located: %s", e.what)
    return KernelFigures(
        output=output,
        metric=metric,
        samples=count,
        batch_size=batch_size,
        threads=threads,
        threshold=threshold,
        kernels=kernels,
        semantics=semantics,
        unavailable=unavailable,
        diverged=diverged,
        parts=parts,
        located=located,
        located_on=located_on,
        target_note=_target_note(model),
    )


def _reading(
    candidate: str | os.PathLike,
    optimize: bool,
    feeds: Feeds,
    index: int,
    refs: list[list[np.ndarray]] | None,
    labels: np.ndarray | None,
    wanted: Sequence[str],
    threads: int,
) -> dict[str, MetricValue]:
    how = "on" if optimize else "off"
    session = make_session(str(candidate), threads, optimize=optimize)
    running, done = Running(), 0
    for i, feed in enumerate(feeds):
        out = np.asarray(run_session(session, feed, f"{candidate} (optimizations {how})")[index])
        n = len(next(iter(feed.values())))
        if "accuracy" in wanted:
            running.count("accuracy", M.correct(out, labels[done : done + n]))
        if refs is not None:
            running.add_reference(out, np.asarray(refs[i][index]), set(wanted))
        done += n
    result = running.result()
    return {m: result[m] for m in wanted if m in result}


def _diverges(
    kernels: dict[str, MetricValue], semantics: dict[str, MetricValue], threshold: float
) -> bool:
    """Some score differs by more than ``threshold`` (a NaN differs)."""
    return any(
        not abs(kernels[m].value - semantics[m].value) <= threshold
        for m in kernels
        if m in semantics
    )


def _first(feeds: Feeds, samples: int) -> Feeds:
    """The first ``samples`` samples of ``feeds``, one per feed (batch 1)."""
    out: Feeds = []
    for feed in feeds:
        n = len(next(iter(feed.values())))
        for j in range(n):
            if len(out) == samples:
                return out
            out.append({k: a[j : j + 1] for k, a in feed.items()})
    return out


def _target_note(model: onnx.ModelProto) -> str | None:
    built = next((p.value for p in model.metadata_props if p.key == METADATA_KEY), None)
    host = host_target().name
    if built is None or built == host:
        return None
    return (
        f"the kernel figure is this host's ({host}), not the target's ({built}): onnxruntime "
        "picks other int8 kernels there"
    )
