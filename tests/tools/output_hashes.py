"""sha256 of every artifact onnxship makes from the bundled models: run it before and after a
refactor (a house move, a split of a module) and diff the two lists; they must be equal.

    python tests/tools/output_hashes.py > before.txt
    ... the change ...
    python tests/tools/output_hashes.py > after.txt && diff before.txt after.txt

It exports the three reference models of ``models/`` (their trained weights are cached under
``build/models/``), then quantizes them (dynamic; static with the default, transformer and
auto schemes; GPTQ rounding; for the avx2 and avx512-vnni targets and the host), prunes,
converts to fp16, packs, and runs the ``make demo`` recipe; it prints one ``sha256  name``
line per file, and the demo manifest's hashes. The hashes hold on one machine and in one
folder: training and float calibration differ between CPU kinds, and the exporter records the
model's source path, so compare lists made in the same checkout on the same machine.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODELS = {
    "cnn": ("digits_cnn", ["x:batch,1,8,8:float32"]),
    "mlp": ("digits_mlp", ["x:batch,64:float32"]),
    "enc": ("tiny_encoder", ["input_ids:batch,seq:int64", "attention_mask:batch,seq:int64"]),
}
TARGETS = ("avx2", "avx512-vnni")


def onnxship(*args: str) -> None:
    cmd = [sys.executable, "-m", "converter", "-q", *args]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def jobs(work: Path) -> list[list[str]]:
    """Every command whose output is hashed, as onnxship arguments."""
    calib = {
        k: str(ROOT / "build" / "models" / name / "calib.npz") for k, (name, _) in MODELS.items()
    }
    runs = []
    for t in TARGETS:
        for k in MODELS:
            runs.append(
                [
                    "quantize",
                    f"{work}/{k}.onnx",
                    "-o",
                    f"{work}/{k}-dyn-{t}.onnx",
                    "--mode",
                    "dynamic",
                    "--target",
                    t,
                ]
            )
            runs.append(
                [
                    "quantize",
                    f"{work}/{k}.onnx",
                    "-o",
                    f"{work}/{k}-static-{t}.onnx",
                    "--mode",
                    "static",
                    "--calib",
                    calib[k],
                    "--target",
                    t,
                ]
            )
        static = ["--mode", "static", "--calib", calib["enc"], "--target", t]
        runs.append(
            [
                "quantize",
                f"{work}/cnn.onnx",
                "-o",
                f"{work}/cnn-default-{t}.onnx",
                "--mode",
                "static",
                "--scheme",
                "default",
                "--calib",
                calib["cnn"],
                "--target",
                t,
            ]
        )
        runs.append(
            [
                "quantize",
                f"{work}/enc.onnx",
                "-o",
                f"{work}/enc-transformer-{t}.onnx",
                "--scheme",
                "transformer",
                *static,
            ]
        )
        runs.append(
            [
                "quantize",
                f"{work}/enc.onnx",
                "-o",
                f"{work}/enc-gptq-{t}.onnx",
                "--weight-rounding",
                "gptq",
                *static,
            ]
        )
    runs.append(
        [
            "quantize",
            f"{work}/cnn.onnx",
            "-o",
            f"{work}/cnn-static-host.onnx",
            "--mode",
            "static",
            "--calib",
            calib["cnn"],
        ]
    )
    runs.append(["prune", f"{work}/cnn.onnx", "-o", f"{work}/cnn-prune.onnx", "--sparsity", "0.5"])
    runs.append(["fp16", f"{work}/cnn.onnx", "-o", f"{work}/cnn-fp16.onnx"])
    runs.append(["pack", f"{work}/cnn-prune.onnx", "-o", f"{work}/cnn-pack.onnx"])
    return runs  # fmt: skip


def manifest_hashes(node: object, path: str = "") -> list[str]:
    """``sha256  manifest/<where>`` for every sha256 in a manifest's tree."""
    if isinstance(node, dict):
        lines = []
        for k, v in sorted(node.items()):
            here = f"{path}/{k}"
            lines += [f"{v}  manifest{path}"] if k == "sha256" else manifest_hashes(v, here)
        return lines
    if isinstance(node, list):
        return [line for i, v in enumerate(node) for line in manifest_hashes(v, f"{path}[{i}]")]
    return []


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="onnxship-hashes-") as tmp:
        work = Path(tmp)
        for k, (name, inputs) in MODELS.items():
            spec = f"{ROOT}/models/{name}/model.py:trained"
            onnxship(
                "export",
                spec,
                "-o",
                f"{work}/{k}.onnx",
                *[f"--input={i}" for i in inputs],
                *(["--dim", "seq=16"] if k == "enc" else []),
            )
        for args in jobs(work):
            onnxship(*args)
        onnxship(
            "run", str(ROOT / "models" / "digits_cnn" / "recipe.toml"), "-o", str(work / "demo")
        )
        for path in sorted(work.glob("*.onnx")):
            print(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}")
        manifest = json.loads((work / "demo" / "manifest.json").read_text())
        print("\n".join(manifest_hashes(manifest["artifacts"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
