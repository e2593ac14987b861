"""int8 quantization on this CPU: batch-1, one-thread speedup vs fp32, size, fidelity.

Models: a ResNet-18-shaped CNN (random init, 224x224), the trained tiny_encoder (seq 64) and
a BERT-style encoder (transformers BertConfig, hidden 256, 4 layers, seq 128, random init).
Each quantized variant is timed interleaved with its fp32 model by `converter.check.bench.bench`
(every round runs each model once, so machine drift cancels); cosine to fp32 is the mean
(and min) over held-out inputs. Variants: dynamic, static with uint8 and int8 activations
for --target avx2 (7-bit weights), and both modes for --target avx512-vnni (8-bit weights):
on a CPU without VNNI the latter shows the saturation that target avx2 avoids.

Run: .venv/bin/python tests/benchmarks/bench_quantize.py   (about 3-4 minutes)
Writes the table to /work/notes/bench_quantize.txt as well.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
NOTES = Path("/work/notes/bench_quantize.txt")
TARGETS = {"static CNN": (3.0, 0.999), "dynamic encoder": 1.8}


# ------------------------------------------------------------------ models (export imports them)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    """torchvision's resnet18 layout (no torchvision needed)."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        )
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.adaptive_avg_pool2d(self.layers(self.stem(x)), 1)
        return self.fc(torch.flatten(h, 1))


def resnet18() -> nn.Module:
    torch.manual_seed(0)
    model = ResNet18()
    for m in model.modules():  # BN statistics as after training, not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


