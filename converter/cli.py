"""The command line: a thin layer over the Python API.

Exit codes: 0 ok, 1 a gate failed (validation, verification, budget), 2 bad input, 3 an
internal error (a bug: an exception onnxship did not expect). Errors print one line
``error: <what> — <how to fix>``; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence

from converter.commands import (
    auto,
    bench,
    export,
    fp16,
    pack,
    prune,
    quantize,
    run,
    sensitivity,
    shrink,
    validate,
)
from converter.core import __version__
from converter.core.errors import OnnxshipError, first_line
from converter.core.machine import resolve_target

__all__ = ["main", "build_parser", "INTERNAL_ERROR"]

INTERNAL_ERROR = 3

# Explicit list, in the order `--help` shows them. Each module has register() and run().
COMMANDS = [export, shrink, prune, quantize, fp16, pack, validate, bench, sensitivity, run, auto]


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in our one-line format with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"error: {message} — see `{self.prog} --help`\n")
        raise SystemExit(2)


def _global_flags(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument(
        "--debug", action="store_true", default=default, help="show tracebacks and debug logs"
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", default=default, help="only print errors"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="onnxship",
        description="PyTorch → ONNX export, graph passes, validation and edge benchmarks.",
    )
    _global_flags(parser, False)
    # Accepted after the command too; SUPPRESS keeps a flag given before it from being reset.
    common = argparse.ArgumentParser(add_help=False)
    _global_flags(common, argparse.SUPPRESS)
    parser.add_argument("--version", action="version", version=f"onnxship {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for command in COMMANDS:
        command.register(sub, common)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of the log call (not at set-up)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_logging(debug: bool, quiet: bool) -> None:
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    for name in ("converter", "passes"):
        log = logging.getLogger(name)
        log.handlers[:] = [handler]
        log.setLevel(level)
        log.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _setup_logging(args.debug, args.quiet)
    try:
        if getattr(args, "target", None) is not None:  # resolved once, here: exit 2 if unknown
            args.target = resolve_target(args.target).name  # a name: settings stay JSON
        return int(args.run(args) or 0)
    except OnnxshipError as e:
        if args.debug:
            traceback.print_exc()
        sys.stderr.write(f"error: {e.message}\n")
        return e.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted — run the command again\n")
        return 130
    except Exception as e:  # a bug, not a verdict on the model: CI must not read it as 1
        if args.debug:
            traceback.print_exc()
        sys.stderr.write(
            f"error: internal error: {first_line(e)} — rerun with --debug and report it\n"
        )
        return INTERNAL_ERROR
