"""Start-up time of `onnxship bench --help` and `onnxship validate --help`, against a bare
`python -c pass` measured in the same run, and what each imports.

Run: .venv/bin/python tests/benchmarks/bench_cli_startup.py
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REPEATS = 15
HEAVY = ("torch", "onnxruntime", "onnx", "numpy")


def wall_ms(argv: list[str]) -> float:
    """Median wall time of ``argv`` over REPEATS runs, in ms."""
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        subprocess.run(argv, cwd=ROOT, capture_output=True, check=True)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def heavy_imports(argv: list[str]) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", *argv], cwd=ROOT, capture_output=True, text=True
    )
    names = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    return sorted(n for n in names if n.split(".")[0] in HEAVY)


def main() -> None:
    bare = wall_ms([sys.executable, "-c", "pass"])
    print(f"{'command':<28} {'median ms':>10} {'vs python':>10}  heavy imports")
    print(f"{'python -c pass':<28} {bare:10.1f} {1.0:9.2f}x")
    for command in ("bench", "validate"):
        argv = ["-m", "converter", command, "--help"]
        ms = wall_ms([sys.executable, *argv])
        heavy = heavy_imports(argv)
        print(f"{'onnxship ' + command + ' --help':<28} {ms:10.1f} {ms / bare:9.2f}x  ", end="")
        print(", ".join(heavy) or "none")


if __name__ == "__main__":
    main()
