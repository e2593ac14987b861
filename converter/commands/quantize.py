"""``onnxship quantize IN.onnx -o OUT.onnx --mode dynamic|static``"""

from __future__ import annotations

import argparse
from typing import Any

from converter.commands import add_command
from passes.options import (
    add_arguments,
    from_args,
    has_calibration,
    needs_calibration,
    option_named,
    options_of,
)
from passes.settings import Int8Settings, StaticQuantizeSettings

HELP = "int8 quantization with onnxruntime: dynamic, or static with calibration data"
EPILOG = """\
examples:
  onnxship quantize enc.onnx -o enc-int8.onnx --mode dynamic
  onnxship quantize cnn.onnx -o cnn-int8.onnx --mode static --calib calib.npz
  onnxship quantize cnn.onnx -o cnn-int8.onnx --mode static --calib shards/ \\
      --calib-method percentile --calib-samples 1000 --exclude-op Gemm

dynamic: int8 weights, activations quantized at run time. For MatMul-heavy models
(transformers, MLPs); no data needed. Quantizes MatMul/Gemm with constant weights, Gather
(embeddings), Attention, LSTM and Conv -- with a warning when Conv dominates: dynamic int8
convolutions run ~3.5x slower than fp32 here (ResNet-18), use static for CNNs.

--scheme transformer (static, for transformer encoders, chosen by the default --scheme auto
when the model has MatMul, Softmax and a layer norm): Q/DQ only on the inputs of
MatMul/Gemm; residual Add, Softmax, LayerNorm, GELU and the attention mask stay float;
ranges = mean over samples of each sample's min/max (--calib-method mean_minmax, NNCF's
estimator). Measured on all-MiniLM-L6-v2: see the README section "Transformer int8".
--weight-rounding gptq (static): GPTQ rounds the int8 weights so each MatMul's output on the
calibration data stays close, not each weight; same graph, same speed.

static: int8 weights and activations, activation ranges measured on --calib DATA (.npz with
arrays named after the model inputs, or a folder of .npz shards; streamed one batch at a
time, so memory does not grow with the sample count; checked for NaN/Inf). For CNNs. QDQ
format and uint8 activations by default: int8 activations ran at 1.13x fp32 speed on a
ResNet-18 and 0.72x on a BERT-style encoder, uint8 at 1.90x and 1.49x (AMD EPYC, AVX2, no VNNI).
Default scheme ranges: --calib-method mse (per tensor, the range with the smallest int8
error, from two streamed passes over the data), then --bias-correction (each Conv/Gemm bias
shifted, in graph order, so its mean output on the first 64 samples matches fp32); same
graph and speed. Pretrained MobileNetV2: mean cosine 0.936 (minmax) -> 0.976; README "CNN int8".

weights: int8, per output channel; 7 or 8 bits by --target (default host: this CPU).
x86 CPUs without VNNI (target avx2, also AVX-512F) add uint8 x int8 products in saturating
16-bit pairs, which full 8-bit weights overflow: 7-bit weights (reduce_range). With VNNI
(avx512-vnni) and on arm64 products accumulate in int32: full 8-bit weights, more faithful.
Measured on an AMD EPYC (AVX2): tiny encoder (dynamic) cosine to fp32 min 0.999 with 7-bit
weights vs 0.974 with 8-bit, same speed. --reduce-range/--no-reduce-range override the
target's choice. The target is recorded in the model (bench/validate warn on another CPU kind).
--per-tensor uses one scale per tensor.

Models from other exporters: weights held in Constant nodes become initializers, and an
older opset is upgraded with onnx.version_converter (per-channel QDQ needs 13, the rest 11),
on a copy; the summary says so. When the converter cannot, exit 2 says how to upgrade by hand.

Before quantizing, the model is pre-processed: static mode runs onnxruntime's
quant_pre_process (symbolic shape inference + optimization; falls back to ONNX shape
inference, then to none, saying so); dynamic mode, which needs no activation shapes, only
onnxruntime's basic optimization, from memory. --exclude and
--exclude-op keep nodes in fp32; node names are those of the pre-processed model (it keeps
the names of the nodes it does not fuse). The report lists every quantizable node left in
fp32 and why. Check accuracy with `onnxship validate`; measured numbers (and the machine they
come from): tests/benchmarks/bench_quantize.py and the README's Benchmarks section.
"""


