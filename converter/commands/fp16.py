"""``onnxship fp16 IN.onnx -o OUT.onnx``"""

from __future__ import annotations

import argparse
from typing import Any

from converter.commands import add_command
from passes.options import add_arguments, from_args
from passes.settings import Float16Settings

HELP = "convert a model to mixed-precision float16 (for GPU/NPU targets)"
EPILOG = """\
examples:
  onnxship fp16 model.onnx -o model-fp16.onnx
  onnxship fp16 model.onnx -o model-fp16.onnx --fp16-io --block-op Softmax

Weights and compute become float16 with onnxconverter-common; ops on the block list stay fp32
behind Cast nodes: onnxconverter-common's default list (Resize, Range, TopK, NonMaxSuppression,
...) plus Pow, ReduceSumSquare and ReduceL2, whose squared activations overflow fp16. Inputs
and outputs stay float32 by default (--keep-io-types), so the same data feeds both models.

On a CPU fp16 saves size (weights halve), not time: on x86 onnxruntime has few fp16 kernels
and runs most fp16 ops by casting to fp32 and back. Measured here (batch 1, one thread): a
ResNet-18 0.95x and the tiny encoder 0.87x the speed of fp32, at 0.50x and 0.62x the size.
Use fp16 for GPUs and NPUs; for CPU speed use `onnxship quantize`.
"""


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = add_command(sub, common, "fp16", HELP, EPILOG, run)
    p.add_argument("model", metavar="IN.onnx", help="the fp32 model to convert")
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx", help="file to write")
    add_arguments(p, Float16Settings)


def run(args: argparse.Namespace) -> int:
    from passes.base import apply_to_file
    from passes.fp16 import Float16

    convert = Float16(**from_args(Float16Settings, args))
    results = apply_to_file([convert], args.model, args.output)
    if not args.quiet:
        print(summary(results[0].stats, args.model, args.output))
    return 0


def summary(stats: dict[str, Any], source: Any, out: Any) -> str:
    """A short human-readable report of the fp16 stats."""
    from converter.core.render import mb  # here: --help loads no onnx
    from passes.normalize import describe

    io = "float32" if stats["keep_io_types"] else "float16"
    before, after = stats["size_before"], stats["size_after"]
    lines = [
        f"converted {source} → {out} to fp16 ({io} inputs/outputs)",
        f"  {stats['nodes_converted']} nodes converted, {len(stats['kept_fp32'])} kept fp32, "
        f"{stats['casts_added']} Cast nodes added",
    ]
    lines += [f"    {name}: {reason}" for name, reason in list(stats["kept_fp32"].items())[:8]]
    if len(stats["kept_fp32"]) > 8:
        lines.append(f"    ... and {len(stats['kept_fp32']) - 8} more")
    if stats["clamped_values"]:
        lines.append(f"  values clamped to the fp16 range: {', '.join(stats['clamped_values'])}")
    lines.append(f"  size {mb(before)} → {mb(after)} ({100 * after / before:.0f}%)")
    lines.append("  note: on CPU fp16 saves size, not time; it is meant for GPU/NPU targets")
    lines += [f"  input: {line}" for line in describe(stats.get("normalized"))]
    return "\n".join(lines)
