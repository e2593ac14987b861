"""Export wall time per reference model, dynamo vs torchscript (verification included), then
``export`` on real pretrained PyTorch networks from other packages (``_real_torch.py``: MTCNN's
PNet, resemblyzer's LSTM speaker encoder, easyocr's CRAFT), their shipped checkpoints given as
``--weights`` as they are.

Run: .venv/bin/python tests/benchmarks/bench_export.py
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
import time
from pathlib import Path

from converter.torch.export import export

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
# name -> (callable in _real_torch.py, inputs, dims, package, weights file in the package)
REAL = {
    "MTCNN PNet (facenet-pytorch)": (
        "pnet", ["x:1,3,h,w"], {"h": 48, "w": 64}, "facenet_pytorch", "data/pnet.pt"
    ),
    "speaker LSTM (resemblyzer)": (
        "voice", ["mels:batch,160,40"], {}, "resemblyzer", "pretrained.pt"
    ),
    "CRAFT (easyocr)": (
        "craft", ["x:1,3,h,w"], {"h": 256, "w": 320}, "easyocr_en_models",
        "models/craft_mlt_25k.pth",
    ),
}  # fmt: skip
MODELS = {
    "digits_cnn": ["x:batch,1,8,8:float32"],
    "digits_mlp": ["x:batch,64:float32"],
    "tiny_encoder": ["input_ids:batch,seq:int64", "attention_mask:batch,seq:int64"],
}


def main() -> None:
    print(f"{'model':<14} {'exporter':<12} {'seconds':>8} {'MB':>6}  verified max abs diff")
    with tempfile.TemporaryDirectory() as tmp:
        for name, inputs in MODELS.items():
            spec = f"{ROOT}/models/{name}/model.py:trained"
            export(spec, Path(tmp) / "warm.onnx", inputs, dims={"seq": 16})  # train / cache
            for exporter in ("dynamo", "torchscript"):
                start = time.perf_counter()
                path, report = export(
                    spec,
                    Path(tmp) / f"{name}-{exporter}.onnx",
                    inputs,
                    dims={"seq": 16},
                    exporter=exporter,
                )
                seconds = time.perf_counter() - start
                worst = max(o.max_abs for c in report.comparisons for o in c.outputs)
                print(
                    f"{name:<14} {exporter:<12} {seconds:8.2f} "
                    f"{path.stat().st_size / 1e6:6.2f}  {worst:.2e}"
                )
    real()


def real() -> None:
    """``export`` on real pretrained networks: the packages' own checkpoints, verified
    against torch (on the traced example, new random values and a resized input)."""
    print(f"\n{'real model':<30} {'exporter':<12} {'seconds':>8} {'MB':>6}  verified max abs diff")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (factory, inputs, dims, package, weights) in REAL.items():
            spec = importlib.util.find_spec(package)
            if spec is None or spec.origin is None:
                print(f"{name:<30} not installed (make bench installs it with --no-deps)")
                continue
            start = time.perf_counter()
            path, report = export(
                f"{HERE / '_real_torch.py'}:{factory}", Path(tmp) / f"{factory}.onnx", inputs,
                weights=Path(spec.origin).parent / weights, dims=dims,
            )  # fmt: skip
            seconds = time.perf_counter() - start
            worst = max(o.max_abs for c in report.comparisons for o in c.outputs)
            print(
                f"{name:<30} {report.exporter:<12} {seconds:8.2f} "
                f"{path.stat().st_size / 1e6:6.2f}  {worst:.2e}"
            )


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parents[1]))
    main()
