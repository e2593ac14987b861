"""``onnxship bench``: edge-style latency of one or more ONNX models on this CPU.

Edge defaults: batch 1, one intra-op thread, one inter-op thread, sequential execution, all
graph optimizations. Several models are measured interleaved in one process: each model is
opened and warmed up, then every round runs each model once (A B A B ...), so a drift in the
machine's speed (other load, frequency scaling, heat) hits all models alike and the speedup
against the first model stays meaningful.

A run is timed with ``time.perf_counter_ns`` around ``session.run`` with feeds prepared
beforehand, the garbage collector paused. Speedup = p50 of the first model / p50 of this
model, at the same thread count (:func:`converter.core.metrics.speedup`). MLPerf's SingleStream
scenario reports the 90th percentile.

Memory: all models share the process, so each model's number is the peak resident memory
(RSS) while its session was created and warmed up, minus the RSS just before: what that
model added at its peak. On Linux the peak is the kernel's high-water mark (VmHWM, reset
through /proc/self/clear_refs before each model); elsewhere it is the RSS after warmup. It is
reported in MB of 10^6 bytes (:data:`converter.core.render.MB`), as the file sizes are.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import psutil
from onnx import TensorProto, helper

from converter.check.bench_gates import BenchGates
from converter.check.bench_report import (
    BenchReport,
    LatencyStats,
    Measurement,
    ModelInfo,
    check_plot_path,
    plot_latencies,
    table_rows,
)
from converter.core.data import InputSpec, model_input_specs, open_data
from converter.core.defaults import DEFAULT_RUNS, DEFAULT_WARMUP
from converter.core.errors import BadInputError, DataError, first_line
from converter.core.inputs import generate_inputs
from converter.core.machine import machine, warn_if_other_target
from converter.core.metrics import speedup
from converter.core.onnxio import load_model
from converter.core.render import MB, progress_bar
from converter.core.runtime import make_session, run_session

__all__ = [
    "bench",
    "BenchGates",
    "BenchReport",
    "ModelInfo",
    "Measurement",
    "LatencyStats",
    "plot_latencies",
    "check_plot_path",
    "table_rows",
    "DEFAULT_WARMUP",
    "DEFAULT_RUNS",
]

logger = logging.getLogger(__name__)


def bench(
    models: Sequence[str | os.PathLike],
    threads: Sequence[int] = (1,),
    warmup: int = DEFAULT_WARMUP,
    runs: int | None = None,
    seconds: float | None = None,
    data: str | os.PathLike | None = None,
    dims: Mapping[str, int] | None = None,
    seed: int = 0,
    batch: int | None = None,
    inter_op_threads: int = 1,
    optimize: bool = True,
    progress: bool = False,
    gates: BenchGates | None = None,
    warn_target: bool = True,
) -> BenchReport:
    """Measure ``models`` interleaved at each thread count in ``threads``.

    Inputs: the first ``batch`` samples of ``data``, or generated from each model's input
    spec (seeded; symbolic dims other than the leading batch dim need a size in ``dims``).
    ``batch`` defaults to 1, or the model's fixed leading dim. ``runs`` timed runs per
    model (default DEFAULT_RUNS), or rounds until ``seconds`` have passed (per thread count,
    all models together), after ``warmup`` untimed runs per model. ``gates`` are checked on
    the result (``report.passed``); their settings and baseline are checked before measuring.
    ``warn_target`` False: no warning per model made for another CPU kind (auto warns once).
    """
    threads = _check_settings(models, threads, warmup, runs, seconds, batch, inter_op_threads)
    if runs is None and seconds is None:
        runs = DEFAULT_RUNS
    if data is not None and dims:
        raise BadInputError("--dim is for generated inputs", "drop --dim when giving --data")
    gates = gates or BenchGates()
    baseline = gates.check_models(len(models))
    prepared = [_prepare(m, data, dims or {}, seed, batch, warn_target) for m in models]
    _check_dims_used(dims or {}, prepared)
    machine = _machine()
    if baseline is not None:
        baseline.check_fits([p.info for p in prepared], threads, machine["cpu"])
    init_ms = _prime_onnxruntime()
    results = []
    for count in threads:
        results += _measure(
            prepared, count, inter_op_threads, optimize, warmup, runs, seconds, progress
        )
    settings = {
        "threads": threads,
        "inter_op_threads": inter_op_threads,
        "execution": "sequential",
        "graph_optimizations": "all" if optimize else "off",
        "warmup": warmup,
        "runs": runs,
        "seconds": seconds,
        "order": "interleaved: each round runs every model once, in the order given",
        "inputs": f"data {data} (first samples)" if data is not None else f"generated, seed {seed}",
        "speedup": "p50 of the first model / p50 of this model, same thread count",
        "memory": _memory_method(),
        "onnxruntime_init_ms": init_ms,
    }
    report = BenchReport([p.info for p in prepared], threads, settings, machine, results)
    report.gates = gates.check(report, baseline)
    report.baseline = None if baseline is None else baseline.path
    return report


# ---------------------------------------------------------------- settings and inputs


def _check_settings(models, threads, warmup, runs, seconds, batch, inter_op) -> list[int]:
    if not models:
        raise BadInputError("no model given", "name one or more .onnx files")
    threads = list(threads)
    if not threads or not all(_is_count(t) for t in threads):
        raise BadInputError(
            f"--threads {threads} must be whole numbers ≥ 1", "e.g. --threads 1,2,4"
        )
    if len(set(threads)) != len(threads):
        raise BadInputError(f"--threads {threads} repeats a value", "list each count once")
    checks = {"--runs": runs, "--batch": batch, "--inter-op": inter_op}
    for flag, value in checks.items():
        if value is not None and not _is_count(value):
            raise BadInputError(f"{flag} {value} is not a whole number ≥ 1", f"e.g. {flag} 1")
    if not _is_count(warmup + 1):
        raise BadInputError(f"--warmup {warmup} is not a whole number ≥ 0", "e.g. --warmup 10")
    if runs is not None and seconds is not None:
        raise BadInputError("--runs and --seconds both given", "give one of them")
    if seconds is not None and not (isinstance(seconds, (int, float)) and 0 < seconds < 1e6):
        raise BadInputError(f"--seconds {seconds} is not a positive number", "e.g. --seconds 10")
    cores = os.cpu_count() or 1
    if max(threads) > cores:
        logger.warning("warning: --threads %d is more than the %d cores here", max(threads), cores)
    return threads


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass
class _Prepared:
    path: str
    feeds: dict[str, np.ndarray]
    info: ModelInfo
    symbols: set[str]


def _prepare(
    path, data, dims: Mapping[str, int], seed: int, batch: int | None, warn_target: bool = True
) -> _Prepared:
    """Check the model file, build its feeds, measure its size; keep nothing else."""

    model = load_model(path)
    specs = model_input_specs(model)
    if warn_target:
        warn_if_other_target(model, path)
    del model
    if data is not None:
        feeds = _data_feeds(path, specs, data, batch)
    else:
        feeds = _generated_feeds(path, specs, dims, seed, batch)
    shown = [f"{n}:{','.join(map(str, a.shape))}:{a.dtype.name}" for n, a in feeds.items()]
    first = next(iter(feeds.values()), np.empty(1))
    info = ModelInfo(
        str(path), _file_size(Path(path)), int(first.shape[0] if first.ndim else 1), shown
    )
    symbols = {d for s in specs for d in s.shape if isinstance(d, str)}
    return _Prepared(str(path), feeds, info, symbols)


def _data_feeds(path, specs: list[InputSpec], data, batch: int | None) -> dict[str, np.ndarray]:
    dataset = open_data(data, specs)
    size = dataset.batch_size_for(specs, batch or 1)
    if batch is not None and size != batch:
        raise BadInputError(f"{path} has a fixed batch of {size}", f"pass --batch {size}")
    if dataset.num_samples < size:
        raise DataError(
            f"data {data} holds {dataset.num_samples} samples, a batch needs {size}",
            "give more samples, or a smaller --batch",
        )
    feed = next(dataset.batches(specs, size, limit=size, check_finite=True))
    return {name: np.ascontiguousarray(a) for name, a in feed.items()}


def _generated_feeds(path, specs, dims, seed: int, batch: int | None) -> dict[str, np.ndarray]:
    """Seeded inputs; the leading dim is the batch, other symbolic dims come from ``dims``."""
    concrete = []
    for spec in specs:
        shape = [_batch_dim(path, spec, dims, batch)] if spec.shape else []
        for d in spec.shape[1:]:
            if isinstance(d, int):
                shape.append(d)
            elif d in dims:
                shape.append(dims[d])
            else:
                example = d or "NAME"
                raise BadInputError(
                    f"input {spec.describe()} of {path} has a dim {d or '(unnamed)'} with no size",
                    f"give it with --dim {example}=SIZE, or pass real inputs with --data",
                )
        concrete.append(InputSpec(spec.name, spec.dtype, tuple(shape)))
    _check_fits_in_memory(path, concrete, batch)
    return generate_inputs(concrete, {}, seed)


def _check_fits_in_memory(path, specs: Sequence[InputSpec], batch: int | None) -> None:
    """Refuse, before making them, inputs this machine has not the memory to make (drawn in
    64 bits, then cast): a --batch of 10**8 would otherwise end in a MemoryError."""
    elements = [int(np.prod(s.shape, dtype=np.float64)) for s in specs]
    needed = sum(n * (8 + s.dtype.itemsize) for n, s in zip(elements, specs))
    free = psutil.virtual_memory().available
    if needed > free:
        first = specs[0].shape[0] if specs and specs[0].shape else 1
        per_sample = needed / max(first, 1)
        flag = f"--batch {batch}" if batch is not None else "the --dim sizes"
        raise BadInputError(
            f"{flag}: making the inputs of {path} needs {needed / 1e9:.3g} GB "
            f"({per_sample / 1e3:.3g} kB per sample, before the model's own memory), and "
            f"this machine has {free / 1e9:.3g} GB free",
            "use a smaller --batch or --dim (bench measures batch 1 by default)",
        )


def _batch_dim(path, spec: InputSpec, dims, batch: int | None) -> int:
    lead = spec.shape[0]
    if isinstance(lead, int):
        if batch is not None and lead != batch:
            raise BadInputError(f"{path} has a fixed batch of {lead}", f"pass --batch {lead}")
        return lead
    size = dims.get(lead, batch or 1) if lead else batch or 1
    if batch is not None and size != batch:
        raise BadInputError(f"--batch {batch} and --dim {lead}={size} disagree", "give one")
    return size


def _check_dims_used(dims: Mapping[str, int], prepared: list[_Prepared]) -> None:
    known = set().union(*(p.symbols for p in prepared))
    unused = sorted(set(dims) - known)
    if unused:
        raise BadInputError(
            f"--dim {unused[0]}: no model input has a dim of that name",
            f"the symbolic dims are {', '.join(sorted(known)) or '(none)'}",
        )


def _file_size(path: Path) -> int:
    """The .onnx file plus the external data files its initializers point to."""
    model = onnx.load(str(path), load_external_data=False)
    locations = {
        entry.value
        for tensor in model.graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    extra = [path.parent / loc for loc in locations]
    return path.stat().st_size + sum(f.stat().st_size for f in extra if f.is_file())


# ---------------------------------------------------------------- measuring


def _prime_onnxruntime() -> float:
    """Create and run a one-node session first, so onnxruntime's one-time setup of the
    process (about 30 MB and tens of ms) is not charged to the first model; returns its ms."""

    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "prime",
        [value("x", TensorProto.FLOAT, [1])],
        [value("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    start = time.perf_counter_ns()
    session = make_session(model.SerializeToString(), built=True)
    session.run(None, {"x": np.zeros(1, np.float32)})
    return (time.perf_counter_ns() - start) / 1e6


@dataclass
class _Opened:
    call: Callable[[], object]
    session_ms: float
    peak_rss_mb: float


def _measure(prepared, threads, inter_op, optimize, warmup, runs, seconds, progress):
    opened = [_open(p, threads, inter_op, optimize, warmup) for p in prepared]
    desc = f"bench threads={threads}"
    times = _interleave([o.call for o in opened], runs, seconds, progress, desc)
    stats = [LatencyStats.from_ns(t, p.info.batch) for t, p in zip(times, prepared)]
    return [
        Measurement(
            model=i,
            threads=threads,
            latency=s,
            speedup=speedup(stats[0].p50_ms, s.p50_ms),
            session_ms=o.session_ms,
            peak_rss_mb=o.peak_rss_mb,
            latencies_ms=t / 1e6,
        )
        for i, (s, o, t) in enumerate(zip(stats, opened, times))
    ]


def _open(p: _Prepared, threads: int, inter_op: int, optimize: bool, warmup: int) -> _Opened:
    """Create the session (timed) and warm it up, measuring the memory it adds."""
    gc.collect()
    before = _rss()
    exact = _reset_peak()
    start = time.perf_counter_ns()
    session = make_session(p.path, threads=threads, inter_op_threads=inter_op, optimize=optimize)
    session_ms = (time.perf_counter_ns() - start) / 1e6
    names = [o.name for o in session.get_outputs()]
    for i in range(warmup):
        if i == 0:
            run_session(session, p.feeds, what=p.path)  # a clear error before timing
        else:
            session.run(names, p.feeds)
    peak = (_peak_rss() if exact else None) or _rss()
    call = functools.partial(session.run, names, p.feeds)
    return _Opened(call, session_ms, max(0, peak - before) / MB)


def _interleave(calls, runs, seconds, progress: bool, desc: str) -> list[np.ndarray]:
    """Rounds of one timed run per model, until ``runs`` rounds or ``seconds`` passed."""
    clock = time.perf_counter_ns
    times: list[list[int]] = [[] for _ in calls]
    rounds = 0
    bar = progress_bar(total=runs, desc=desc, unit="round", progress=progress)
    try:
        with bar, _gc_paused():  # the time budget starts after its gc.collect (seconds, in
            # a process holding many objects)
            deadline = None if seconds is None else clock() + int(seconds * 1e9)
            while (runs is None or rounds < runs) and (
                deadline is None or clock() < deadline or not rounds
            ):
                for call, record in zip(calls, times):
                    start = clock()
                    call()
                    record.append(clock() - start)
                rounds += 1
                bar.update()
    except Exception as e:  # onnxruntime's exceptions have no common base but Exception
        raise BadInputError(
            f"onnxruntime failed during the timed runs: {first_line(e)}",
            "run with --warmup 1 or more to see which model fails",
        ) from e
    return [np.asarray(t, dtype=np.int64) for t in times]


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# ---------------------------------------------------------------- memory and machine


_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _rss() -> int:
    return psutil.Process().memory_info().rss


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux ≥ 4.0); False if impossible."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def _peak_rss() -> int | None:
    """VmHWM, the peak RSS since the last reset, in bytes (None where /proc is missing)."""
    try:
        status = _STATUS.read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


def _memory_method() -> str:
    if _reset_peak() and _peak_rss() is not None:
        return (
            "peak RSS (VmHWM) during session creation and warmup, minus the RSS before: "
            "the memory this model added at its peak"
        )
    return "RSS after session creation and warmup, minus the RSS before"


def _machine() -> dict:
    """machine.machine() plus the versions that shape latency."""

    return {**machine(), "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}
