"""Activation ranges that minimise the int8 quantization error of each tensor (``mse``).

MinMax spends the int8 grid on the single most extreme value seen; on a pretrained CNN a
handful of outliers per tensor then set a step far coarser than the bulk of the values needs.
Here each tensor's range ``[lo, hi]`` (always containing 0, as onnxruntime makes it) is the one
whose expected squared error — rounding inside the range, clipping outside it — is smallest
over the calibration data.

Streamed in two passes over the data, one batch at a time, so memory does not grow with the
sample count: the first pass finds each tensor's extremes, the second fills a fixed
:data:`BINS`-bin histogram per tensor over them. The search then runs on the histograms:
for a step ``s = (hi - lo) / levels`` a value inside the range costs ``s² / 12`` (uniform
rounding error) and one outside it its squared distance to the range; sums over bins use
prefix sums, so every ``(lo, hi)`` on a :data:`GRID` × :data:`GRID` grid costs O(1).
Integer counts and a fixed grid: the same data gives the same ranges, bit for bit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx

from converter.core.runtime import tensor_values
from passes.calibration import MASK_FILL

__all__ = ["BINS", "GRID", "best_range", "histogram_extremes", "mse_ranges"]

logger = logging.getLogger(__name__)

BINS = 2048  # histogram bins per tensor
GRID = 128  # candidate clip points per side
ROWS = 8  # samples per model run: every activation of a batch is held at once (MobileNetV2
# at 224²: 1.6 GB peak with 8, 2.7 GB with 16); the ranges do not depend on it


def _split(feeds: Iterable[Mapping[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
    """The batches of ``feeds`` in pieces of at most :data:`ROWS` samples."""
    for feed in feeds:
        size = len(next(iter(feed.values())))
        if any(len(v) != size for v in feed.values()):
            yield dict(feed)
            continue
        for start in range(0, size, ROWS):
            yield {k: v[start : start + ROWS] for k, v in feed.items()}


def _finite(value: np.ndarray) -> np.ndarray:
    """``value`` flattened, without mask fills (|x| ≥ MASK_FILL; a copy only when it has some)."""
    flat = np.asarray(value, np.float32).ravel()
    if flat.size and max(-float(flat.min()), float(flat.max())) < MASK_FILL:
        return flat
    return flat[np.abs(flat) < MASK_FILL]


def histogram_extremes(
    model: onnx.ModelProto, names: Sequence[str], feeds: Iterable[Mapping[str, np.ndarray]]
) -> tuple[dict[str, tuple[float, float]], int]:
    """First pass: (lowest, highest) of each tensor of ``names``, and the samples seen."""
    lows = dict.fromkeys(names, np.inf)
    highs = dict.fromkeys(names, -np.inf)
    seen = 0
    for feed, values in tensor_values(model, names, feeds):
        seen += len(next(iter(feed.values())))
        for name, value in zip(names, values):
            flat = _finite(value)
            if flat.size:
                lows[name] = min(lows[name], float(flat.min()))
                highs[name] = max(highs[name], float(flat.max()))
    extremes = {}
    for name in names:
        low, high = (lows[name], highs[name]) if np.isfinite(lows[name]) else (0.0, 0.0)
        extremes[name] = (min(low, 0.0), max(high, 0.0))
    return extremes, seen


def _histograms(
    model: onnx.ModelProto,
    extremes: Mapping[str, tuple[float, float]],
    feeds: Iterable[Mapping[str, np.ndarray]],
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Second pass: a :data:`BINS`-bin count histogram of each tensor over its extremes, and
    how many of its values are exactly 0 (post-ReLU zeros: the zero point holds them exactly,
    they cost no rounding error)."""
    names = list(extremes)
    counts = {name: np.zeros(BINS, np.int64) for name in names}
    zeros = dict.fromkeys(names, 0)
    for _, values in tensor_values(model, names, feeds):
        for name, value in zip(names, values):
            low, high = extremes[name]
            if high <= low:
                continue
            flat = _finite(value)
            zeros[name] += int(np.count_nonzero(flat == 0))
            index = ((flat - np.float32(low)) * np.float32(BINS / (high - low))).astype(np.int32)
            np.clip(index, 0, BINS - 1, out=index)
            counts[name] += np.bincount(index, minlength=BINS)
    return counts, zeros


def best_range(
    counts: np.ndarray, low: float, high: float, levels: int = 255, zeros: int = 0
) -> tuple[float, float, float]:
    """``(lo, hi, mse)``: the clip range with the smallest expected squared error for values
    distributed as ``counts`` over ``[low, high]`` (``low ≤ 0 ≤ high``; ``zeros`` of them
    exactly 0, which round exactly), quantized with ``levels`` steps; candidates are bin
    edges on a :data:`GRID`-point grid per side."""
    total = counts.sum()
    if high <= low or total == 0:
        return low, high, 0.0
    edges = np.linspace(low, high, len(counts) + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    n = counts.astype(np.float64)
    c0, c1, c2 = (np.concatenate([[0.0], np.cumsum(n * centers**k)]) for k in (0, 1, 2))
    below_zero = int(np.searchsorted(edges, 0.0, "right")) - 1  # last edge ≤ 0
    above_zero = int(np.searchsorted(edges, 0.0, "left"))  # first edge ≥ 0
    his = np.unique(np.linspace(above_zero, len(counts), GRID).round().astype(np.int64))
    los = np.unique(np.linspace(0, below_zero, GRID).round().astype(np.int64))
    hi, lo = edges[his][None, :], edges[los][:, None]
    # Values below lo (bins < i) and above hi (bins ≥ j) are clipped; the rest rounded.
    i, j = los[:, None], his[None, :]
    below = c2[i] - 2 * lo * c1[i] + lo**2 * c0[i]
    above = (c2[-1] - c2[j]) - 2 * hi * (c1[-1] - c1[j]) + hi**2 * (c0[-1] - c0[j])
    inside = (c0[j] - c0[i] - zeros) * ((hi - lo) / levels) ** 2 / 12
    cost = np.where(j > i, (below + above + inside) / total, np.inf)
    a, b = np.unravel_index(int(np.argmin(cost)), cost.shape)
    return float(lo[a, 0]), float(hi[0, b]), float(cost[a, b])


def mse_ranges(
    model: onnx.ModelProto,
    names: Sequence[str],
    feeds: Callable[[], Iterable[Mapping[str, np.ndarray]]],
    levels: int = 255,
):
    """ORT ``TensorsData`` (MinMax kind) with the MSE-optimal range of each tensor of
    ``names``, and the number of samples seen. ``feeds()`` yields the calibration batches
    afresh: it is called twice (extremes, then histograms)."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData

    if not names:
        return TensorsData(CalibrationMethod.MinMax, {}), 0
    extremes, seen = histogram_extremes(model, names, _split(feeds()))
    if not seen:
        raise ValueError("no calibration samples")
    counts, zeros = _histograms(model, extremes, _split(feeds()))
    data = {}
    narrowed = 0
    for name in names:
        low, high = extremes[name]
        lo, hi, _ = best_range(counts[name], low, high, levels, zeros[name])
        narrowed += (lo, hi) != (low, high)
        data[name] = TensorData(lowest=np.array(lo, np.float32), highest=np.array(hi, np.float32))
    logger.info("mse ranges: %d of %d tensors clipped inside their extremes", narrowed, len(names))
    return TensorsData(CalibrationMethod.MinMax, data), seen
