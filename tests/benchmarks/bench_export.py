"""Export wall time per reference model, dynamo vs torchscript (verification included).

Run: .venv/bin/python tests/benchmarks/bench_export.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from converter.torch.export import export

ROOT = Path(__file__).resolve().parents[2]
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


if __name__ == "__main__":
    main()
