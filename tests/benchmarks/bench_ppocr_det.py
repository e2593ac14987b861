"""Static int8 of a model from another exporter: PP-OCRv4's text detector (rapidocr-onnxruntime
1.4.4; paddle2onnx, opset 12, weights in Constant nodes), on real photos that hold text.

Task metric (tests/benchmarks/_ppocr.py): the probability map binarised at 0.3 (rapidocr's
threshold), IoU against fp32's, text regions, the map's peak and the maps' correlation, on the
three scikit-image photos with text at the size rapidocr feeds them (page 736×1472, text
736×1920, logo 736×736), batch 1. Each quantized model is scored twice: with onnxruntime's
graph optimizations off (the QDQ model's semantics: Q/DQ run as float ops) and on (the integer
kernels that ship). Calibration: 64 random 640×640 crops of 12 other photos, with printed
words drawn on them (or not: the "no words" row). Speed: batch 1, one thread, interleaved with
fp32 (converter.check.bench), on a 736×736 tile of the page photo.

Run: .venv/bin/python tests/benchmarks/bench_ppocr_det.py   (about 10 minutes on 2 cores)
Needs: pip install --no-deps rapidocr-onnxruntime==1.4.4 (the model files only).
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

import _ppocr  # noqa: E402

CALIB_SAMPLES = 64
# quantize_static's MinMax calibrator keeps every intermediate tensor of every sample until
# the reader is exhausted: 64 samples at 640×640 took more than 23 GB and were killed here.
BARE_SAMPLES = 16


def _session(path: Path, optimize: bool):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _maps(path: Path, inputs: dict[str, np.ndarray], optimize: bool) -> dict[str, np.ndarray]:
    session = _session(path, optimize)
    return {name: session.run(None, {"x": x})[0] for name, x in inputs.items()}


def _bare_ort(source: Path, calib: np.ndarray, out: Path) -> Path:
    """quantize_static as a user would call it, on the model with its Constant weights moved
    to initializers and its opset upgraded to 13 by hand (ORT refuses neither, but writes an
    invalid model at opset 12): QDQ, uint8 activations, int8 per-channel 8-bit weights,
    MinMax on the first BARE_SAMPLES calibration samples."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from passes.normalize import upgrade_opset, weights_as_initializers

    model, _ = upgrade_opset(weights_as_initializers(onnx.load(source))[0], 13, "bench")
    fixed, pre = out.with_suffix(".fixed.onnx"), out.with_suffix(".pre.onnx")
    onnx.save(model, fixed)
    quant_pre_process(str(fixed), str(pre), skip_symbolic_shape=True)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(calib[i : i + 1] for i in range(BARE_SAMPLES))

        def get_next(self):
            x = next(self.items, None)
            return None if x is None else {"x": x}

    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    return out


def _variants(source: Path, folder: Path, calib: Path, plain: Path) -> dict[str, Path]:
    from passes.base import apply_to_file
    from passes.quantize import StaticQuantize

    runs = {
        "onnxship default (QDQ, minmax, per-channel)": {},
        "  head fp32 (--exclude-op ConvTranspose Sigmoid)": {
            "exclude_ops": ("ConvTranspose", "Sigmoid")
        },
        "  per-tensor weights": {"per_channel": False},
        "  percentile ranges": {"calib_method": "percentile"},
        "  QOperator format": {"format": "qoperator"},
        "  calibrated without words": {"calibration": plain},
    }
    out = {}
    for i, (label, settings) in enumerate(runs.items()):
        path = folder / f"v{i}.onnx"
        settings = {"calibration": calib, "progress": False, **settings}
        apply_to_file([StaticQuantize(**settings)], source, path, settings["calibration"])
        out[label] = path
    return out


def _row(label: str, scores: dict[str, dict], speed: str) -> str:
    cells = [
        f"{s['iou']:.3f} {s['peak'][1]:.2f} {s['regions'][1]:>3}/{s['regions'][0]:<3} "
        f"{s['corr']:.3f}"
        for s in scores.values()
    ]
    return f"{label:<50} {'  '.join(cells)}  {speed}"


def main() -> int:
    from converter.check.bench import bench
    from converter.core.machine import machine, machine_line

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    source = _ppocr.det_model()
    tests = _ppocr.test_inputs()
    with tempfile.TemporaryDirectory(prefix="bench-ppocr-") as tmp:
        folder = Path(tmp)
        calib = _ppocr.calibration(CALIB_SAMPLES, seed=0)
        np.savez(folder / "calib.npz", x=calib)
        np.savez(folder / "plain.npz", x=_ppocr.calibration(CALIB_SAMPLES, seed=0, words=False))
        np.savez(folder / "tile.npz", x=_ppocr.test_tiles(photos=("page",))[:1])
        print("quantizing...", file=sys.stderr, flush=True)
        models = {f"bare quantize_static ({BARE_SAMPLES} samples)": _bare_ort(
            source, calib, folder / "bare.onnx"
        )}  # fmt: skip
        models.update(_variants(source, folder, folder / "calib.npz", folder / "plain.npz"))
        reference = _maps(source, tests, optimize=True)
        timing = bench([source, *models.values()], data=folder / "tile.npz", runs=15, warmup=3)
        m = machine()
        print(
            f"PP-OCRv4 det (rapidocr 1.4.4), {machine_line(m)}, batch 1, 1 thread; "
            f"calibration {CALIB_SAMPLES} crops of {len(_ppocr.CALIB_PHOTOS)} photos"
        )
        print(f"fp32: peak {', '.join(f'{n} {v.max():.2f}' for n, v in reference.items())}")
        head = "  ".join(f"{n + ': IoU peak reg corr':<24}" for n in tests)
        fp32_ms = timing.get(0, 1).latency.p50_ms
        print(f"{'model':<50} {head}  p50 ms (speedup) on a 736x736 tile; fp32 {fp32_ms:.0f}")
        for i, (label, path) in enumerate(models.items(), start=1):
            t = timing.get(i, 1)
            for optimize, how in ((False, "semantics"), (True, "kernels")):
                maps = _maps(path, tests, optimize)
                scores = {n: _ppocr.text_map_scores(reference[n], maps[n]) for n in tests}
                speed = f"{t.latency.p50_ms:.0f} ({t.speedup:.2f}x)" if optimize else ""
                print(_row(f"{label} [{how}]", scores, speed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
