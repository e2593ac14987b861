"""How far keeping Convs in fp32 gets a real pretrained CNN, and at what speed (issue #20's
second goal: ``auto --min-score 0.995 --min-worst 0.98`` at ≥ 0.9x bare onnxruntime's
speedup).

MobileNetV2 (torchvision ImageNet weights, ``_real.py``), quantized as auto's
``static_u8_pc_mse`` (the default levers), calibration on 192 crops of the calibration
photos. The start is the cheapest repair: the stem and ``features.1``'s depthwise Conv (the
first two Convs) in fp32, float region widened, which runs faster than full int8. From there,
each other Conv alone is kept in fp32 too and scored on VALIDATION other crops of the
calibration photos (the test photos stay unseen); the Convs are then added in the order of
that gain, and each prefix is scored on the test crops (kernels, batch 1) and timed against
bare ``quantize_static`` and fp32 (batch 1, one thread, interleaved: every round runs every
model once; p50 of the rounds).
README, "CNN int8 (real pretrained weights)".
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import _real  # noqa: E402
from bench_cnn_int8 import CALIB, TEST, VALIDATION, _bare, _cosine, _outputs  # noqa: E402

from converter.check.bench import bench  # noqa: E402
from converter.core.machine import machine, machine_line  # noqa: E402
from converter.search.budget import Budget  # noqa: E402
from converter.search.builder import Builder  # noqa: E402
from converter.search.fallback import step_passes  # noqa: E402

CONFIG = {"pass": "quantize-static", "scheme": "default", "calib_method": "mse"}
STEPS = 8  # Convs added after the start, in order of their gain alone
ROUNDS = 300


def _interleaved(paths: list[Path], data: Path) -> list[tuple[float, float]]:
    """(p50, fastest) seconds of each model at batch 1, one thread, interleaved (each round
    runs every model once: converter.check.bench); on a shared CPU the fastest run moves far
    less with the neighbours' load."""
    report = bench(paths, threads=[1], warmup=10, runs=ROUNDS, data=data, warn_target=False)
    latency = [report.get(i, 1).latency for i in range(len(paths))]
    return [(t.p50_ms / 1e3, t.min_ms / 1e3) for t in latency]


def main() -> None:
    fp32 = _real.mobilenet_v2()
    calib = _real.crops(_real.CALIB_PHOTOS, CALIB, seed=1)
    val = _real.crops(_real.CALIB_PHOTOS, VALIDATION, seed=3)
    test = _real.crops(_real.TEST_PHOTOS, TEST, seed=2)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        np.savez(folder / "calib.npz", input=calib)
        np.savez(folder / "val.npz", input=val)
        model = onnx.load(str(fp32))
        budget = Budget(min_score=0.995, min_worst=0.98, metric="cosine")
        host = machine()
        builder = Builder(
            model,
            folder / "calib.npz",
            folder / "val.npz",
            fp32,
            budget,
            folder,
            str(host["target"]),
        )
        convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
        ref_val, ref_test = _outputs(fp32, val)[0], _outputs(fp32, test)[0]

        def build(kept: list[str]) -> Path:
            path = folder / f"kept{len(kept)}_{kept[-1].replace('/', '_')}.onnx"
            onnx.save(builder.build(step_passes(CONFIG, kept, True)), str(path))
            return path

        start = convs[:2]
        base = _cosine(ref_val, _outputs(build(start), val)[0]).mean()
        gains = {}
        for name in convs[2:]:
            path = build(start + [name])
            gains[name] = _cosine(ref_val, _outputs(path, val)[0]).mean() - base
            path.unlink()
        order = sorted(gains, key=lambda n: -gains[n])
        positive = sum(g > 0 for g in gains.values())
        print(
            f"{machine_line(host)}; MobileNetV2, calibration {CALIB} crops, "
            f"gains on {VALIDATION} validation crops, scores on {TEST} test crops of other "
            "photos, batch 1"
        )
        top = max(gains.values())
        print(
            f"each other Conv alone in fp32 on top of the start: gain max {top:.4f}, "
            f"> 0.001: {sum(g > 0.001 for g in gains.values())} of {len(gains)}, "
            f"> 0: {positive}, < 0: {sum(g < 0 for g in gains.values())}"
        )
        full = folder / "full.onnx"
        onnx.save(builder.build(step_passes(CONFIG, [], False)), str(full))
        rows = {"full int8 (static_u8_pc_mse)": (0, full)}
        kept = list(start)
        rows["start: stem + features.1 depthwise"] = (len(kept), build(kept))
        for name in order[:STEPS]:
            kept = kept + [name]
            rows[f"+ {name.removeprefix('/features/')}"] = (len(kept), build(kept))
        bare = _bare(fp32, calib, folder / "bare.onnx")
        np.savez(folder / "test.npz", input=test)
        times = _interleaved([fp32, bare, *(p for _, p in rows.values())], folder / "test.npz")
        print(
            "| model | Convs fp32 | test mean / worst (kernels) | x fp32 | x bare (p50; fastest) |"
        )
        print("|---|---|---|---|---|")
        (fp32_p50, fp32_min), (bare_p50, bare_min) = times[:2]
        for (label, (count, path)), (p50, fastest) in zip(rows.items(), times[2:]):
            cos = _cosine(ref_test, _outputs(path, test)[0])
            print(
                f"| {label} | {count} | {cos.mean():.4f} / {cos.min():.4f} "
                f"| {fp32_p50 / p50:.2f}x | {bare_p50 / p50:.2f}x; {bare_min / fastest:.2f}x |"
            )


if __name__ == "__main__":
    main()
