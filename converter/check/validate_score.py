"""The scoring of one validation: each shard of the data scored by one pure function
(:func:`_score_shard`), mapped over the shards by an executor (in this process, or one Ray
task per shard), the metric sums merged in shard order — so the numbers do not depend on
where the shards ran. One batch of outputs is in memory at a time."""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import zipfile
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from converter.check.validate_plan import Plan
from converter.check.validate_report import MetricValue
from converter.core import metrics as M
from converter.core.data import Dataset, InputSpec
from converter.core.defaults import METRICS
from converter.core.errors import BadInputError, DataError, OnnxshipError
from converter.core.executor import Executor
from converter.core.onnxio import session_source
from converter.core.runtime import cached_session, release_sessions, run_session

__all__ = ["Running", "Run", "score", "read_labels"]

logger = logging.getLogger(__name__)


def read_labels(dataset: Dataset) -> np.ndarray:
    """The labels as int64, or a DataError saying what is wrong with them."""
    labels = dataset.labels()
    where = f"data {dataset.path}: labels"
    fix = "save integer class indices, one per sample, as `labels`"
    if labels.dtype.kind == "f":
        if not np.isfinite(labels).all() or (labels != np.round(labels)).any():
            raise DataError(f"{where} are {labels.dtype.name} with non-integer values", fix)
    elif labels.dtype.kind not in "iub":
        raise DataError(f"{where} have dtype {labels.dtype}", fix)
    labels = labels.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise DataError(f"{where} hold negative values (lowest {labels.min()})", fix)
    return labels


class Running:
    """The metric sums of one output over the batches seen so far: exact hit counts for
    accuracy/agreement, per-sample cosines, per-batch max and size-weighted mean abs error.
    Shards are scored into one each and :meth:`merged` in shard order: counts add exactly,
    lists concatenate, so the result is the same however the shards were run."""

    def __init__(self) -> None:
        self.hits: dict[str, list[int]] = {}  # metric -> [hits, positions]
        self.cosines: list[np.ndarray] = []
        self.max_abs: list[float] = []
        self.abs_terms: list[float] = []  # per batch: mean abs error × elements
        self.abs_size = 0

    @classmethod
    def merged(cls, parts: Sequence[Running]) -> Running:
        out = cls()
        for part in parts:
            for key, (hits, n) in part.hits.items():
                entry = out.hits.setdefault(key, [0, 0])
                entry[0], entry[1] = entry[0] + hits, entry[1] + n
            out.cosines += part.cosines
            out.max_abs += part.max_abs
            out.abs_terms += part.abs_terms
            out.abs_size += part.abs_size
        return out

    def count(self, key: str, hits: np.ndarray) -> None:
        entry = self.hits.setdefault(key, [0, 0])
        entry[0] += int(np.count_nonzero(hits))
        entry[1] += int(hits.size)

    def add_reference(self, cand: np.ndarray, ref: np.ndarray, computed: set[str]) -> None:
        if "agreement" in computed and cand.ndim >= 2:
            self.count("agreement", M.agrees(cand, ref))
        if "cosine" in computed:
            self.cosines.append(M.per_sample_cosine(cand, ref))
        if "max-abs" in computed:
            self.max_abs.append(M.max_abs_error(cand, ref))
        if "mean-abs" in computed:
            self.abs_terms.append(M.mean_abs_error(cand, ref) * cand.size)
            self.abs_size += cand.size

    def result(self) -> dict[str, MetricValue]:
        out = {k: MetricValue(h / n) for k, (h, n) in self.hits.items() if n and "/" not in k}
        if self.cosines:
            cos = np.concatenate(self.cosines)
            worst = int(np.argmin(cos))
            out["cosine"] = MetricValue(float(cos.mean()), float(cos[worst]), worst)
        if self.max_abs:
            out["max-abs"] = MetricValue(float(np.max(self.max_abs)))
        if self.abs_size:
            out["mean-abs"] = MetricValue(math.fsum(self.abs_terms) / self.abs_size)
        return {m: out[m] for m in METRICS if m in out}

    def reference_result(self) -> dict[str, MetricValue]:
        hits, n = self.hits.get("reference/accuracy", (0, 0))
        return {"accuracy": MetricValue(hits / n)} if n else {}


@dataclass
class Run:
    """What one scoring pass needs."""

    candidate: str | os.PathLike
    reference: str | os.PathLike | None
    dataset: Dataset
    specs: list[InputSpec]
    ref_specs: list[InputSpec] | None
    labels: np.ndarray | None
    plan: Plan
    gated: str

    @functools.cached_property
    def label_max(self) -> int:
        return int(self.labels.max()) if self.labels is not None and self.labels.size else -1


