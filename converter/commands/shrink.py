"""``onnxship shrink SPEC --input ... --data TRAIN.npz --keep 0.5 -o OUT.onnx``"""

from __future__ import annotations

import argparse

from converter.commands import add_command
from converter.commands.export import add_module_args

HELP = "structured pruning + distillation recovery: a smaller and faster model, exported"
EPILOG = """\
examples:
  onnxship shrink models/digits_cnn/model.py:trained --input x:batch,1,8,8:float32 \\
      --data train.npz --keep 0.5 -o cnn-small.onnx --json shrink.json --plot loss.png
  onnxship shrink enc.py:build --weights enc.pt --input input_ids:batch,seq:int64 \\
      --input attention_mask:batch,seq:int64 --data train.npz --keep 0.5 --ignore qkv \\
      -o enc-small.onnx
  torchrun --nproc-per-node 4 -m converter shrink net.py:build --input x:batch,3,224,224 \\
      --data train.npz --keep 0.5 -o net-small.onnx          # data-parallel (DDP, gloo)

Whole Conv channels and Linear neurons are removed with torch-pruning (DepGraph: layers
coupled through residual adds, concats and reshapes are pruned together), kept counts rounded
to multiples of --round-to; the layers producing the model's outputs (the classifier) stay
whole, and so does every layer whose name matches --ignore. The unpruned model then teaches
the pruned one (KL of temperature-softened outputs, plus cross-entropy with `labels` when
the data has them, weighted --alpha), with a held-out split for early stopping and the
report. The result is exported and verified against torch as `export` does.
"""


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from converter.core.defaults import DEFAULT_OPSET, EXPORTERS

    p = add_command(sub, common, "shrink", HELP, EPILOG, run)
    add_module_args(p)
    p.add_argument("--weights", help="state_dict checkpoint (.pt/.pth, or .safetensors)")
    p.add_argument(
        "--data",
        required=True,
        metavar="TRAIN.npz",
        help="training samples (arrays named after the inputs, optional labels)",
    )
    g = p.add_argument_group("pruning")
    g.add_argument("--keep", type=float, default=0.5, help="fraction of channels kept (0, 1]")
    g.add_argument("--importance", choices=("l1", "l2", "taylor"), default="l2")
    g.add_argument("--round-to", type=int, default=8, help="kept counts multiple of (default 8)")
    g.add_argument(
        "--ignore",
        action="append",
        default=[],
        metavar="REGEX",
        help="keep layers whose qualified name matches whole (repeatable)",
    )
    d = p.add_argument_group("distillation")
    d.add_argument("--temperature", type=float, default=4.0, help="softening T (default 4)")
    d.add_argument("--alpha", type=float, default=0.5, help="weight of the label loss (0.5)")
    d.add_argument("--epochs", type=int, default=10, help="passes over the data (default 10)")
    d.add_argument("--steps", type=int, help="exactly this many steps (overrides --epochs)")
    d.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (1e-3)")
    d.add_argument("--batch-size", type=int, default=64, help="global batch (default 64)")
    d.add_argument("--patience", type=int, default=3, help="held-out scores without gain")
    d.add_argument("--held-out", type=float, default=0.2, help="fraction held out (0.2)")
    d.add_argument("--seed", type=int, default=0)
    e = p.add_argument_group("export and report")
    e.add_argument("--exporter", choices=EXPORTERS, default="auto")
    e.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    e.add_argument("--bench-runs", type=int, default=200, help="latency runs (0 skips)")
    e.add_argument("--json", metavar="PATH", help="write every number as JSON")
    e.add_argument("--plot", metavar="PATH.png", help="plot the distillation loss curve")


def run(args: argparse.Namespace) -> int:
    from converter.check.bench import check_plot_path
    from converter.core.onnxio import check_output_path
    from converter.torch.shrink import ShrinkOptions, plot_loss, shrink, write_json

    for out in (args.json, args.plot):
        if out:
            check_output_path(out, args.output)
    if args.plot:
        check_plot_path(args.plot)
    prune, distill = _settings(args)
    options = ShrinkOptions(
        held_out=args.held_out,
        opset=args.opset,
        exporter=args.exporter,
        bench_runs=args.bench_runs,
        progress=not args.quiet,
    )
    _, report, _ = shrink(
        args.spec,
        args.output,
        args.input,
        args.data,
        weights=args.weights,
        prune=prune,
        distill=distill,
        options=options,
    )
    if report is None:  # a torchrun rank other than 0: rank 0 writes and reports
        return 0
    if args.json:
        write_json(report, args.json)
    if args.plot:
        plot_loss(report, args.plot)
    if not args.quiet:
        print(report.summary())
    return 0


def _settings(args: argparse.Namespace):
    from converter.torch.shrink import import_torch_side

    mods = import_torch_side()
    PruneSettings, DistillSettings = mods.structured.PruneSettings, mods.distill.DistillSettings

    prune = PruneSettings(
        keep=args.keep,
        importance=args.importance,
        round_to=args.round_to,
        ignore=tuple(args.ignore),
    )
    distill = DistillSettings(
        temperature=args.temperature,
        alpha=args.alpha,
        epochs=args.epochs,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        patience=args.patience,
        seed=args.seed,
    )
    return prune, distill
