"""shrink on this CPU: accuracy kept by distillation, and the speed structured pruning buys.

1. digits_cnn and tiny_encoder at --keep 0.5, trained on the digits training split (with
   labels): test accuracy (onnxruntime, the 450 held-out test digits) of the unpruned model,
   of the pruned model before distillation (torch, the same pruning) and of the shrunk model.
2. A ResNet-18-shaped CNN (tests/benchmarks/bench_quantize.py:resnet18, random weights,
   224x224) at --keep 0.5: unpruned fp32, shrunk fp32 and shrunk + static int8
   (passes.quantize.StaticQuantize, U8/S8 QDQ) timed interleaved by converter.check.bench.bench,
   batch 1, one thread. Its distillation runs a couple of steps on random images: only the
   speed is measured here, the weights are random.

Time to shrink (prune + distill + export + verify) is printed for each model.
`--half-width` adds a ResNet-18 built at exactly half width (and its int8) to the ResNet
timing, to tell what shrink's output costs apart from what the machine gives;
`--resnet-only` skips the digits models.
Run: .venv/bin/python tests/benchmarks/bench_shrink.py   (about 6-8 minutes here)
Writes the table to /work/notes/bench_shrink.txt as well when that folder exists.
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "models"))
NOTES = Path("/work/notes/bench_shrink.txt")
TARGETS = {"fp32": 3.0, "int8": 6.5, "drop": 0.01}

DIGITS = {
    # name: (inputs, --ignore, distillation settings)
    "digits_cnn": (["x:batch,1,8,8:float32"], (), dict(epochs=10, lr=3e-3)),
    "tiny_encoder": (
        ["input_ids:batch,seq:int64", "attention_mask:batch,seq:int64"],
        (r"qkv$",),  # hand-written attention reshapes qkv to a fixed head width
        dict(epochs=6, lr=3e-3),
    ),
}


def _load(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "models" / name / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ort_accuracy(path: Path, test: Path) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with np.load(test) as data:
        feeds = {i.name: data[i.name] for i in session.get_inputs()}
        return float(np.mean(session.run(None, feeds)[0].argmax(-1) == data["labels"]))


def _pruned_only_accuracy(module, prune, example: list[torch.Tensor]) -> float:
    """Test accuracy of the same pruning with no recovery (torch)."""
    from converter.torch.structured import prune_structured

    model = copy.deepcopy(module.trained())
    prune_structured(model, example, prune)
    return module.test_accuracy(model.eval())


def digits_rows(folder: Path) -> list[str]:
    import _shared

    from converter.torch.distill import DistillSettings
    from converter.torch.export import export
    from converter.torch.shrink import ShrinkOptions, shrink
    from converter.torch.structured import PruneSettings

    rows = []
    for name, (inputs, ignore, settings) in DIGITS.items():
        module = _load(name)
        module.trained()
        x_tr, y_tr, _, _ = _shared.digits_split()
        train = folder / f"{name}-train.npz"
        arrays = module._inputs(x_tr)
        np.savez(train, **arrays, labels=y_tr)
        test = ROOT / "build" / "models" / name / "test.npz"
        spec = f"{ROOT}/models/{name}/model.py:trained"
        ref = folder / f"{name}.onnx"
        export(spec, ref, inputs, dims={"seq": 16})
        prune = PruneSettings(keep=0.5, ignore=ignore)
        started = time.perf_counter()
        out, report, _ = shrink(
            spec,
            folder / f"{name}-shrunk.onnx",
            inputs,
            train,
            prune=prune,
            distill=DistillSettings(**settings),
            options=ShrinkOptions(bench_runs=300, progress=False),
        )
        seconds = time.perf_counter() - started
        example = [torch.from_numpy(a[:2]) for a in arrays.values()]
        base, shrunk = _ort_accuracy(ref, test), _ort_accuracy(out, test)
        pruned = _pruned_only_accuracy(module, prune, example)
        rows.append(
            f"{name:<14} {base:>9.4f} {pruned:>9.4f} ({base - pruned:+.4f}) {shrunk:>9.4f} "
            f"({base - shrunk:+.4f}) {report.params['after'] / report.params['before']:>6.2f} "
            f"{report.macs['after'] / report.macs['before']:>6.2f} "
            f"{report.latency_ms['speedup']:>7.2f}x {len(report.history.train_loss):>6} "
            f"{seconds:>7.1f} s"
        )
    return rows


def half_width():
    """ResNet-18 built at exactly half width (stem and blocks 32..256 channels, fc 256 → 1000),
    for --half-width: what shrink's output should match."""
    import bench_quantize as bq
    from torch import nn

    torch.manual_seed(0)
    model = bq.ResNet18()
    model.stem[0], model.stem[1] = nn.Conv2d(3, 32, 7, 2, 3, bias=False), nn.BatchNorm2d(32)
    layers, cin = [], 32
    for cout, stride in ((32, 1), (64, 2), (128, 2), (256, 2)):
        layers += [bq.BasicBlock(cin, cout, stride), bq.BasicBlock(cout, cout, 1)]
        cin = cout
    model.layers, model.fc = nn.Sequential(*layers), nn.Linear(256, 1000)
    return model.eval()


