"""`pack` on a ResNet-18-shaped CNN: file size vs fp32 dense, bit-identical outputs, latency
and cold start (session creation) vs the same model unpacked.

The CNN is torchvision's resnet18 layout built with onnx.helper (BatchNorm folded into conv
biases, random He-initialised weights, 224x224, 11.7 M parameters); no torch needed. Variants,
made with the project's own passes: 50 % pruned fp32 (MagnitudePrune, global), 50 % and 80 %
pruned + static int8 (StaticQuantize, QDQ, calibrated on 16 random images). Each is packed
(passes/pack.py) and compared with its unpacked self: outputs on 4 inputs must be equal bit
for bit and the graph onnxruntime runs after folding and fusions the same op for op
("identical" column: QLinearConv etc. kept for int8); latency (batch 1, one thread) is
timed interleaved by converter.check.bench.bench;
session creation (the cold start) is timed in fresh processes, interleaved, median of 7, wall
and CPU time; the time packing adds is given per 10 M packed values, also for the
alternative of decoding each weight in one piece.

Run: .venv/bin/python tests/benchmarks/bench_pack.py   (about 2-3 minutes)
Writes the table to /work/notes/bench_pack.txt as well (when that folder exists).
"""

from __future__ import annotations

import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from converter.check.bench import bench  # noqa: E402
from converter.core.runtime import make_session  # noqa: E402
from passes.pack import CHUNK, Pack  # noqa: E402
from passes.prune import MagnitudePrune  # noqa: E402
from passes.quantize import StaticQuantize  # noqa: E402

NOTES = Path("/work/notes/bench_pack.txt")
TARGETS = {"pruned50 fp32": 1.8, "pruned50 int8": 6.0, "pruned80 int8": 10.0}  # x smaller
LATENCY_FLOOR = 0.95  # packed speed / unpacked speed
COLD_START_GOAL = 0.1  # seconds added per 10 M packed values


class _Builder:
    """Collects nodes and initializers of a conv net (BatchNorm folded into the biases)."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int, name: str) -> str:
        w = self.rng.standard_normal((cout, cin, k, k)) * np.sqrt(2 / (cin * k * k))
        b = self.rng.standard_normal(cout) * 0.01
        self.inits += [
            numpy_helper.from_array(w.astype(np.float32), f"{name}.weight"),
            numpy_helper.from_array(b.astype(np.float32), f"{name}.bias"),
        ]
        inputs = [x, f"{name}.weight", f"{name}.bias"]
        conv = helper.make_node("Conv", inputs, [name], pads=[k // 2] * 4, strides=[stride] * 2)
        self.nodes.append(conv)
        return name

    def op(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [name], **attrs))
        return name

    def block(self, x: str, cin: int, cout: int, stride: int, name: str) -> str:
        y = self.op("Relu", [self.conv(x, cin, cout, 3, stride, f"{name}.conv1")], f"{name}.relu1")
        y = self.conv(y, cout, cout, 3, 1, f"{name}.conv2")
        if stride != 1 or cin != cout:
            x = self.conv(x, cin, cout, 1, stride, f"{name}.down")
        return self.op("Relu", [self.op("Add", [y, x], f"{name}.add")], f"{name}.out")


def resnet18(classes: int = 1000) -> onnx.ModelProto:
    """torchvision's resnet18 layout (conv 7x7/2, max pool, 4 stages of 2 basic blocks)."""
    b = _Builder()
    x = b.op("Relu", [b.conv("x", 3, 64, 7, 2, "stem")], "stem.relu")
    x = b.op("MaxPool", [x], "pool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for stage, cout in enumerate((64, 128, 256, 512), start=1):
        for i in range(2):
            stride = 2 if stage > 1 and i == 0 else 1
            x = b.block(x, cin, cout, stride, f"layer{stage}.{i}")
            cin = cout
    x = b.op("Flatten", [b.op("GlobalAveragePool", [x], "gap")], "flat")
    fc = b.rng.standard_normal((classes, 512)) * np.sqrt(1 / 512)
    b.inits += [
        numpy_helper.from_array(fc.astype(np.float32), "fc.weight"),
        numpy_helper.from_array(np.zeros(classes, np.float32), "fc.bias"),
    ]
    b.op("Gemm", [x, "fc.weight", "fc.bias"], "logits", transB=1)
    graph = helper.make_graph(
        b.nodes,
        "resnet18",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes])],
        b.inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


_COLD_START = """
import resource, sys, time
import onnxruntime as ort
opts = ort.SessionOptions()
opts.intra_op_num_threads = opts.inter_op_num_threads = 1
opts.log_severity_level = 3
wall, cpu = time.perf_counter(), time.process_time()
ort.InferenceSession(sys.argv[1], opts, providers=["CPUExecutionProvider"])
print(time.perf_counter() - wall, time.process_time() - cpu)
"""


def _session_seconds(paths: list[Path], repeats: int = 7) -> list[tuple[float, float]]:
    """(wall, CPU) seconds to create a session of each model (one thread) in a fresh process:
    a real cold start. Medians of ``repeats``, interleaved; CPU time is less disturbed by
    other processes on a busy machine than wall time."""
    times: list[list[list[float]]] = [[] for _ in paths]
    for _ in range(repeats):
        for i, path in enumerate(paths):
            run = subprocess.run(
                [sys.executable, "-c", _COLD_START, str(path)],
                capture_output=True,
                text=True,
                check=True,
            )
            times[i].append([float(v) for v in run.stdout.split()])
    return [tuple(float(v) for v in np.median(np.array(t), axis=0)) for t in times]