class Bert(nn.Module):
    """BertModel with random weights; returns the last hidden state."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        config = BertConfig(
            hidden_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=1024,
            max_position_embeddings=512,
        )
        torch.manual_seed(0)
        self.bert = BertModel(config, add_pooling_layer=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def bert() -> nn.Module:
    return Bert().eval()


# ------------------------------------------------------------------ the benchmark


class Case(NamedTuple):
    name: str
    onnx: Path
    calib: Path  # calibration samples
    held_out: Path  # inputs for cosine to fp32 (first sample: the timed feed)
    runs: int  # timed rounds


class Row(NamedTuple):
    model: str
    variant: str
    fp32_ms: float
    int8_ms: float
    speedup: float
    size_ratio: float
    cos_mean: float
    cos_min: float


# Every variant names its hardware target, so the table means the same on any machine:
# avx2 = 7-bit weights; avx512-vnni (and arm64) = full 8-bit weights.
VARIANTS = {
    "dynamic": ("dynamic", {"target": "avx2"}),
    "static u8 act": ("static", {"target": "avx2"}),
    "static s8 act": ("static", {"activation_type": "int8", "target": "avx2"}),
    "dynamic target vnni": ("dynamic", {"target": "avx512-vnni"}),
    "static u8 target vnni": ("static", {"target": "avx512-vnni"}),
}


def _save_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def export_models(folder: Path) -> list[Case]:
    from converter.torch.export import export

    rng = np.random.default_rng(0)
    cnn = folder / "resnet18.onnx"
    export(f"{__file__}:resnet18", cnn, ["x:batch,3,224,224:float32"])
    images = rng.standard_normal((48, 3, 224, 224)).astype(np.float32)
    enc = folder / "bert.onnx"
    inputs = ["input_ids:batch,seq:int64", "attention_mask:batch,seq:int64"]
    export(f"{__file__}:bert", enc, inputs, dims={"seq": 16})
    ids = rng.integers(0, 30522, (48, 128)).astype(np.int64)
    mask = np.ones_like(ids)
    tiny = folder / "tiny_encoder.onnx"
    export(f"{ROOT}/models/tiny_encoder/model.py:trained", tiny, inputs, dims={"seq": 16})
    data = ROOT / "build" / "models" / "tiny_encoder"
    return [
        Case(
            "resnet18 (224x224)",
            cnn,
            _save_npz(folder / "cnn-calib.npz", x=images[:32]),
            _save_npz(folder / "cnn-test.npz", x=images[32:]),
            runs=25,
        ),
        Case(
            "bert h256 L4 (seq 128)",
            enc,
            _save_npz(folder / "bert-calib.npz", input_ids=ids[:32], attention_mask=mask[:32]),
            _save_npz(folder / "bert-test.npz", input_ids=ids[32:], attention_mask=mask[32:]),
            runs=60,
        ),
        Case("tiny_encoder (seq 64)", tiny, data / "calib.npz", data / "test.npz", runs=200),
    ]


def quantize_variants(case: Case, folder: Path) -> dict[str, Path]:
    """Every variant of VARIANTS, static ones sharing one calibration run."""
    import onnx

    from converter.core.onnxio import save_model
    from passes.quantize import DynamicQuantize, StaticQuantize

    model = onnx.load(str(case.onnx))
    # every op quantized, as the table's activation-type and weight-bit rows were measured
    # (scheme auto would pick the transformer scheme for the encoder)
    ranges = StaticQuantize(calibration=case.calib, progress=False, scheme="default").calibrate(
        model
    )
    out = {}
    for name, (mode, settings) in VARIANTS.items():
        if mode == "dynamic":
            quantized = DynamicQuantize(**settings)(model).model
        else:
            quantized = StaticQuantize(ranges=ranges, **settings)(model).model
        path = folder / f"{case.onnx.stem}-{name.replace(' ', '-')}.onnx"
        save_model(quantized, path)
        out[name] = path
    return out


def cosine(case: Case, path: Path) -> tuple[float, float]:
    import onnx

    from converter.core.data import model_input_specs, open_data
    from converter.core.metrics import per_sample_cosine
    from converter.core.runtime import make_session

    specs = model_input_specs(onnx.load(str(case.onnx), load_external_data=False))
    data = open_data(case.held_out, specs)
    outs = []
    for model in (case.onnx, path):
        session = make_session(str(model))
        outs.append(np.concatenate([session.run(None, f)[0] for f in data.batches(specs, 8)]))
    cos = per_sample_cosine(outs[1], outs[0])
    return float(cos.mean()), float(cos.min())


def measure(case: Case, variants: dict[str, Path]) -> tuple[list[Row], dict]:
    from converter.check.bench import bench

    paths = [case.onnx, *variants.values()]
    report = bench(paths, threads=(1,), data=case.held_out, runs=case.runs, warmup=5)
    fp32 = report.results[0]
    rows = []
    for (name, path), result in zip(variants.items(), report.results[1:]):
        rows.append(
            Row(
                case.name,
                name,
                fp32.latency.p50_ms,
                result.latency.p50_ms,
                result.speedup,
                path.stat().st_size / case.onnx.stat().st_size,
                *cosine(case, path),
            )
        )
    return rows, report.machine


# Kernels that do the matrix work (and, in int8 models, the quantize/dequantize around it).
MATRIX_OPS = {
    "Conv", "FusedConv", "MatMul", "FusedMatMul", "Gemm", "FusedGemm", "NhwcFusedConv",
    "QLinearConv", "QLinearMatMul", "QGemm", "MatMulInteger", "ConvInteger", "QAttention",
    "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "DynamicQuantizeLinear",
    "QuantizeLinear", "DequantizeLinear",
}  # fmt: skip


def kernel_times(path: Path, feeds: dict, folder: Path, runs: int = 15) -> tuple[float, float]:
    """(matrix kernels, other kernels): median ms per run over ``runs`` runs after 3 warm-up
    runs, from onnxruntime's profiler, one thread."""
    import json

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = str(folder / "profile")
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(3 + runs):
        session.run(None, feeds)
    events = json.loads(Path(session.end_profiling()).read_text())
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[
        3:
    ]
    per_run = np.zeros((len(spans), 2))
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        run = next((i for i, (lo, hi) in enumerate(spans) if lo <= e["ts"] <= hi), None)
        if run is not None:
            per_run[run, 0 if e["args"].get("op_name") in MATRIX_OPS else 1] += e["dur"]
    m, o = np.median(per_run, axis=0) / 1e3
    return float(m), float(o)


