"""The numbers users see, one function each; the CLI, reports and tests all call these."""

from __future__ import annotations

import numpy as np

__all__ = [
    "per_sample_cosine",
    "accuracy",
    "agreement",
    "correct",
    "agrees",
    "max_abs_error",
    "mean_abs_error",
    "sparsity",
    "speedup",
]


def _rows(a: np.ndarray) -> np.ndarray:
    """One row per sample (first axis), as float64."""
    a = np.asarray(a, dtype=np.float64)
    return a.reshape(len(a), -1) if a.ndim > 1 else a.reshape(-1, 1)


def per_sample_cosine(candidate: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Cosine similarity of each sample's output to the reference's. Two all-zero rows
    count as 1 (identical); one zero row against a non-zero one counts as 0."""
    c, r = _rows(candidate), _rows(reference)
    dot = (c * r).sum(axis=1)
    norms = np.linalg.norm(c, axis=1) * np.linalg.norm(r, axis=1)
    both_zero = (np.abs(c).sum(axis=1) == 0) & (np.abs(r).sum(axis=1) == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), 0.0)
    return np.where(both_zero, 1.0, np.clip(cos, -1.0, 1.0))


def correct(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per position: does the argmax over the last axis equal the label? (accuracy is the
    mean; the count lets callers that stream batches add up exact hits.)"""
    return np.asarray(logits).argmax(axis=-1) == np.asarray(labels)


def agrees(candidate: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per position: do candidate and reference agree on the argmax? (agreement is the mean.)"""
    return np.asarray(candidate).argmax(-1) == np.asarray(reference).argmax(-1)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of samples whose argmax over the last axis equals the label."""
    return float(np.mean(correct(logits, labels)))


def agreement(candidate: np.ndarray, reference: np.ndarray) -> float:
    """Fraction of samples where candidate and reference agree on the argmax."""
    return float(np.mean(agrees(candidate, reference)))


def max_abs_error(candidate: np.ndarray, reference: np.ndarray) -> float:
    return float(np.max(np.abs(_rows(candidate) - _rows(reference)), initial=0.0))


def mean_abs_error(candidate: np.ndarray, reference: np.ndarray) -> float:
    return float(np.mean(np.abs(_rows(candidate) - _rows(reference))))


def sparsity(array: np.ndarray) -> float:
    """Fraction of exactly-zero elements."""
    array = np.asarray(array)
    return float(np.count_nonzero(array == 0) / array.size) if array.size else 0.0


def speedup(baseline_seconds: float, candidate_seconds: float) -> float:
    """How many times faster the candidate is (>1 = faster), from two latencies."""
    return float(baseline_seconds / candidate_seconds) if candidate_seconds > 0 else float("inf")
