"""The latency table of the README's Benchmarks section: the trained digits CNN in fp32 and
in static int8 (QDQ, U8 activations, S8 per-channel weights), batch 1, at 1 and 2 intra-op
threads, 3000 interleaved runs each (`onnxship bench cnn.onnx cnn-int8.onnx --data test.npz
--threads 1,2 --runs 3000`). Prints a header naming the machine, then the table in markdown.

Run: .venv/bin/python tests/benchmarks/bench_latency.py   (about 30 seconds)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from run_all import machine_header

    from converter.benchmark import bench, table_rows
    from converter.exporter import export
    from passes import StaticQuantize
    from passes.base import apply_to_file

    data = ROOT / "build" / "models" / "digits_cnn"
    with tempfile.TemporaryDirectory() as tmp:
        cnn, int8 = Path(tmp) / "cnn.onnx", Path(tmp) / "cnn-int8.onnx"
        spec = f"{ROOT}/models/digits_cnn/model.py:trained"  # trains once, cached in build/
        export(spec, cnn, ["x:batch,1,8,8:float32"])
        apply_to_file([StaticQuantize(calibration=data / "calib.npz")], cnn, int8, data)
        report = bench([cnn, int8], threads=[1, 2], runs=3000, data=data / "test.npz")
    rows = table_rows(report)
    rows = [rows[0]] + [(r[0], f"`{Path(r[1]).name}`", *r[2:]) for r in rows[1:]]
    print(machine_header())
    print("| " + " | ".join(rows[0]) + " |")
    print("|" + "---|" * len(rows[0]))
    for row in rows[1:]:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
