"""``onnxship sensitivity MODEL.onnx --data DATA [--mode static|dynamic] [--calib DATA] ...``"""

from __future__ import annotations

import argparse

from converter.commands import add_command, add_executor_args
from converter.commands.quantize import add_weight_args
from converter.core import defaults
from passes.options import add_arguments, from_args, option_named
from passes.settings import Int8Settings, StaticQuantizeSettings

HELP = "rank the nodes by the fidelity lost when each alone is quantized to int8"
EPILOG = """\
examples:
  onnxship sensitivity cnn.onnx --data test.npz --calib calib.npz --top 10
  onnxship sensitivity enc.onnx --data test.npz --mode dynamic --gain --json sens.json

For every quantizable node, the fp32 model with only that node's inputs and weights quantized
(int8, as `onnxship quantize` with the same settings quantizes them) runs on the first
--samples samples of --data and is compared with the fp32 model: loss = 1 − mean per-sample
cosine of the output (the first, or --output), and the lowest per-sample cosine. --gain also
measures each node kept in fp32 while all the others are quantized: gain = loss of the fully
quantized model − loss of that model, i.e. what `onnxship quantize --exclude NAME` recovers
(one more quantization and run per node).

Static mode calibrates once, on --calib if given, else on --data (ranges then fit the scored
samples: optimistic numbers, but the ranking is what matters), and quantizes once; each
node's variant copies that node's Q/DQ nodes into the fp32 model. Node names are those of the
pre-processed model (the names --exclude matches). Ops onnxruntime only passes int8 data
through (Reshape, Transpose, MaxPool, ...) are not scored. Time grows with nodes × samples:
a 6-layer BERT-style encoder (hidden 256, 64 tokens, 64 scoring samples) took 1.2-1.5 s per
node in static mode (64 nodes: 75-98 s, after 10.5-12.6 s of calibration) and 1.3-1.4 s in
dynamic mode (39 nodes: 52-55 s) on one thread of an AMD EPYC (AVX2, no VNNI), onnxruntime
1.32.0 (tests/benchmarks/bench_sensitivity.py); --gain adds one quantization per node;
--samples 32 halves the scoring part.

Then the per-tensor error of the fully quantized model: the SQNR (dB) and cosine of every
tensor it quantizes (activations, weights; in dynamic mode also the replaced nodes'
outputs) against the pre-processed fp32 model, on the first 8 samples of --data — the
numbers of onnxruntime's qdq_loss_debug. "SQNR" is the tensor's int8 round trip alone,
"propagated" the int8 model's value, which carries every error upstream. The
--tensor-errors worst are printed (lowest SQNR first); --json has all.
"""


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = add_command(sub, common, "sensitivity", HELP, EPILOG, run)
    p.add_argument("model", metavar="MODEL.onnx", help="the fp32 model")
    p.add_argument("--data", required=True, metavar="DATA", help="scoring samples: .npz or folder")
    p.add_argument(
        "--mode", choices=("static", "dynamic"), default="static", help="int8 mode (static)"
    )
    p.add_argument(
        "--samples",
        type=int,
        default=defaults.DEFAULT_SENSITIVITY_SAMPLES,
        metavar="N",
        help=f"score on the first N samples ({defaults.DEFAULT_SENSITIVITY_SAMPLES})",
    )
    p.add_argument("--gain", action="store_true", help="also measure each node kept in fp32")
    p.add_argument("--output", metavar="NAME", help="the output to compare (default: the first)")
    p.add_argument("--top", type=int, default=20, metavar="K", help="rows shown (20; 0 = all)")
    p.add_argument(
        "--tensor-errors",
        type=int,
        default=defaults.NODE_ERROR_ROWS,
        metavar="K",
        help=f"worst tensors shown ({defaults.NODE_ERROR_ROWS}; 0 = not measured)",
    )
    p.add_argument("--json", metavar="PATH", help="write every node's numbers as JSON")
    p.add_argument("--threads", type=int, default=1, metavar="N", help="intra-op threads (1)")
    add_executor_args(
        p,
        "the nodes are scored",
        "With --executor ray each node's variants are built and scored in one Ray task; the "
        "ranking\nand every number are the same as in-process.",
    )
    static = p.add_argument_group("static mode")
    static.add_argument("--calib", metavar="DATA", help="calibration data (default: --data)")
    add_arguments(static, StaticQuantizeSettings, only=_STATIC, unset=_STATIC)
    both = p.add_argument_group("both modes")
    add_weight_args(both, weight_type=None)
    add_arguments(both, Int8Settings, only=("preprocess",), unset=("preprocess",))


# The quantization settings sensitivity takes as flags: static mode only, then both modes.
_STATIC = ("calib_method", "calib_samples", "activation_type", "scheme")
_SETTINGS = (*_STATIC, "weight_type", "reduce_range", "preprocess", "target")


def _quant_settings(args: argparse.Namespace) -> dict:
    """The quantization settings given on the command line (the passes' defaults otherwise)."""
    from converter.core.errors import BadInputError

    static = {"calib": "--calib"} | {
        n: option_named(StaticQuantizeSettings, n).flag for n in _STATIC
    }
    given = [flag for dest, flag in static.items() if getattr(args, dest) is not None]
    if args.mode == "dynamic" and given:
        raise BadInputError(
            f"{', '.join(given)}: for --mode static only", "drop them, or use --mode static"
        )
    return from_args(StaticQuantizeSettings, args, only=_SETTINGS)


def run(args: argparse.Namespace) -> int:
    from converter.core.errors import BadInputError
    from converter.core.executor import make_executor
    from converter.core.onnxio import atomic_write_text, check_output_path

    settings = _quant_settings(args)
    if args.top < 0:
        raise BadInputError(f"--top {args.top} is negative", "give K ≥ 1, or 0 for all rows")
    if args.tensor_errors < 0:
        raise BadInputError(
            f"--tensor-errors {args.tensor_errors} is negative",
            "give K ≥ 1 rows, or 0 to skip the per-tensor error",
        )
    if args.json:
        check_output_path(args.json, args.model, args.data, args.calib)
    with make_executor(args.executor, args.ray_address) as executor:
        report = _sensitivity(args, settings, executor)
    if not args.quiet:
        print(report.summary(top=args.top or None, errors=args.tensor_errors))
    if args.json:
        atomic_write_text(args.json, report.to_json())
    return 0


def _sensitivity(args: argparse.Namespace, settings: dict, executor):
    """The sensitivity run the flags describe, its nodes scored by ``executor``."""
    from converter.check.sensitivity import sensitivity

    return sensitivity(
        args.model,
        args.data,
        mode=args.mode,
        calib=args.calib,
        samples=args.samples,
        per_channel=args.per_channel,
        output=args.output,
        gain=args.gain,
        quant_settings=settings,
        threads=args.threads,
        progress=not args.quiet,
        executor=executor,
        tensor_errors=defaults.NODE_ERROR_SAMPLES if args.tensor_errors else 0,
    )
