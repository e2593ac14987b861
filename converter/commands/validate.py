"""``onnxship validate CANDIDATE.onnx --data DATA [--reference REF.onnx] [gates] [reports]``"""

from __future__ import annotations

import argparse

from converter.commands import add_command, add_executor_args
from converter.core import defaults

HELP = "score a model on data (labels and/or a reference model) and gate it for CI"
EPILOG = """\
examples:
  onnxship validate cnn-int8.onnx --data test.npz --reference cnn.onnx \\
      --min-score 0.95 --max-drop 0.01 --junit validate.xml --json validate.json
  onnxship validate enc-int8.onnx --data val/ --reference enc.onnx --metric cosine \\
      --min-worst 0.98
  onnxship validate cnn-int8.onnx --data test.npz --reference cnn.onnx \\
      --baseline main-validate.json --json validate.json

metrics (--metric, repeatable; default accuracy when the data has `labels`, else cosine):
  accuracy   argmax of the output vs `labels` in the data
  agreement  argmax agreement with the reference model
  cosine     per-sample cosine of the output to the reference's (mean; worst and its sample)
  max-abs    largest absolute difference to the reference (an error: lower is better)
  mean-abs   mean absolute difference to the reference (an error: lower is better)
  All but accuracy need --reference. Every metric is computed for every output.

gates (exit 0 when all hold, 1 when any fails, 2 on bad input):
  --min-score F   the first --metric's value ≥ F (a score: accuracy, agreement or cosine)
  --max-drop F    reference accuracy − candidate accuracy ≤ F (absolute); without labels, or
                  when agreement comes before accuracy in --metric: 1 − agreement ≤ F
  --min-worst F   the lowest per-sample cosine to the reference ≥ F
  --baseline J    every score also in J (a --json report of an earlier run on the same data)
                  may be at most --baseline-tolerance lower: "this commit made it worse"
  Gates read the first output of the model, or the one --output names.

batch: samples run at once. A model with dynamic int8 (DynamicQuantizeLinear, MatMulInteger,
ConvInteger) takes each run's activation range from the samples in that run, so its scores
depend on the batch: it is scored at batch 1, as deployed and as bench times it, unless
--batch-size says otherwise. Other models run 64 at a time (same numbers, faster). Every
report records the batch, threads and samples.

DATA is an .npz file or a folder of .npz shards: arrays named after the model inputs,
samples on the first axis, and optionally `labels` (one integer class per sample). Names,
shapes and dtypes are checked before anything runs. --json and --junit are written (also when
a gate fails) atomically; JUnit has one testcase per gate, so CI systems show them natively.
"""


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = add_command(sub, common, "validate", HELP, EPILOG, run)
    p.add_argument("candidate", metavar="CANDIDATE.onnx", help="the model to validate")
    p.add_argument("--data", required=True, metavar="DATA", help=".npz file or folder of shards")
    p.add_argument("--reference", metavar="REF.onnx", help="the model to compare with")
    p.add_argument(
        "--metric",
        action="append",
        dest="metrics",
        choices=defaults.METRICS,
        help="repeatable; the first is the one --min-score reads",
    )
    p.add_argument("--min-score", type=_fraction, metavar="F", help="first metric ≥ F")
    p.add_argument("--max-drop", type=_fraction, metavar="F", help="accuracy drop ≤ F")
    p.add_argument("--min-worst", type=_fraction, metavar="F", help="worst-sample cosine ≥ F")
    p.add_argument("--baseline", metavar="J.json", help="a --json report to compare with")
    p.add_argument(
        "--baseline-tolerance",
        type=_fraction,
        metavar="F",
        help="how much lower than the baseline a score may be (absolute, default "
        f"{defaults.DEFAULT_BASELINE_TOLERANCE})",
    )
    p.add_argument("--output", metavar="NAME", help="the model output the gates read")
    p.add_argument(
        "--batch-size",
        type=int,
        metavar="N",
        help=f"samples per run (default {defaults.DEFAULT_VALIDATE_BATCH}; 1 for a model with "
        "dynamic int8, whose outputs depend on the batch: it is scored as deployed)",
    )
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="onnxruntime threads (default 1: the same numbers on every run; int8 results can "
        "still differ between instruction sets, e.g. AVX2 vs AVX-512 VNNI vs ARM, so record a "
        "--baseline on the CPU kind CI runs on)",
    )
    p.add_argument("--json", metavar="PATH", help="write every number as JSON")
    p.add_argument("--junit", metavar="PATH", help="write JUnit XML, one testcase per gate")
    add_executor_args(
        p,
        "the data's shards are scored",
        "With --executor ray each .npz shard of DATA is one Ray task (a worker that dies has "
        "its\nshard run again); the shards' results are merged in shard order, so the report "
        "is the\nsame as in-process. On a cluster, DATA must be at the same path on every node.",
    )


def run(args: argparse.Namespace) -> int:
    from converter.core.executor import make_executor
    from converter.core.gates import check_report_paths, failure
    from converter.core.onnxio import atomic_write_text

    check_report_paths(
        args.json, args.junit, args.candidate, args.data, args.reference, args.baseline
    )
    reports = [(path, kind) for path, kind in ((args.json, "json"), (args.junit, "junit")) if path]
    options = {
        "baseline_tolerance": args.baseline_tolerance,
        "batch_size": args.batch_size,
        "threads": args.threads,
    }
    with make_executor(args.executor, args.ray_address) as executor:
        report = _validate(args, executor, options)
    if not args.quiet:
        print(report.summary())
    for path, kind in reports:
        atomic_write_text(path, report.to_json() if kind == "json" else report.to_junit())
    if not report.passed:
        raise failure(
            "validation",
            report.gates,
            "the model got worse than the gates allow: see the table above",
            args.json,
        )
    return 0


def _validate(args: argparse.Namespace, executor, options: dict):
    """The validation the flags describe, run by ``executor``."""
    from converter.check.validate import validate

    return validate(
        args.candidate,
        args.data,
        reference=args.reference,
        metrics=args.metrics,
        min_score=args.min_score,
        max_drop=args.max_drop,
        min_worst=args.min_worst,
        baseline=args.baseline,
        output=args.output,
        progress=not args.quiet,
        executor=executor,
        **{k: v for k, v in options.items() if v is not None},
    )
