"""Wall time of `onnxship sensitivity` on a 6-layer BERT-style encoder (transformers
BertConfig: hidden 256, 4 heads, FFN 1024, vocab 30522, random weights; 64 tokens per sample),
static and dynamic, with the top-5 nodes. Static mode is timed as auto uses it: calibration
once (timed apart), then sensitivity with the ranges. Times are also given as a multiple of one
fp32 pass over the same scoring samples, measured in the same run: sensitivity costs about one
such pass per node, plus building each variant (a graph copy in static mode, a
DynamicQuantize call in dynamic mode and for --gain).

Run: .venv/bin/python tests/benchmarks/bench_sensitivity.py [--stability] [--gain]
  --stability  also score on 256 samples and compare the static ranking with the default's
  --gain       also time static mode with gain=True (one more variant per node)
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

SEQ = 64
SAMPLES = 256  # in the data file; the default scores the first DEFAULT_SAMPLES


def build_encoder():
    """The encoder returning its last hidden state [batch, seq, 256] (export spec target)."""
    import torch
    from transformers import BertConfig, BertModel

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            config = BertConfig(
                hidden_size=256,
                num_hidden_layers=6,
                num_attention_heads=4,
                intermediate_size=1024,
            )
            self.bert = BertModel(config, add_pooling_layer=False)

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    return Encoder().eval()


def _data(path: Path) -> Path:
    """Random token ids; the second half of the samples padded after a random length."""
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 30000, size=(SAMPLES, SEQ)).astype(np.int64)
    mask = np.ones_like(ids)
    for i in range(SAMPLES // 2, SAMPLES):
        mask[i, rng.integers(SEQ // 2, SEQ) :] = 0
    ids[mask == 0] = 0
    np.savez(path, input_ids=ids, attention_mask=mask)
    return path


def _fp32_pass_seconds(model: Path, data: Path, samples: int) -> float:
    from converter.check.sensitivity import DEFAULT_BATCH_SIZE
    from converter.core.data import model_input_specs, open_data
    from converter.core.onnxio import load_model
    from converter.core.runtime import make_session, run_batches

    specs = model_input_specs(load_model(model))
    feeds = list(open_data(data, specs).batches(specs, DEFAULT_BATCH_SIZE, limit=samples))
    session = make_session(model)
    run_batches(session, feeds[:1])  # warm up
    start = time.perf_counter()
    run_batches(session, feeds)
    return time.perf_counter() - start


def _timed(model, data: Path, **options):
    from converter.check.sensitivity import sensitivity

    start = time.perf_counter()
    report = sensitivity(model, data, progress=False, **options)
    return report, time.perf_counter() - start


def _calibrated(model: Path, data: Path):
    """Calibration ranges measured once (what auto does), and the seconds it took."""
    from converter.core.onnxio import load_model
    from passes.quantize import calibrate

    proto = load_model(model)
    start = time.perf_counter()
    ranges = calibrate(proto, data, progress=False)
    return proto, ranges, time.perf_counter() - start


def _show(label: str, report, seconds: float, fp32_pass: float) -> None:
    nodes = len(report.nodes)
    print(
        f"{label}: {seconds:.1f} s for {nodes} nodes ({seconds / max(nodes, 1):.2f} s/node, "
        f"{seconds / fp32_pass:.0f}x one fp32 pass over the {report.samples} samples); "
        f"fully quantized loss {report.all_quantized.loss:.3e}"
    )
    for i, n in enumerate(report.nodes[:5], start=1):
        gain = "" if n.gain is None else f"  gain {n.gain:.3e}"
        print(f"  {i}. {n.name:<36} {n.op_type:<20} loss {n.loss:.3e}{gain}")


def _stability(model, data: Path, ranges, default_report) -> None:
    wide, seconds = _timed(model, data, calib=ranges, samples=SAMPLES)
    ranks = {name: i for i, name in enumerate(wide.ranked_nodes())}
    order = np.array([ranks[n] for n in default_report.ranked_nodes()])
    spearman = float(np.corrcoef(order, np.arange(len(order)))[0, 1])
    top = {
        k: len(set(default_report.ranked_nodes()[:k]) & set(wide.ranked_nodes()[:k]))
        for k in (5, 10)
    }
    print(
        f"static on {wide.samples} samples: {seconds:.1f} s; ranking vs {default_report.samples} "
        f"samples: Spearman {spearman:.4f}, top-5 overlap {top[5]}/5, top-10 overlap {top[10]}/10"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stability", action="store_true")
    parser.add_argument("--gain", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from converter.check.sensitivity import DEFAULT_SAMPLES
    from converter.torch.export import export

    with tempfile.TemporaryDirectory() as tmp:
        model, data = Path(tmp) / "encoder.onnx", _data(Path(tmp) / "data.npz")
        inputs = ["input_ids:batch,seq:int64", "attention_mask:batch,seq:int64"]
        export(f"{Path(__file__).resolve()}:build_encoder", model, inputs, dims={"seq": 16})
        fp32_pass = _fp32_pass_seconds(model, data, DEFAULT_SAMPLES)
        print(
            f"6-layer BERT-style encoder (hidden 256, seq {SEQ}), "
            f"{model.stat().st_size / 1e6:.1f} MB; one fp32 pass over {DEFAULT_SAMPLES} "
            f"samples: {fp32_pass:.2f} s (1 thread)"
        )
        proto, ranges, calib_seconds = _calibrated(model, data)
        print(
            f"calibration (minmax, {ranges.samples} samples, pre-processing): {calib_seconds:.1f} s"
        )
        static, seconds = _timed(proto, data, calib=ranges)
        _show("static, calibration reused", static, seconds, fp32_pass)
        print(f"static total with calibration: {seconds + calib_seconds:.1f} s")
        dynamic, seconds = _timed(model, data, mode="dynamic")
        _show("dynamic", dynamic, seconds, fp32_pass)
        if args.gain:
            report, seconds = _timed(proto, data, calib=ranges, gain=True)
            _show("static with gain, calibration reused", report, seconds, fp32_pass)
            by_gain = report.ranked_nodes(by="gain")[:5]
            print(f"  top-5 by gain: {', '.join(by_gain)}")
        if args.stability:
            _stability(proto, data, ranges, static)


if __name__ == "__main__":
    main()
