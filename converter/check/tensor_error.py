"""One quantized tensor's error (:class:`TensorError`): the record, the float64 running sums
its SQNR and cosine are computed from (one sample at a time), and its table rows. How the
tensors are found and measured: :mod:`converter.check.node_error`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from converter.core.gates import json_number as _num
from converter.core.render import cell

__all__ = ["TensorError", "Sums", "EXACT_DB", "ERROR_HEADER", "error_rows"]

_EPS = float(np.finfo(float).eps)  # onnxruntime's floor in its SQNR
EXACT_DB = 20 * math.log10(1 / _EPS)  # 313.1 dB: a unit-norm tensor kept exact


@dataclass(frozen=True)
class TensorError:
    """One quantized tensor: its error alone (``sqnr_db``, ``cosine``) and, for activations
    and node outputs, propagated through the int8 model (see :mod:`converter.check.node_error`)."""

    tensor: str
    kind: str  # activation | output | weight | bias (int32: bias correction moves it)
    nodes: tuple[str, ...]  # the nodes reading it as int8 (activation, weight) or making it
    sqnr_db: float
    cosine: float
    propagated_sqnr_db: float | None = None
    propagated_cosine: float | None = None

    @classmethod
    def from_dict(cls, d: Mapping) -> TensorError:
        """The inverse of :meth:`to_dict` (a number JSON made null comes back as NaN)."""
        nan = float("nan")
        return cls(
            d["tensor"],
            d["kind"],
            tuple(d["nodes"]),
            nan if d["sqnr_db"] is None else d["sqnr_db"],
            nan if d["cosine"] is None else d["cosine"],
            d["propagated_sqnr_db"],
            d["propagated_cosine"],
        )

    def to_dict(self) -> dict:
        return {
            "tensor": self.tensor,
            "kind": self.kind,
            "nodes": list(self.nodes),
            "sqnr_db": _num(self.sqnr_db),
            "cosine": _num(self.cosine),
            "propagated_sqnr_db": _num(self.propagated_sqnr_db),
            "propagated_cosine": _num(self.propagated_cosine),
        }


class Sums:
    """Running sums of one comparison (reference x, candidate y) in float64."""

    def __init__(self) -> None:
        self.xx = self.yy = self.xy = self.dd = 0.0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64).ravel()
        y = np.asarray(y, dtype=np.float64).ravel()
        d = x - y
        self.xx += float(x @ x)
        self.yy += float(y @ y)
        self.xy += float(x @ y)
        self.dd += float(d @ d)

    def sqnr_db(self) -> float:
        """onnxruntime's compute_signal_to_quantization_noice_ratio, from the sums; an all-zero
        tensor kept exact gets :data:`EXACT_DB` (onnxruntime: 0 dB, which would rank it worst)."""
        if self.xx == 0 and self.dd == 0:
            return EXACT_DB
        signal = max(math.sqrt(self.xx), _EPS)
        noise = max(math.sqrt(self.dd), _EPS)
        return 20 * math.log10(signal / noise)

    def cosine(self) -> float:
        if self.xx == 0 and self.yy == 0:
            return 1.0
        if self.xx == 0 or self.yy == 0:
            return 0.0
        return max(-1.0, min(1.0, self.xy / math.sqrt(self.xx * self.yy)))


ERROR_HEADER = ["tensor", "kind", "node", "SQNR (dB)", "cosine", "propagated SQNR (dB)"]


def error_rows(records: Sequence[TensorError], top: int | None = None) -> list[list[str]]:
    """Table rows (``ERROR_HEADER``) of the first ``top`` records, for the CLI and reports."""

    rows = []
    for r in records[:top] if top else records:
        nodes = ", ".join(r.nodes[:1]) + (f" +{len(r.nodes) - 1}" if len(r.nodes) > 1 else "")
        rows.append(
            [
                r.tensor,
                r.kind,
                nodes,
                cell(r.sqnr_db, ".1f"),
                cell(r.cosine, ".5f"),
                cell(r.propagated_sqnr_db, ".1f"),
            ]
        )
    return rows