# The static-only options: StaticQuantize's own (its flags default to None, so that a
# dynamic run can refuse them).
STATIC_ONLY = tuple(
    o.name
    for o in options_of(StaticQuantizeSettings)
    if o.cli and o.name not in {i.name for i in options_of(Int8Settings)}
)
WEIGHT_SETTINGS = ("weight_type", "per_channel", "target", "reduce_range")


def add_weight_args(group: argparse._ActionsContainer, weight_type: str | None) -> None:
    """The weight flags `quantize` and `sensitivity` share: type, per-tensor, target, 7-bit.
    ``weight_type`` None leaves the pass's own default."""
    unset = () if weight_type is not None else ("weight_type",)
    add_arguments(group, Int8Settings, only=WEIGHT_SETTINGS, unset=unset)


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = add_command(sub, common, "quantize", HELP, EPILOG, run)
    p.add_argument("model", metavar="IN.onnx", help="the fp32 model to quantize")
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx", help="file to write")
    p.add_argument("--mode", required=True, choices=("dynamic", "static"))
    static = p.add_argument_group("static mode")
    add_arguments(static, StaticQuantizeSettings, only=STATIC_ONLY, unset=STATIC_ONLY)
    add_arguments(p.add_argument_group("both modes"), Int8Settings)


def build_pass(args: argparse.Namespace):
    """The quantization pass the arguments describe (settings validated by the pass)."""
    from converter.core.errors import BadInputError
    from passes.quantize import DynamicQuantize, StaticQuantize

    given = [
        option_named(StaticQuantizeSettings, name).flag
        for name in STATIC_ONLY
        if getattr(args, name) is not None
    ]
    if args.mode == "dynamic":
        if given:
            raise BadInputError(
                f"{', '.join(given)} only appl{'y' if len(given) > 1 else 'ies'} to --mode static",
                "drop them, or use --mode static",
            )
        return DynamicQuantize(**from_args(Int8Settings, args))
    settings = from_args(StaticQuantizeSettings, args)
    if needs_calibration(StaticQuantizeSettings) and not has_calibration(
        StaticQuantizeSettings, settings
    ):
        raise BadInputError(
            "--mode static needs calibration data",
            "pass --calib DATA.npz (samples the model sees in use), or use --mode dynamic",
        )
    return StaticQuantize(progress=not args.quiet, **settings)


def run(args: argparse.Namespace) -> int:
    from passes.base import apply_to_file

    quantize = build_pass(args)
    _check_calibration(args)
    results = apply_to_file([quantize], args.model, args.output, args.calibration)
    if not args.quiet:
        print(summary(results[0].stats, quantize.settings(), args.model, args.output))
        print(f"  {_int8_share(args.output, args.calibration)}")
        for line in _kernel_truth(args):
            print(f"  {line}")
    return 0


def _int8_share(path: str, calibration: str | None) -> str:
    """The share of the written model's multiply-adds that run in int8 (issue #20: a
    "quantized" model can run almost all of them in fp32), counted at the calibration
    samples' size where the model's input dims are symbolic."""
    from converter.core.data import Dataset
    from converter.core.onnxio import load_model
    from passes.int8_share import int8_share

    shapes = Dataset(calibration).sample_shapes() if calibration else None
    return int8_share(load_model(path), shapes).line()


def _kernel_truth(args: argparse.Namespace) -> list[str]:
    """A static QDQ model run both ways (Q/DQ semantics vs the integer kernels that ship) on
    the first few calibration samples, against the float model (issue #20: they can part)."""
    from converter.check.kernel_truth import kernel_truth, reference_outputs
    from converter.core import defaults
    from converter.core.data import model_input_specs, open_data
    from converter.core.onnxio import load_model

    if args.mode != "static" or args.format not in (None, "qdq") or args.calibration is None:
        return []  # (format None: the declared default, QDQ)
    specs = model_input_specs(load_model(args.model))
    data = open_data(args.calibration, specs)
    limit = min(defaults.KERNEL_TRUTH_SAMPLES, data.num_samples)
    feeds = list(data.batches(specs, 1, limit=limit))
    truth = kernel_truth(args.output, feeds, reference_outputs(args.model, feeds))
    return truth.lines()