@dataclass(frozen=True)
class _Model:
    """A model as the bytes that travel to the workers, with their digest (the key of the
    worker's session cache) and its path (for messages)."""

    path: str
    data: bytes | str  # a model above 2 GB with external data: its path (read where it runs)
    key: str

    @classmethod
    def read(cls, path: str | os.PathLike) -> _Model:
        data = session_source(path)  # with its external data, which bytes alone lack
        if isinstance(data, str):
            return cls(str(path), data, f"{Path(path).resolve()}@{os.stat(path).st_mtime_ns}")
        return cls(str(path), data, hashlib.sha256(data).hexdigest())


@dataclass(frozen=True)
class _ShardJob:
    """What the scoring of every shard shares (put into Ray's object store once)."""

    data: str
    candidate: _Model
    reference: _Model | None
    specs: list[InputSpec]
    ref_specs: list[InputSpec] | None
    computed: frozenset[str]
    gated: str
    label_max: int
    batch_size: int
    threads: int


@dataclass(frozen=True)
class _Shard:
    """One .npz shard: its place in the data and its slice of the labels."""

    index: int
    path: Path
    start: int  # the index of its first sample in the whole data
    size: int
    labels: np.ndarray | None

    def describe(self, data: str) -> str:
        last = self.start + self.size - 1
        return f"shard {self.path.name} (samples {self.start}–{last} of {data})"


@dataclass
class _ShardScore:
    index: int
    samples: int
    running: dict[str, Running]


def score(
    run: Run, batch_size: int, threads: int, executor: Executor, progress: bool
) -> tuple[int, dict[str, Running]]:
    """Score every shard (a map of :func:`_score_shard`), merged in shard order: (the number
    of samples scored, the sums per output)."""
    job = _ShardJob(
        data=str(run.dataset.path),
        candidate=_Model.read(run.candidate),
        reference=None if run.reference is None else _Model.read(run.reference),
        specs=run.specs,
        ref_specs=run.ref_specs,
        computed=frozenset(run.plan.computed),
        gated=run.gated,
        label_max=run.label_max,
        batch_size=batch_size,
        threads=threads,
    )
    shards, start = [], 0
    for i, (path, size) in enumerate(zip(run.dataset.shards, run.dataset.shard_sizes)):
        labels = None if run.labels is None else run.labels[start : start + size]
        shards.append(_Shard(i, path, start, size, labels))
        start += size
    scores = executor.map(
        _score_shard, shards, shared=job, desc="validate", unit="shard", progress=progress
    )
    _release(job, shards)
    return _merge(scores, run.dataset)


def _release(job: _ShardJob, shards: list[_Shard]) -> None:
    """Drop the sessions this scoring made in this process, once every shard is scored: the
    candidate's (a candidate is scored once), and the reference's when its outputs are kept
    (_REFERENCE_OUTPUTS: the next candidate reads them, not the session). A session keeps
    the memory its largest run needed: auto on MobileNetV2 (batch 64) held four candidates'
    and the fp32 model's, 4.9 GB peak RSS."""
    keys = [job.candidate.key]
    if job.reference is not None and all(
        _reference_key(job, shard) in _REFERENCE_OUTPUTS.entries for shard in shards
    ):
        keys.append(job.reference.key)
    release_sessions(*keys)


def _merge(scores: list[_ShardScore], dataset: Dataset) -> tuple[int, dict[str, Running]]:
    """The shards' sums in shard order, after checking each shard was scored once, whole."""
    indices, counts = [s.index for s in scores], [s.samples for s in scores]
    if indices != list(range(len(dataset.shards))) or counts != dataset.shard_sizes:
        raise OnnxshipError(
            f"scored shards {indices} with {counts} samples, the data {dataset.path} has "
            f"{dataset.shard_sizes}",
            "run again; the data must not change while it is validated",
        )
    names = list(scores[0].running)
    return sum(counts), {n: Running.merged([s.running[n] for s in scores]) for n in names}


