"""``onnxship export SPEC -o OUT.onnx --input NAME:DIMS:DTYPE ...``"""

from __future__ import annotations

import argparse

from converter.commands import add_command

HELP = "export a PyTorch model to ONNX and verify it against torch"
EPILOG = """\
examples:
  onnxship export models/digits_cnn/model.py:trained -o cnn.onnx --input x:batch,1,8,8:float32
  onnxship export net.py:build --weights net.pt -o net.onnx --input x:batch,3,224,224
  onnxship export enc.py:build -o enc.onnx \\
      --input input_ids:batch,seq:int64 --input attention_mask:batch,seq:int64 --dim seq=16

SPEC is path/to/file.py:callable; the callable takes no arguments and returns an nn.Module.
Symbolic dims (batch, seq, ...) become dynamic axes of those names; the traced example gives
each a size from --dim (default 2: torch.export specialises sizes 0 and 1). The export is
verified in onnxruntime against torch on the example, the example negated, new random values,
and an input with other sizes on every dynamic axis; any mismatch is exit 1 and writes
nothing. When dynamo fails and the TorchScript tracer has to freeze a data-dependent Python
value (`if x.sum() > 0:`), the graph holds only the path the example took: exit 1 naming
your line, unless --accept-traced-branches. Output names come from a returned dict's keys or
namedtuple's fields (else output, output_0, ...); --output-name (repeatable) overrides them.
"""


def add_module_args(p: argparse.ArgumentParser) -> None:
    """SPEC, -o and --input: how `export` and `shrink` are told which module to load."""
    p.add_argument("spec", metavar="SPEC", help="path/to/file.py:callable returning an nn.Module")
    p.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    p.add_argument(
        "--input",
        action="append",
        required=True,
        metavar="NAME:DIMS:DTYPE",
        help="one per forward() argument, in order; DTYPE one of float32 float16 int64 int32 "
        "bool (default float32)",
    )


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from converter.core.defaults import DEFAULT_OPSET, EXPORT_ATOL, EXPORT_RTOL, EXPORTERS

    p = add_command(sub, common, "export", HELP, EPILOG, run)
    add_module_args(p)
    p.add_argument(
        "--dim",
        action="append",
        default=[],
        metavar="NAME=SIZE",
        help="size of a symbolic dim in the traced example (default 2)",
    )
    p.add_argument("--weights", help="state_dict checkpoint (.pt/.pth, or .safetensors)")
    p.add_argument(
        "--example",
        metavar="DATA.npz",
        help="trace and verify with real samples (arrays named after the inputs)",
    )
    p.add_argument(
        "--output-name",
        action="append",
        dest="output_names",
        metavar="NAME",
        help="names of the outputs, in order (default output / output_0, ...)",
    )
    p.add_argument(
        "--exporter",
        choices=EXPORTERS,
        default="auto",
        help="auto = dynamo, falling back to torchscript when dynamo fails",
    )
    p.add_argument(
        "--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})"
    )
    p.add_argument(
        "--atol",
        type=float,
        default=EXPORT_ATOL,
        help=f"absolute tolerance (default {EXPORT_ATOL:g})",
    )
    p.add_argument(
        "--rtol",
        type=float,
        default=EXPORT_RTOL,
        help=f"relative tolerance (default {EXPORT_RTOL:g})",
    )
    p.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip the comparison with torch (not recommended)",
    )
    p.add_argument(
        "--accept-traced-branches",
        action="store_true",
        help="write the model even though the TorchScript tracer froze a data-dependent "
        "branch or value (the graph then holds only the path the example took)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the generated inputs")


def run(args: argparse.Namespace) -> int:
    from converter.core.errors import VerificationFailed
    from converter.core.inputs import parse_dims
    from converter.torch.export import export

    try:
        result = export(
            args.spec,
            args.output,
            args.input,
            weights=args.weights,
            example=args.example,
            dims=parse_dims(args.dim),
            output_names=args.output_names,
            exporter=args.exporter,
            opset=args.opset,
            atol=args.atol,
            rtol=args.rtol,
            verify=args.verify,
            seed=args.seed,
            accept_traced_branches=args.accept_traced_branches,
        )
    except VerificationFailed as e:
        if not args.quiet and e.report is not None:
            print(e.report.summary())
        raise
    if not args.quiet:
        print(result.report.summary())
    return 0
