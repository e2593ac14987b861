"""``onnxship auto MODEL.onnx --data DATA --metric M --min-score F -o OUTDIR``"""

from __future__ import annotations

import argparse

from converter.commands import add_command, add_executor_args, add_target_argument
from converter.core import defaults

HELP = "search int8/pruning configurations for the fastest model within an accuracy budget"
EPILOG = """\
examples:
  onnxship auto cnn.onnx --data val.npz --calib calib.npz --metric accuracy --max-drop 0.01 \\
      -o build/auto
  onnxship validate build/auto/model.onnx --data test.npz --reference cnn.onnx \\
      --metric accuracy --max-drop 0.01
  onnxship auto enc.onnx --data val-sentences.npz --metric cosine --min-score 0.995 \\
      --min-worst 0.99 -o build/auto-enc

Search on a validation split (--data) and keep the test split for `validate` afterwards:
auto picks the candidate that scores best on --data, so its score there is optimistic.

Tries dynamic int8 (per-channel, per-tensor), static QDQ int8 (U8/S8 activations,
per-channel/per-tensor weights, minmax/mse/percentile/entropy calibration), then, when no
full-int8 configuration meets the budget, keeps sensitive nodes in fp32 one at a time (most
fidelity per fp32 multiply-add first, from the fastest well-scored configuration; each step
kept only if the shipped kernels score it no lower), and pruning levels with
--sparsity-grid. Every candidate is scored on the scoring data (with 64 samples or more,
on 32 evenly spaced ones first: one they prove misses the budget is scored further only
if a decision reads its score; the report marks such rows); those meeting the budget
are benched interleaved with fp32, and the fastest one is written to
OUTDIR/model.onnx with report.md/.html (Pareto plot, every candidate) and manifest.json.
Without --calib, every 4th sample of --data (at most 256) calibrates and the rest is scored.
Candidates are cached in OUTDIR/cache by content hash: a re-run is fast.
With --time-budget, no new candidate starts once that many seconds have passed since the
start (the one in progress finishes; cached ones are still read); the report lists the
candidates not tried. A candidate (or a search stage) that fails is listed in the report
as failed, with its reason; the search goes on. Exit 1 when no candidate meets the budget:
the closest is named and written to OUTDIR/model.onnx all the same, marked NOT within
budget. Exit 2 on bad input, checked before anything is written: OUTDIR is left as it was.
"""


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from e


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = add_command(sub, common, "auto", HELP, EPILOG, run)
    p.add_argument("model", metavar="MODEL.onnx", help="the fp32 model")
    p.add_argument("--data", required=True, help="scoring data (.npz or folder of shards)")
    p.add_argument("--metric", default="accuracy", choices=defaults.SCORES)
    p.add_argument("--min-score", type=float, help="the metric's mean must reach this")
    p.add_argument(
        "--max-drop", type=float, help="at most this much below the fp32 model's score (absolute)"
    )
    p.add_argument("--min-worst", type=float, help="worst-sample cosine to fp32 must reach this")
    p.add_argument("--calib", help="calibration data (default: a split of --data)")
    p.add_argument(
        "--allow-overlap",
        action="store_true",
        help="let --calib share samples with --data (refused by default: a score on "
        "calibration samples is optimistic; the report names it)",
    )
    p.add_argument(
        "--sparsity-grid",
        type=_floats,
        default=[],
        metavar="S,S,...",
        help="also try pruning to these sparsities, e.g. 0.3,0.5",
    )
    p.add_argument(
        "--max-excluded",
        type=int,
        default=defaults.AUTO_MAX_EXCLUDED,
        help="most nodes kept in fp32 by the sensitivity search (default 8)",
    )
    p.add_argument(
        "--bench-runs",
        type=int,
        default=defaults.AUTO_BENCH_RUNS,
        help=f"timed runs per candidate ({defaults.AUTO_BENCH_RUNS})",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=defaults.AUTO_TIME_BUDGET,
        metavar="SECONDS",
        help="start no new candidate after this much wall time (default: no limit)",
    )
    add_target_argument(p)
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR")
    add_executor_args(
        p,
        "the candidates are built and scored",
        "With --executor ray each candidate is built, scored and cached in a Ray task (the "
        "sensitivity\nranking too); the candidates and the chosen model are the same as "
        "in-process. The bench\nstays local: latency is measured on this machine, the "
        "finalists interleaved with fp32 in\none process, because a speedup describes the "
        "machine it was measured on (the report says\nso). On a cluster, OUTDIR and the data "
        "must be on a file system every node sees.",
    )


def run(args: argparse.Namespace) -> int:
    from converter.core.executor import make_executor
    from converter.search.auto import check_result

    with make_executor(args.executor, args.ray_address) as executor:
        result = _auto(args, executor)
    if not args.quiet:
        print(result.report_md.read_text(encoding="utf-8"))
        print(f"report: {result.report_md}\nmanifest: {result.manifest}")
    check_result(result)
    return 0


def _auto(args: argparse.Namespace, executor):
    """The search the flags describe, its candidates built and scored by ``executor``."""
    from converter.search.auto import auto

    return auto(
        args.model,
        args.data,
        args.output,
        metric=args.metric,
        min_score=args.min_score,
        max_drop=args.max_drop,
        min_worst=args.min_worst,
        calib=args.calib,
        allow_overlap=args.allow_overlap,
        sparsity_grid=args.sparsity_grid,
        max_excluded=args.max_excluded,
        bench_runs=args.bench_runs,
        target=args.target,
        executor=executor,
        time_budget=args.time_budget,
    )
