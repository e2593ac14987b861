"""``onnxship quantize IN.onnx -o OUT.onnx --mode dynamic|static``"""

from __future__ import annotations

import argparse
from typing import Any

from converter.commands import add_command, add_target_argument
from converter.core import defaults

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

weights: int8, per output channel; 7 or 8 bits by --target (default host: this CPU).
x86 CPUs without VNNI (target avx2, also AVX-512F) add uint8 x int8 products in saturating
16-bit pairs, which full 8-bit weights overflow: 7-bit weights (reduce_range). With VNNI
(avx512-vnni) and on arm64 products accumulate in int32: full 8-bit weights, more faithful.
Measured on an AMD EPYC (AVX2): tiny encoder (dynamic) cosine to fp32 min 0.999 with 7-bit
weights vs 0.974 with 8-bit, same speed. --reduce-range/--no-reduce-range override the
target's choice. The target is recorded in the model (bench/validate warn on another CPU kind).
--per-tensor uses one scale per tensor.

Before quantizing, onnxruntime's quant_pre_process runs (symbolic shape inference +
optimization; falls back to ONNX shape inference, then to none, saying so). --exclude and
--exclude-op keep nodes in fp32; node names are those of the pre-processed model (it keeps
the names of the nodes it does not fuse). The report lists every quantizable node left in
fp32 and why. Check accuracy with `onnxship validate`; measured numbers (and the machine they
come from): tests/benchmarks/bench_quantize.py and the README's Benchmarks section.
"""


CALIB_METHODS = defaults.CALIB_METHODS
SCHEMES = defaults.QUANT_SCHEMES
FORMATS = defaults.QUANT_FORMATS
QUANT_TYPES = defaults.QUANT_TYPES
DEFAULT_CALIB_BATCH = defaults.DEFAULT_CALIB_BATCH


def add_weight_args(group: argparse._ActionsContainer, weight_type: str | None) -> None:
    """The weight flags `quantize` and `sensitivity` share: type, per-tensor, target, 7-bit.
    ``weight_type`` None leaves the pass's own default."""
    group.add_argument(
        "--weight-type", choices=QUANT_TYPES, default=weight_type, help="weight type (int8)"
    )
    group.add_argument(
        "--per-tensor",
        dest="per_channel",
        action="store_false",
        help="one scale per weight tensor instead of per output channel",
    )
    add_target_argument(group)
    group.add_argument(
        "--reduce-range",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="7-bit weights on/off, overriding the target's choice",
    )


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = add_command(sub, common, "quantize", HELP, EPILOG, run)
    p.add_argument("model", metavar="IN.onnx", help="the fp32 model to quantize")
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx", help="file to write")
    p.add_argument("--mode", required=True, choices=("dynamic", "static"))
    static = p.add_argument_group("static mode")
    static.add_argument("--calib", metavar="DATA", help="calibration data: .npz or folder")
    static.add_argument(
        "--calib-method",
        choices=CALIB_METHODS,
        help="how ranges are chosen (default minmax; mean_minmax with --scheme transformer)",
    )
    static.add_argument(
        "--calib-samples", type=int, metavar="N", help="use the first N samples (default all)"
    )
    static.add_argument(
        "--calib-batch-size",
        type=int,
        metavar="N",
        help=f"samples per calibration batch (default {DEFAULT_CALIB_BATCH})",
    )
    static.add_argument("--format", choices=FORMATS, help="graph format (default qdq)")
    static.add_argument(
        "--scheme",
        choices=SCHEMES,
        help="transformer: Q/DQ on MatMul/Gemm inputs only, mean_minmax ranges; default: every "
        "supported op; auto (the default): transformer when the model has MatMul, Softmax and "
        "a layer norm, else default",
    )
    static.add_argument(
        "--activation-type", choices=QUANT_TYPES, help="activation type (default uint8)"
    )
    static.add_argument(
        "--weight-rounding",
        choices=defaults.WEIGHT_ROUNDINGS,
        help="gptq: round weights to keep each MatMul's output on the calibration data, not "
        "each weight, closest (GPTQ; same graph and speed; default nearest)",
    )
    both = p.add_argument_group("both modes")
    add_weight_args(both, weight_type="int8")
    both.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="REGEX",
        help="keep nodes whose name matches in fp32 (repeatable)",
    )
    both.add_argument(
        "--exclude-op",
        action="append",
        default=[],
        metavar="TYPE",
        help="keep every node of this op type in fp32 (repeatable)",
    )
    both.add_argument(
        "--no-preprocess",
        dest="preprocess",
        action="store_false",
        help="skip quant_pre_process (shape inference + optimization)",
    )


_STATIC_ONLY = {
    "calib": "--calib",
    "calib_method": "--calib-method",
    "calib_samples": "--calib-samples",
    "calib_batch_size": "--calib-batch-size",
    "format": "--format",
    "scheme": "--scheme",
    "activation_type": "--activation-type",
    "weight_rounding": "--weight-rounding",
}


def build_pass(args: argparse.Namespace):
    """The quantization pass the arguments describe (settings validated here)."""
    from converter.core.errors import BadInputError
    from passes.quantize import DynamicQuantize, StaticQuantize

    common = dict(
        per_channel=args.per_channel,
        reduce_range=args.reduce_range,
        target=args.target,
        weight_type=args.weight_type,
        exclude=args.exclude,
        exclude_ops=args.exclude_op,
        preprocess=args.preprocess,
    )
    given = {dest: flag for dest, flag in _STATIC_ONLY.items() if getattr(args, dest) is not None}
    if args.mode == "dynamic":
        if given:
            raise BadInputError(
                f"{', '.join(given.values())} only appl{'y' if len(given) > 1 else 'ies'} to "
                "--mode static",
                "drop them, or use --mode static",
            )
        return DynamicQuantize(**common)
    if args.calib is None:
        raise BadInputError(
            "--mode static needs calibration data",
            "pass --calib DATA.npz (samples the model sees in use), or use --mode dynamic",
        )
    options = {d: getattr(args, d) for d in given if d != "calib"}
    return StaticQuantize(calibration=args.calib, progress=not args.quiet, **options, **common)


def run(args: argparse.Namespace) -> int:
    from passes.base import apply_to_file

    quantize = build_pass(args)
    results = apply_to_file([quantize], args.model, args.output, args.calib)
    if not args.quiet:
        print(summary(results[0].stats, quantize.settings(), args.model, args.output))
    return 0


def summary(stats: dict[str, Any], settings: dict[str, Any], source: Any, out: Any) -> str:
    """A short human-readable report of the quantization stats."""
    from converter.core.machine import target_line
    from passes.quant_report import describe_settings

    nodes = stats["nodes"]
    ops = ", ".join(f"{op} {c['quantized']}" for op, c in stats["by_op"].items() if c["quantized"])
    lines = [
        f"quantized {source} → {out} ({describe_settings(stats['mode'], settings, bits=False)})",
        f"  {target_line(stats['target'])}",
        f"  pre-processing: {stats['preprocess']}",
    ]
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
    lines.append(f"  int8: {len(nodes['quantized'])} nodes ({ops or 'none'})")
    lines.append(f"  fp32: {len(nodes['fp32'])} quantizable nodes")
    lines += _grouped(nodes["fp32"])
    before, after = stats["size_before"], stats["size_after"]
    lines.append(
        f"  size {before / 1e6:.2f} MB → {after / 1e6:.2f} MB ({100 * after / before:.0f}%)"
    )
    lines += [f"  warning: {w}" for w in stats.get("warnings", [])]
    return "\n".join(lines)


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
