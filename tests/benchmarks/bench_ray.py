"""`validate --executor ray` against in-process on this machine: 20,000 MNIST-size samples
(20 shards of 1,000) through a small CNN and its reference, every shard one Ray task, a local
Ray with 2 workers. Prints the wall times measured interleaved in one run (Ray's start-up
apart), their ratio, the throughput per worker, and Ray's own cost per task (a no-op task
mapped 400 times; one task's round trip). Checks that both runs write the same report.

Run: .venv/bin/python tests/benchmarks/bench_ray.py   (needs pip install 'onnxship[ray]')
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from converter.check.validate import validate  # noqa: E402
from converter.core.executor import InProcess, RayExecutor  # noqa: E402
from converter.core.machine import machine  # noqa: E402

SHARDS, PER_SHARD = 20, 1000
REPEATS = 3
WORKERS = 2


def cnn(noise: float = 0.0) -> onnx.ModelProto:
    """1×28×28 → conv16 → conv32/2 → conv64/2 → global pool → 10 classes, seeded weights
    (``noise``: relative noise on the first conv's weights, for a candidate that differs)."""
    rng = np.random.default_rng(1)
    inits, nodes, prev = [], [], "x"
    for i, (cin, cout, stride) in enumerate([(1, 16, 1), (16, 32, 2), (32, 64, 2)]):
        w = rng.normal(0, (2 / (cin * 9)) ** 0.5, (cout, cin, 3, 3)).astype(np.float32)
        if i == 0:
            w *= 1 + noise * np.random.default_rng(2).standard_normal(w.shape, np.float32)
        inits += [
            numpy_helper.from_array(w, f"w{i}"),
            numpy_helper.from_array(np.zeros(cout, np.float32), f"b{i}"),
        ]
        nodes += [
            helper.make_node(
                "Conv",
                [prev, f"w{i}", f"b{i}"],
                [f"c{i}"],
                pads=[1, 1, 1, 1],
                strides=[stride, stride],
                name=f"conv{i}",
            ),
            helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"),
        ]
        prev = f"r{i}"
    fc = rng.normal(0, 0.2, (64, 10)).astype(np.float32)
    inits.append(numpy_helper.from_array(fc, "fc"))
    nodes += [
        helper.make_node("GlobalAveragePool", [prev], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "fc"], ["logits"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def write_data(folder: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(SHARDS):
        x = rng.random((PER_SHARD, 1, 28, 28), dtype=np.float32)
        labels = rng.integers(0, 10, PER_SHARD)
        np.savez(folder / f"shard-{i:03d}.npz", x=x, labels=labels)


def _timed(fn):
    def run(shared, item):
        start, cpu = time.perf_counter(), time.process_time()
        out = fn(shared, item)
        return out, time.perf_counter() - start, time.process_time() - cpu

    return run


class Timed:
    """An executor that also adds up its tasks' wall and CPU seconds, measured where they
    ran: how much CPU the work costs on each executor, whatever else the machine runs."""

    def __init__(self, inner) -> None:
        self.inner, self.name, self.width = inner, inner.name, inner.width
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def map(self, fn, items, **kwargs):
        results = self.inner.map(_timed(fn), items, **kwargs)
        self.wall.append(sum(r[1] for r in results))
        self.cpu.append(sum(r[2] for r in results))
        return [r[0] for r in results]


def _noop(shared, item):
    return item


def per_task_cost(ray_executor: RayExecutor, ray) -> tuple[float, float]:
    """(ms per no-op task when 400 are mapped, ms for one task's round trip)."""
    ray_executor.map(_noop, list(range(20)))  # workers warm
    start = time.perf_counter()
    ray_executor.map(_noop, list(range(400)))
    mapped = (time.perf_counter() - start) / 400
    task = ray.remote(_noop)
    trips = []
    for i in range(50):
        start = time.perf_counter()
        ray.get(task.remote(None, i))
        trips.append(time.perf_counter() - start)
    return mapped * 1e3, statistics.median(trips) * 1e3


def main() -> int:
    try:
        import ray
    except ImportError:
        sys.exit("needs Ray: pip install 'onnxship[ray]'")
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        tmp = Path(tmp)
        (tmp / "data").mkdir()
        write_data(tmp / "data")
        onnx.save(cnn(noise=0.05), tmp / "candidate.onnx")
        onnx.save(cnn(), tmp / "reference.onnx")
        start = time.perf_counter()
        ray.init(
            num_cpus=WORKERS,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.ERROR,
        )
        startup = time.perf_counter() - start
        times: dict[str, list[float]] = {"in-process": [], "ray": []}
        reports = {}
        with RayExecutor() as on_ray:
            executors = {"in-process": Timed(InProcess()), "ray": Timed(on_ray)}
            on_ray.map(_noop, list(range(2 * WORKERS)))  # workers started before timing
            for _ in range(REPEATS):  # interleaved: the machine's load hits both alike
                for name, executor in executors.items():
                    start = time.perf_counter()
                    report = validate(
                        tmp / "candidate.onnx",
                        tmp / "data",
                        reference=tmp / "reference.onnx",
                        metrics=["accuracy", "cosine"],
                        executor=executor,
                        progress=False,
                    )
                    times[name].append(time.perf_counter() - start)
                    reports[name] = report.to_json()
            mapped_ms, trip_ms = per_task_cost(on_ray, ray)
        load = os.getloadavg()[0]
        ray.shutdown()
    samples = SHARDS * PER_SHARD
    local, dist = (statistics.median(times[n]) for n in ("in-process", "ray"))
    cpu = {n: statistics.median(e.cpu) for n, e in executors.items()}
    share = statistics.median(c / w for c, w in zip(executors["ray"].cpu, executors["ray"].wall))
    m = machine()
    vnni = "VNNI" if m["vnni"] else "no VNNI"
    print(f"CPU: {m['cpu']}, {m['cores']} cores, {vnni}; onnxruntime 1 thread per worker")
    print(f"load average during the run: {load:.1f} (other jobs on the machine: the ratio is")
    print("  only as good as the cores the other jobs leave free)")
    print(
        f"validate {samples} samples (CNN 1x28x28 and its reference, {SHARDS} shards), "
        f"median of {REPEATS}, interleaved:"
    )
    print(f"  in-process        {local:6.2f} s   {samples / local:8.0f} samples/s")
    print(
        f"  Ray, {WORKERS} workers    {dist:6.2f} s   {samples / dist:8.0f} samples/s "
        f"({samples / dist / WORKERS:.0f} per worker)"
    )
    print(f"  speedup Ray/in-process: {local / dist:.2f}x")
    print(f"  reports identical: {'yes' if reports['ray'] == reports['in-process'] else 'NO'}")
    print(
        f"CPU seconds inside the tasks: in-process {cpu['in-process']:.2f}, Ray {cpu['ray']:.2f}"
        f" ({cpu['ray'] / cpu['in-process'] - 1:+.0%}); a Ray worker got {share:.0%} of a core"
    )
    print(
        f"per worker: {samples / cpu['ray']:.0f} samples per CPU-second (what one worker with a "
        "core of its own validates per second)"
    )
    print(f"Ray start-up (local, {WORKERS} CPUs, not in the times above): {startup:.1f} s")
    print(
        f"Ray per-task cost: {mapped_ms:.2f} ms per no-op task mapped 400 at a time, "
        f"{trip_ms:.2f} ms one task's round trip"
    )
    return 0 if reports["ray"] == reports["in-process"] else 1


if __name__ == "__main__":
    sys.exit(main())