def _check_calibration(args: argparse.Namespace) -> None:
    """Before any work: the calibration data opens, and holds the --calib-samples asked for.
    Fewer samples is exit 2, not a silent (or merely warned) clamp: the flag asks for N
    samples, and ranges from fewer are another quantization; leaving it out uses all."""
    from converter.core.data import Dataset
    from converter.core.errors import BadInputError

    if args.mode != "static" or args.calibration is None:
        return
    data = Dataset(args.calibration)
    if args.calib_samples is not None and args.calib_samples > data.num_samples:
        raise BadInputError(
            f"--calib-samples {args.calib_samples}, but the calibration data "
            f"{args.calibration} holds {data.num_samples} samples",
            f"pass --calib-samples {data.num_samples} or fewer (or leave it out to use all "
            f"{data.num_samples}), or give more samples",
        )


def summary(stats: dict[str, Any], settings: dict[str, Any], source: Any, out: Any) -> str:
    """A short human-readable report of the quantization stats."""
    from converter.core.machine import target_line
    from converter.core.render import mb  # here: --help loads no onnx
    from passes.normalize import describe
    from passes.quant_report import describe_scales, describe_settings

    nodes = stats["nodes"]
    ops = ", ".join(f"{op} {c['quantized']}" for op, c in stats["by_op"].items() if c["quantized"])
    lines = [
        f"quantized {source} → {out} ({describe_settings(stats['mode'], settings, bits=False)})",
        f"  {target_line(stats['target'])}",
        f"  pre-processing: {stats['preprocess']}",
    ]
    lines += [f"  input: {line}" for line in describe(stats.get("normalized"))]
    if "calibration" in stats:
        c = stats["calibration"]
        lines.append(
            f"  calibration: {c['method']} on {c['samples']} samples, {c['tensors']} tensors"
        )
    rounding = stats.get("weight_rounding", {})
    if rounding.get("method") == "gptq":
        lines.append(
            f"  weight rounding: GPTQ on {rounding['weights']} weights, output error on the "
            f"calibration data {rounding.get('proxy_error_ratio', 1.0):.2f}x nearest rounding's"
        )
    stem = stats.get("stem_rounding", {})
    if stem.get("convs"):
        lines.append(
            f"  stem rounding: GPTQ on {stem['convs']} Conv(s) reading the input, output error "
            f"on {stem['samples']} calibration samples {stem['proxy_error_ratio']:.2f}x nearest "
            "rounding's"
        )
    corrected = stats.get("bias_correction", {})
    if corrected.get("layers"):
        lines.append(
            f"  bias correction: {corrected['layers']} Conv/Gemm biases on "
            f"{corrected['samples']} samples (mean output shift corrected: "
            f"{corrected['mean_shift']:.2g} of the mean output)"
        )
    lines.append(f"  int8: {len(nodes['quantized'])} nodes ({ops or 'none'})")
    if "weight_scales" in stats:  # what onnxruntime did (dynamic Conv: per tensor, always)
        scales = describe_scales(stats["weight_scales"])
        lines.append(f"  weight scales, read off the quantized model: {scales}")
    lines.append(f"  fp32: {len(nodes['fp32'])} quantizable nodes")
    lines += _grouped(nodes["fp32"])
    before, after = stats["size_before"], stats["size_after"]
    lines.append(f"  size {mb(before)} → {mb(after)} ({100 * after / before:.0f}%)")
    return "\n".join(lines)  # the pass logged its warnings (stderr) as they arose


def _grouped(fp32: dict[str, str], shown: int = 4) -> list[str]:
    """One line per reason, naming the first few nodes."""
    by_reason: dict[str, list[str]] = {}
    for name, reason in fp32.items():
        by_reason.setdefault(reason, []).append(name)
    lines = []
    for reason, names in by_reason.items():
        more = f" and {len(names) - shown} more" if len(names) > shown else ""
        lines.append(f"    {reason}: {', '.join(names[:shown])}{more}")
    return lines
