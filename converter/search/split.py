"""auto's data split: without ``--calib``, one data file is cut into calibration and scoring
samples (kept apart: a candidate is never scored on the samples it was calibrated on)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from converter.core.data import LABELS, Dataset, InputSpec
from converter.core.errors import BadInputError
from converter.core.onnxio import atomic_path

__all__ = ["calibration_split", "overlap", "CALIB_EVERY", "CALIB_SAMPLES"]

CALIB_EVERY = 4  # every 4th sample calibrates ...
CALIB_SAMPLES = 256  # ... up to this many


def calibration_split(
    data: Dataset, specs: list, folder: Path, max_score: int
) -> tuple[Path, Path, str]:
    """Every fourth sample (up to CALIB_SAMPLES) to calibration, the rest (up to
    ``max_score``) to scoring, written to ``folder``/calib.npz and score.npz; returns both
    paths and the sentence the report says about the split.

    Why every fourth, and not a random draw (as ``shrink``'s held-out split,
    converter/torch/shrink.py): it is deterministic without a seed (the same file gives the
    same split, so the candidate cache, keyed on both files' hashes, stays valid across
    runs), and it spreads the calibration samples evenly over the file (over its first
    CALIB_EVERY × CALIB_SAMPLES samples when it is longer) instead of taking one block, so a
    file sorted by class or by source still calibrates on all of it. auto's numbers depend on
    this rule: changing it changes every score auto reports."""
    calib: dict[str, list[np.ndarray]] = {}
    score: dict[str, list[np.ndarray]] = {}
    offset, n_calib, n_score = 0, 0, 0
    for feed in data.batches(specs, 256, with_labels=True):
        n = len(next(iter(feed.values())))
        index = np.arange(offset, offset + n)
        to_calib = (index % CALIB_EVERY == 0) & (index // CALIB_EVERY < CALIB_SAMPLES)
        keep = np.flatnonzero(~to_calib)[: max(0, max_score - n_score)]
        for name, array in feed.items():
            if name != LABELS:
                calib.setdefault(name, []).append(array[to_calib])
            score.setdefault(name, []).append(array[keep])
        n_calib, n_score, offset = n_calib + int(to_calib.sum()), n_score + len(keep), offset + n
    if n_calib < 1 or n_score < 2:
        raise BadInputError(
            f"data {data.path} has too few samples ({data.num_samples}) to "
            "split into calibration and scoring",
            "give at least 8 samples",
        )
    folder.mkdir(parents=True, exist_ok=True)
    split = (
        f"calibration: every {CALIB_EVERY}th sample of {data.path} ({n_calib} samples); "
        f"scoring: the other {n_score} samples"
    )
    return _write_npz(folder / "calib.npz", calib), _write_npz(folder / "score.npz", score), split


def _write_npz(path: Path, parts: dict[str, list[np.ndarray]]) -> Path:
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **{k: np.concatenate(v) for k, v in parts.items()})
    return path


def overlap(calib: Dataset, data: Dataset, specs: Sequence[InputSpec]) -> int:
    """How many calibration samples are also scoring samples (the same values in every
    input): a score on them is optimistic. Streams both files (one batch in memory), holding
    one digest per scoring sample."""
    scored = set(_digests(data, specs))
    return sum(d in scored for d in _digests(calib, specs))


def _digests(dataset: Dataset, specs: Sequence[InputSpec]):
    names = [s.name for s in specs]
    for feed in dataset.batches(specs, 256):
        for i in range(len(feed[names[0]])):
            h = hashlib.blake2b(digest_size=16)
            for name in names:
                row = np.ascontiguousarray(feed[name][i])
                h.update(str(row.shape).encode())
                h.update(row.tobytes())
            yield h.digest()