class _ReferenceOutputs:
    """The reference model's outputs per shard, batch by batch, kept in this process for the
    next candidate scored against the same reference on the same data (auto scores many):
    keyed by the reference's digest, the shard file (path, size, mtime), the batch size and
    threads; at most ``budget`` bytes, the least recently used shard dropped first."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.entries: OrderedDict[tuple, list[list[np.ndarray]]] = OrderedDict()
        self.sizes: dict[tuple, int] = {}

    def get(self, key: tuple) -> list[list[np.ndarray]] | None:
        if key in self.entries:
            self.entries.move_to_end(key)
        return self.entries.get(key)

    def put(self, key: tuple, outputs: list[list[np.ndarray]]) -> None:
        size = sum(a.nbytes for batch in outputs for a in batch)
        if size > self.budget:
            return
        self.entries[key], self.sizes[key] = outputs, size
        while sum(self.sizes.values()) > self.budget:
            dropped, _ = self.entries.popitem(last=False)
            del self.sizes[dropped]


_REFERENCE_OUTPUTS = _ReferenceOutputs(budget=256 * 2**20)


def _reference_key(job: _ShardJob, shard: _Shard) -> tuple:
    stat = os.stat(shard.path)
    dtypes = tuple(sorted((s.name, str(s.dtype)) for s in job.ref_specs or []))
    where = (str(Path(shard.path).resolve()), stat.st_size, stat.st_mtime_ns)
    return (job.reference.key, *where, job.batch_size, job.threads, dtypes)


def _score_shard(job: _ShardJob, shard: _Shard) -> _ShardScore:
    """Score one shard: pure, so it may run anywhere (a Ray worker) and run again. The
    reference's outputs are reused when this process computed them before (same reference,
    shard file, batch size and threads: the same numbers)."""
    cand = cached_session(job.candidate.key, job.candidate.data, job.threads)
    ref, key, known, computed = None, None, None, []
    if job.reference is not None:
        key = _reference_key(job, shard)
        known = _REFERENCE_OUTPUTS.get(key)
        if known is None:
            ref = cached_session(job.reference.key, job.reference.data, job.threads)
    names = [o.name for o in cand.get_outputs()]
    running = {name: Running() for name in names}
    ref_dtypes = {s.name: s.dtype for s in job.ref_specs or []}
    done = 0
    for b, feed in enumerate(_shard_batches(job, shard)):
        n = len(next(iter(feed.values())))
        start = shard.start + done
        outs = run_session(cand, feed, what=f"{job.candidate.path} (samples {start}–{start + n})")
        ref_outs = None
        if known is not None:
            ref_outs = known[b]
        elif ref is not None:
            ref_feed = {
                k: a.astype(ref_dtypes.get(k, a.dtype), copy=False) for k, a in feed.items()
            }
            ref_outs = run_session(ref, ref_feed, what=f"reference {job.reference.path}")
            computed.append(ref_outs)
        labels = None if shard.labels is None else shard.labels[done : done + n]
        _accumulate(running, names, outs, ref_outs, labels, job, first=start == 0)
        done += n
    if ref is not None:
        _REFERENCE_OUTPUTS.put(key, computed)
    return _ShardScore(shard.index, done, running)


def _shard_batches(job: _ShardJob, shard: _Shard) -> Iterator[dict[str, np.ndarray]]:
    """The shard's batches; anything wrong with its data is a DataError naming the shard."""
    try:
        data = Dataset(shard.path)
        yield from data.batches(job.specs, job.batch_size, check_finite=True)
    except DataError as e:
        raise DataError(f"{shard.describe(job.data)}: {e.what}", e.fix) from e
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(
            f"{shard.describe(job.data)} cannot be read ({str(e)[:200]})",
            "write it again with numpy.savez(path, **arrays)",
        ) from e


def _accumulate(running, names, outs, ref_outs, labels, job: _ShardJob, first: bool) -> None:
    for i, name in enumerate(names):
        cand = np.asarray(outs[i])
        if labels is not None and _labels_fit(cand, labels, job.label_max, name, job.gated, first):
            running[name].count("accuracy", M.correct(cand, labels))
            if ref_outs is not None:
                running[name].count("reference/accuracy", M.correct(ref_outs[i], labels))
        if ref_outs is not None:
            ref = np.asarray(ref_outs[i])
            if cand.shape != ref.shape:
                raise BadInputError(
                    f"output {name} has shape {cand.shape} in the candidate and {ref.shape} in "
                    "the reference",
                    "compare models whose outputs have the same shapes",
                )
            running[name].add_reference(cand, ref, job.computed)


def _labels_fit(
    out: np.ndarray, labels: np.ndarray, label_max: int, name: str, gated: str, first: bool
) -> bool:
    """Whether accuracy applies to this output (class scores on the last axis, one label per
    position, every label of the data below the class count); for the gated output a misfit
    is a DataError. The same answer for every batch: it depends on shapes and ``label_max``."""
    fits = out.ndim >= 2 and labels.shape[1:] == out.shape[1:-1]
    if not fits:
        if name == gated:
            raise DataError(
                f"labels have shape {labels.shape[1:]} per sample but output {name} has "
                f"{out.shape[1:]}: accuracy needs class scores on its last axis",
                "pick an output of class scores with --output, or fix the labels",
            )
        if first:
            logger.info("no accuracy for output %s: its shape does not fit the labels", name)
        return False
    if label_max >= out.shape[-1]:
        if name != gated:
            return False
        raise DataError(
            f"labels go up to {label_max}, but output {name} has {out.shape[-1]} classes",
            "labels are class indices 0..classes-1; check the data matches the model",
        )
    return True
