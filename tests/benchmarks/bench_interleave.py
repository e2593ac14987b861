"""Does `bench`'s interleaved speedup agree with timing each model on its own?

Two MLPs, one with 4x the work. The ratio of medians that `bench` measures interleaved
(A B A B ...) is compared with the ratio from timing each model alone, back to back, in the
same run. On a quiet machine they agree within a few percent; on a noisy one the separate
loop drifts (that drift is why `bench` interleaves). A timing check: it lives here, never in
the unit tests. Exit 1 when they differ by more than 30 %.

Run: .venv/bin/python tests/benchmarks/bench_interleave.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from converter.check.bench import bench
from converter.core.machine import machine
from converter.core.runtime import make_session

RUNS, WARMUP, WIDTH = 300, 20, 256


def mlp(path: Path, layers: int) -> Path:
    rng = np.random.default_rng(layers)
    nodes, inits, name = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [name, f"w{i}"], [f"r{i}"]))
        name = f"r{i}"
    nodes.append(helper.make_node("Identity", [name], ["y"]))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, WIDTH])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def separate_median_ns(model: Path) -> float:
    x = np.random.default_rng(0).standard_normal((1, WIDTH)).astype(np.float32)
    session = make_session(model)
    for _ in range(WARMUP):
        session.run(None, {"x": x})
    times = []
    for _ in range(RUNS):
        start = time.perf_counter_ns()
        session.run(None, {"x": x})
        times.append(time.perf_counter_ns() - start)
    return float(np.median(times))


def main() -> int:
    m = machine()
    print(f"CPU: {m['cpu']}, {m['cores']} cores, VNNI: {m['vnni']}; batch 1, one thread")
    with tempfile.TemporaryDirectory() as tmp:
        small, large = mlp(Path(tmp) / "small.onnx", 2), mlp(Path(tmp) / "large.onnx", 8)
        report = bench([small, large], runs=RUNS, warmup=WARMUP, progress=False)
        interleaved = report.results[1].speedup
        separate = separate_median_ns(small) / separate_median_ns(large)
    agreement = interleaved / separate
    print(f"speedup of the 4x model: interleaved {interleaved:.3f}, separate {separate:.3f}")
    print(f"interleaved / separate: {agreement:.3f} (within 30 %: {abs(agreement - 1) < 0.3})")
    return 0 if abs(agreement - 1) < 0.3 else 1


if __name__ == "__main__":
    sys.exit(main())