def explain(case: Case, variant: str, path: Path, folder: Path) -> str:
    """Where the time goes, fp32 vs the int8 variant: what int8 can and cannot speed up."""
    feeds = {k: v[:1] for k, v in np.load(case.held_out).items() if k != "labels"}
    m32, o32 = kernel_times(case.onnx, feeds, folder)
    m8, o8 = kernel_times(path, feeds, folder)
    share = m32 / (m32 + o32)
    return (
        f"  {case.name}, {variant}: matrix kernels (Conv/MatMul/Gemm and their int8 forms, "
        f"(de)quantize included) are {100 * share:.0f}% of fp32 kernel time and run "
        f"{m32 / m8:.2f}x faster in int8; the other kernels take {o32:.2f} ms in fp32, "
        f"{o8:.2f} ms in int8 (not sped up)"
    )


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")),
        [],
    )
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    return " ".join(f"{f}={'yes' if f in flags else 'no'}" for f in wanted)


def table(rows: list[Row]) -> list[str]:
    head = (
        f"{'model':<24} {'variant':<24} {'fp32 ms':>8} {'int8 ms':>8} {'speedup':>8} "
        f"{'size':>6} {'cos mean':>9} {'cos min':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.model:<24} {r.variant:<24} {r.fp32_ms:8.2f} {r.int8_ms:8.2f} "
            f"{r.speedup:7.2f}x {r.size_ratio:6.2f} {r.cos_mean:9.5f} {r.cos_min:8.5f}"
        )
    return lines


def verdicts(rows: list[Row]) -> list[str]:
    def row(model: str, variant: str) -> Row:
        return next(r for r in rows if r.model.startswith(model) and r.variant == variant)

    cnn = row("resnet18", "static u8 act")
    bert_dyn, tiny_dyn = row("bert", "dynamic"), row("tiny_encoder", "dynamic")
    speed, cos = TARGETS["static CNN"]
    cnn_met = cnn.speedup >= speed and cnn.cos_mean >= cos
    return [
        f"target static int8 CNN >= {speed:g}x, cosine >= {cos}: measured {cnn.speedup:.2f}x, "
        f"cosine {cnn.cos_mean:.5f} -> {'MET' if cnn_met else 'NOT MET'}",
        f"target dynamic int8 encoder >= {TARGETS['dynamic encoder']:g}x: measured "
        f"{bert_dyn.speedup:.2f}x (BERT-style), {tiny_dyn.speedup:.2f}x (tiny_encoder) -> "
        f"{'MET' if bert_dyn.speedup >= TARGETS['dynamic encoder'] else 'NOT MET'}",
    ]


def main() -> int:
    import onnxruntime

    start = time.perf_counter()
    rows, machine = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as tmp:
        folder = Path(tmp)
        why = []
        for case in export_models(folder):
            print(f"quantizing and timing {case.name} ...", file=sys.stderr, flush=True)
            variants = quantize_variants(case, folder)
            case_rows, machine = measure(case, variants)
            rows += case_rows
            variant = "static u8 act" if case.name.startswith("resnet") else "dynamic"
            why.append(explain(case, variant, variants[variant], folder))
    lines = [
        f"bench_quantize: batch 1, 1 intra-op thread, sequential, interleaved with fp32 "
        f"(converter.check.bench), p50 latency; onnxruntime {onnxruntime.__version__}",
        f"cpu: {machine.get('cpu', 'unknown')}; {cpu_flags()}; load average at the end "
        f"{os.getloadavg()[0]:.2f} (other processes share the cores: expect +-10% noise)",
        "dynamic = per-channel int8 weights, uint8 activations; static = QDQ, minmax, uint8 "
        "activations, per-channel int8 weights; --target avx2 = 7-bit weights, --target "
        "avx512-vnni = 8-bit weights (meant for VNNI CPUs: on a CPU without VNNI they saturate)",
        "size = int8 file / fp32 file; cos = cosine to fp32 outputs over held-out inputs",
        "",
        *table(rows),
        "",
        *verdicts(rows),
        "why (onnxruntime profiler, one thread, median of 15 runs; kernel times are noisier "
        "than the interleaved latencies above):",
        *why,
        "  this CPU has AVX2 but no VNNI: MLAS multiplies uint8 x int8 with vpmaddubsw + "
        "vpmaddwd (VNNI does it in one vpdpbusd), and int8 activations (s8 x s8) take a slower "
        "path still; the 3x CNN target assumes VNNI.",
        f"total {time.perf_counter() - start:.0f} s",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if NOTES.parent.is_dir():
        from converter.core.onnxio import atomic_write_text

        atomic_write_text(NOTES, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