def _int8(path: Path, data: Path) -> Path:
    import onnx

    from converter.core.onnxio import save_model
    from passes.quantize import StaticQuantize

    out = path.with_name(path.stem + "-int8.onnx")
    save_model(StaticQuantize(calibration=data, progress=False)(onnx.load(str(path))).model, out)
    return out


def resnet_rows(folder: Path, with_half_width: bool = False) -> list[str]:
    from converter.check.bench import bench
    from converter.torch.distill import DistillSettings
    from converter.torch.export import export
    from converter.torch.shrink import ShrinkOptions, shrink

    images = np.random.default_rng(0).standard_normal((24, 3, 224, 224)).astype(np.float32)
    data = folder / "images.npz"
    np.savez(data, x=images)
    spec, inputs = f"{HERE}/bench_quantize.py:resnet18", ["x:batch,3,224,224:float32"]
    ref = folder / "resnet18.onnx"
    export(spec, ref, inputs)
    started = time.perf_counter()
    out, report, _ = shrink(
        spec,
        folder / "resnet18-shrunk.onnx",
        inputs,
        data,
        distill=DistillSettings(steps=2, batch_size=4),
        options=ShrinkOptions(bench_runs=0, progress=False),
    )
    seconds = time.perf_counter() - started
    models = [ref, out, _int8(out, data)]
    if with_half_width:
        half = folder / "resnet18-half.onnx"
        export(f"{__file__}:half_width", half, inputs)
        models += [half, _int8(half, data)]
    result = bench(models, threads=(1,), runs=60, data=data)
    p50 = [result.get(i, 1).latency.p50_ms for i in range(len(models))]
    macs = report.macs["after"] / report.macs["before"]
    extra = [
        f"resnet18 built half width  {p50[3]:8.2f} ms  {p50[0] / p50[3]:.2f}x",
        f"half width + int8          {p50[4]:8.2f} ms  {p50[0] / p50[4]:.2f}x",
    ]
    return [
        f"resnet18 fp32 unpruned     {p50[0]:8.2f} ms  1.00x",
        f"resnet18 fp32 shrunk       {p50[1]:8.2f} ms  {p50[0] / p50[1]:.2f}x  (target "
        f"≥ {TARGETS['fp32']}x; MACs {macs:.2f}x, params "
        f"{report.params['after'] / report.params['before']:.2f}x)",
        f"resnet18 shrunk + int8     {p50[2]:8.2f} ms  {p50[0] / p50[2]:.2f}x  (target "
        f"≥ {TARGETS['int8']}x)",
        *(extra if with_half_width else []),
        f"time to shrink resnet18 (prune, 2 distillation steps, export, verify): {seconds:.1f} s",
    ]


def main(argv: list[str]) -> int:
    only_resnet = "--resnet-only" in argv
    started = time.perf_counter()
    lines = [
        "shrink --keep 0.5, this CPU (AMD EPYC, AVX2, no VNNI), onnxruntime "
        f"{ort.__version__}, batch 1, one thread, interleaved",
        "",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        if not only_resnet:
            lines.append(
                "model          unpruned  pruned (drop)       shrunk (drop)  params   MACs  "
                "speedup  steps  shrink time"
            )
            lines += digits_rows(Path(tmp))
            lines.append("")
        lines += resnet_rows(Path(tmp), with_half_width="--half-width" in argv)
    lines.append(f"\nbenchmark wall time {time.perf_counter() - started:.0f} s")
    text = "\n".join(lines)
    print(text)
    if NOTES.parent.is_dir() and not argv:
        NOTES.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