def _speed(plain: Path, packed: Path, runs: int = 150) -> float:
    """Speed of ``packed`` relative to ``plain`` (>1: faster), interleaved, batch 1, one
    thread: the mean of two runs in either order, so neither model always goes first."""
    first = bench([plain, packed], threads=[1], warmup=10, runs=runs).get(1, 1).speedup
    second = bench([packed, plain], threads=[1], warmup=10, runs=runs).get(1, 1).speedup
    return (first + 1 / second) / 2


def _identical(a: Path, b: Path, images: np.ndarray) -> bool:
    sa, sb = make_session(a), make_session(b)
    return all(
        np.array_equal(sa.run(None, {"x": x[None]})[0], sb.run(None, {"x": x[None]})[0])
        for x in images
    )


def _fused_ops(path: Path, folder: Path) -> list[str]:
    """The op types of the graph onnxruntime runs (after folding and fusions)."""
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(folder / f"{path.stem} optimized.onnx")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.log_severity_level = 3
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]


def _variants(folder: Path, calib: Path) -> dict[str, tuple[Path, Path, int]]:
    """name -> (unpacked path, packed path, packed values)."""
    dense = resnet18()
    onnx.save(dense, folder / "fp32.onnx")
    out = {}
    for sparsity in (0.5, 0.8):
        pruned = MagnitudePrune(sparsity)(dense).model
        models = {"int8": StaticQuantize(calibration=calib, progress=False)(pruned).model}
        if sparsity == 0.5:
            models["fp32"] = pruned
        for kind, model in models.items():
            name = f"pruned{round(sparsity * 100)} {kind}"
            plain, packed = folder / f"{name}.onnx", folder / f"{name} packed.onnx"
            plain.write_bytes(model.SerializeToString())
            start = time.perf_counter()
            result = Pack()(model)
            print(f"  packed {name} in {time.perf_counter() - start:.1f} s", flush=True)
            packed.write_bytes(result.model.SerializeToString())
            out[name] = (plain, packed, result.stats["params_packed"])
            if name == "pruned50 fp32":  # the alternative the chunks replace: one piece each
                whole = folder / f"{name} one piece.onnx"
                whole.write_bytes(Pack(chunk=2**40)(model).model.SerializeToString())
    return out


def main() -> int:
    rng = np.random.default_rng(0)
    lines = [
        f"bench_pack: ResNet-18 shape (11.7 M params, 224x224), batch 1, 1 thread; "
        f"{platform.processor() or platform.machine()}, onnxruntime {ort.__version__}",
        f"{'model':<16} {'size MB':>8} {'x smaller':>10} {'target':>7} {'identical':>9} "
        f"{'speed vs unpacked':>18} {'session s (unpacked)':>21} "
        f"{'+s/10M':>9} {'+cpu s/10M':>9}",
    ]
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        calib = folder / "calib.npz"
        np.savez(calib, x=rng.standard_normal((16, 3, 224, 224)).astype(np.float32))
        variants = _variants(folder, calib)
        fp32_size = (folder / "fp32.onnx").stat().st_size
        images = rng.standard_normal((4, 3, 224, 224)).astype(np.float32)
        for name, (plain, packed, values) in variants.items():
            ratio = fp32_size / packed.stat().st_size
            same = _identical(plain, packed, images)
            same &= _fused_ops(plain, folder) == _fused_ops(packed, folder)
            speed = _speed(plain, packed)
            (w_plain, c_plain), (w_packed, c_packed) = _session_seconds([plain, packed])
            lines.append(
                f"{name:<16} {packed.stat().st_size / 1e6:>8.2f} {ratio:>9.2f}x "
                f"{TARGETS[name]:>6.1f}x {str(same):>9} {speed:>17.2f}x "
                f"{w_packed:>8.3f} ({w_plain:.3f}) {(w_packed - w_plain) / values * 1e7:>+9.3f} "
                f"{(c_packed - c_plain) / values * 1e7:>+9.3f}"
            )
            if ratio < TARGETS[name] or not same or speed < LATENCY_FLOOR:
                failed.append(name)
        plain, packed, values = variants["pruned50 fp32"]
        one_piece = folder / "pruned50 fp32 one piece.onnx"
        plain_s, chunks_s, whole_s = (
            cpu for _, cpu in _session_seconds([plain, packed, one_piece])
        )
        lines.append(
            f"cold start, pruned50 fp32, CPU seconds added per 10 M packed values: "
            f"{(chunks_s - plain_s) / values * 1e7:+.3f} in {CHUNK:,}-value chunks, "
            f"{(whole_s - plain_s) / values * 1e7:+.3f} decoding each weight in one piece"
        )
    lines.append(f"fp32 dense: {fp32_size / 1e6:.2f} MB")
    lines.append(
        f"targets: size as listed, outputs identical, speed >= {LATENCY_FLOOR}x; cold start "
        f"goal <= +{COLD_START_GOAL} s per 10 M packed values (reported, not gated: noisy)"
    )
    if failed:
        lines.append(f"FAILED: {', '.join(failed)}")
    text = "\n".join(lines)
    print(text)
    if NOTES.parent.is_dir():
        NOTES.write_text(text + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
