"""``onnxship pack IN.onnx -o OUT.onnx`` and ``onnxship unpack IN.onnx -o OUT.onnx``"""

from __future__ import annotations

import argparse
from typing import Any

from converter.commands import add_command
from passes.options import add_arguments, from_args
from passes.settings import PackSettings

HELP = "store sparse weights as a bit mask + nonzero values (smaller file, same outputs)"
UNPACK_HELP = "restore the dense weights of a packed model, byte for byte"
EPILOG = """\
examples:
  onnxship prune cnn.onnx -o cnn-sparse.onnx --sparsity 0.5
  onnxship pack cnn-sparse.onnx -o cnn-packed.onnx
  onnxship pack cnn-packed.onnx -o cnn-dense.onnx --undo     (same as `onnxship unpack`)

Each constant weight (fp32, fp16, int8, uint8 — including the int8 weights of QDQ models)
whose zeros save bytes is stored as a 1-bit mask (8 per byte) plus its nonzero values, and
rebuilt by a few standard ONNX ops (Gather, CumSum, Mul, GatherElements, Reshape, Concat)
whose inputs are all constants: onnxruntime folds them once when the session is created, then
runs the same kernels on the same weights (outputs bit-identical, int8 QDQ fusions kept).
A model with nothing worth packing is written unchanged (exit 0), as is an already packed
one. Measured (ResNet-18 shape, AMD EPYC AVX2, onnxruntime 1.32): see README, `pack`.
"""


def _common(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("model", metavar="IN.onnx", help=what)
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx", help="file to write")


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = add_command(sub, common, "pack", HELP, EPILOG, run)
    _common(p, "the model to pack (typically pruned, then quantized)")
    p.add_argument("--undo", action="store_true", help="unpack instead: restore the dense weights")
    add_arguments(p, PackSettings)
    u = add_command(sub, common, "unpack", UNPACK_HELP, "", run_unpack)
    _common(u, "a model written by `onnxship pack`")


def run(args: argparse.Namespace) -> int:
    from passes.base import apply_to_file
    from passes.pack import Pack, Unpack

    step = Unpack() if args.undo else Pack(**from_args(PackSettings, args))
    results = apply_to_file([step], args.model, args.output)
    if not args.quiet:
        print(summary(results[0].stats, args.model, args.output))
    return 0


def run_unpack(args: argparse.Namespace) -> int:
    args.undo = True
    return run(args)


def summary(stats: dict[str, Any], source: Any, out: Any) -> str:
    """What was packed (largest savings first) and the file size before and after."""
    from converter.core.render import mb  # here: --help loads no onnx
    from passes.normalize import describe

    before, after = stats["bytes_before"], stats["bytes_after"]
    lines = [f"{source} → {out}: {stats['summary']}"]
    packed = sorted(
        (t for t in stats.get("tensors", []) if t["packed"]),
        key=lambda t: t["bytes_after"] - t["bytes_before"],
    )
    for t in packed[:10]:
        lines.append(
            f"  {t['name']}: {t['dtype']} {t['shape']}, {100 * t['zeros']:.1f}% zeros, "
            f"{t['bytes_before']:,} → {t['bytes_after']:,} bytes"
        )
    if len(packed) > 10:
        lines.append(f"  ... and {len(packed) - 10} more")
    lines.append(f"  size {mb(before)} → {mb(after)} ({before / after:.2f}x)")
    lines += [f"  input: {line}" for line in describe(stats.get("normalized"))]
    return "\n".join(lines)
