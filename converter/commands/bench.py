"""``onnxship bench MODEL.onnx [MODEL2.onnx ...] [--threads 1,2,4] [--data DATA] ...``"""

from __future__ import annotations

import argparse

from converter.commands import add_command
from converter.core import defaults

HELP = "measure edge-style latency (batch 1, one thread) of one or more models, interleaved"
EPILOG = """\
examples:
  onnxship bench cnn.onnx cnn-int8.onnx --data test.npz
  onnxship bench enc.onnx enc-int8.onnx --dim seq=128 --threads 1,2,4 --seconds 20 \\
      --json bench.json --plot bench.png
  onnxship bench cnn.onnx cnn-int8.onnx --data test.npz --runs 1000 \\
      --min-speedup 1.1 --max-size-mb 1 --baseline main-bench.json --junit bench.xml

Edge defaults: batch 1, --threads 1 (intra-op; a list measures each count), inter-op 1,
sequential execution, all graph optimizations, CPU. Inputs are the first sample(s) of --data,
or generated from each model's input spec (seeded by --seed); symbolic dims other than the
leading batch dim need --dim NAME=SIZE.

How it measures: each model's session is created (timed: the cold start) and warmed up, then
the models run interleaved in one process — every round runs each model once (A B A B ...)
— so a change in the machine's speed hits all of them alike and the speedup against the
first model holds on a noisy machine. Each run is timed with perf_counter_ns around
session.run, inputs prepared beforehand, garbage collection paused.

Reported per model and thread count: p50, p90, p99, mean, std and min latency; throughput
(samples/s = batch / mean); speedup = p50 of the first model / p50 of this one; session
creation time; peak RSS; file size. MLPerf's SingleStream scenario (one query at a time, as
on an edge device) reports the 90th percentile latency: compare p90 with it.

Peak RSS: all models share one process, so each model's number is the peak resident memory
while its session was created and warmed up, minus the process's RSS just before — the memory
that model added at its peak (Linux: the kernel's high-water mark, reset per model; elsewhere
the RSS after warmup). It depends on the order of measurement: memory freed earlier in the
run (an earlier thread count's sessions, model loading) is reused without growing the RSS, so
later models and thread counts read lower. Compare models by it only in the same position;
for one model's own footprint, bench it alone at one thread count.

gates (exit 0 when all hold, 1 when any fails, 2 on bad input; like `onnxship validate`):
  --min-speedup X    every model after the first: p50 of the first / p50 of this one ≥ X,
                     measured interleaved in this run (at every --threads count)
  --max-p90-ms MS    every model: p90 latency ≤ MS (an absolute time: set it for the CPU CI
                     runs on)
  --max-size-mb MB   every model: file size with external data ≤ MB (10^6 bytes, as the table)
  --baseline J       compare speed RATIOS (never absolute times) with J, the --json of an
                     earlier run of the same models in the same order, same inputs and thread
                     counts: for every model after the first, baseline speedup / this speedup
                     ≤ --max-slowdown F (a factor, default 1.10: more than 10 % slower fails)
  A speed ratio still depends on the CPU kind (int8 gains far more with VNNI than with AVX2
  alone), so record the baseline on the CPU kind CI runs on. --json and --junit (one testcase
  per gate) are written atomically, also when a gate fails.
"""


def _thread_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list like 1,2,4") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: thread counts are whole numbers ≥ 1")
    return values


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < 1e6:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _limit(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number ≥ 0")
    return value


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = add_command(sub, common, "bench", HELP, EPILOG, run)
    p.add_argument("models", nargs="+", metavar="MODEL.onnx", help="the first is the baseline")
    p.add_argument(
        "--threads",
        type=_thread_list,
        default=[1],
        metavar="N[,N...]",
        help="intra-op thread counts to measure, e.g. 1,2,4 (default 1)",
    )
    p.add_argument("--inter-op", type=int, default=1, metavar="N", help="inter-op threads (1)")
    p.add_argument(
        "--no-optimize",
        dest="optimize",
        action="store_false",
        help="turn onnxruntime's graph optimizations off (default: all on)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=defaults.DEFAULT_WARMUP,
        metavar="N",
        help=f"untimed runs ({defaults.DEFAULT_WARMUP})",
    )
    how_long = p.add_mutually_exclusive_group()
    how_long.add_argument(
        "--runs", type=int, metavar="N", help=f"timed runs per model ({defaults.DEFAULT_RUNS})"
    )
    how_long.add_argument(
        "--seconds", type=_seconds, metavar="T", help="time all models together for T seconds"
    )
    p.add_argument("--data", metavar="DATA", help="take the inputs from the first sample(s)")
    p.add_argument(
        "--dim",
        action="append",
        default=[],
        metavar="NAME=SIZE",
        help="size of a symbolic dim for generated inputs, e.g. seq=128",
    )
    p.add_argument("--batch", type=int, metavar="N", help="batch size (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated inputs (0)")
    p.add_argument("--json", metavar="PATH", help="write every number as JSON")
    p.add_argument("--plot", metavar="PATH.png", help="plot the latency distributions")
    p.add_argument("--junit", metavar="PATH", help="write JUnit XML, one testcase per gate")
    g = p.add_argument_group("gates")
    g.add_argument("--min-speedup", type=_limit, metavar="X", help="speedup vs the first ≥ X")
    g.add_argument("--max-p90-ms", type=_limit, metavar="MS", help="p90 latency ≤ MS")
    g.add_argument("--max-size-mb", type=_limit, metavar="MB", help="file size ≤ MB")
    g.add_argument("--baseline", metavar="J.json", help="a bench --json report to compare with")
    g.add_argument(
        "--max-slowdown",
        type=_limit,
        metavar="F",
        help="baseline speedup / this speedup ≤ F (default 1.10)",
    )


def run(args: argparse.Namespace) -> int:
    from converter.check.bench import BenchGates, bench, check_plot_path, plot_latencies
    from converter.core.gates import check_report_paths, failure
    from converter.core.inputs import parse_dims
    from converter.core.onnxio import atomic_write_text, check_output_path

    inputs = (*args.models, args.data, args.baseline)
    check_report_paths(args.json, args.junit, *inputs)
    if args.plot:
        check_output_path(args.plot, *inputs, args.json, args.junit)
        check_plot_path(args.plot)
    gates = BenchGates(
        min_speedup=args.min_speedup,
        max_p90_ms=args.max_p90_ms,
        max_size_mb=args.max_size_mb,
        baseline=args.baseline,
        max_slowdown=args.max_slowdown,
    )
    report = bench(
        args.models,
        threads=args.threads,
        warmup=args.warmup,
        runs=args.runs,
        seconds=args.seconds,
        data=args.data,
        dims=parse_dims(args.dim),
        seed=args.seed,
        batch=args.batch,
        inter_op_threads=args.inter_op,
        optimize=args.optimize,
        progress=not args.quiet,
        gates=gates,
    )
    if not args.quiet:
        print(report.summary())
    if args.json:
        atomic_write_text(args.json, report.to_json())
    if args.junit:
        atomic_write_text(args.junit, report.to_junit())
    if args.plot:
        plot_latencies(report, args.plot)
    if not report.passed:
        fix = "a model is slower or bigger than the gates allow: see the table above"
        raise failure("bench gates", report.gates, fix, args.json)
    return 0
