"""The command line: a thin layer over the Python API.

Exit codes: 0 ok, 1 a gate failed (validation, verification, budget), 2 bad input, 3 the
environment (disk full, permissions, out of memory) or an internal error (a bug: an exception
onnxship did not expect), 128 + N a signal (130 SIGINT, 143 SIGTERM). Errors print one line
``error: <what> — <how to fix>``; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import signal
import sys
import threading
import traceback
from collections.abc import Iterator, Sequence

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
from converter.core.errors import InternalError, Interrupted, OnnxshipError, first_line
from converter.core.machine import resolve_target

__all__ = ["main", "build_parser", "INTERNAL_ERROR", "ENVIRONMENT"]

INTERNAL_ERROR = 3  # a bug
ENVIRONMENT = 3  # the disk, permissions, memory

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
    with _signals_interrupt():
        try:
            if getattr(args, "target", None) is not None:  # resolved once, here: exit 2
                args.target = resolve_target(args.target).name  # a name: settings stay JSON
            return int(args.run(args) or 0)
        except (OnnxshipError, KeyboardInterrupt, OSError, MemoryError) as e:
            if args.debug:
                traceback.print_exc()
            code, message = _outcome(e)
        except Exception as e:  # a bug, not a verdict on the model: CI must not read it as 1
            if args.debug:
                traceback.print_exc()
            code, message = INTERNAL_ERROR, InternalError(first_line(e)).message
    sys.stderr.write(f"error: {message}\n")
    return code


# errno of the environment's faults: full disk or quota, permissions, a read-only or missing
# file system, too many open files.
_ENVIRONMENT_FIX = {
    errno.ENOSPC: "free disk space (or point TMPDIR and -o at a larger disk)",
    errno.EDQUOT: "free disk space within your quota",
    errno.EACCES: "check the permissions of that path",
    errno.EPERM: "check the permissions of that path",
    errno.EROFS: "write to a writable file system",
    errno.EMFILE: "raise the open-file limit (ulimit -n)",
}


def _outcome(e: BaseException) -> tuple[int, str]:
    """Exit code and one-line message for an expected failure: ours (its own code), a
    signal (128 + its number), the environment (3)."""
    if isinstance(e, OnnxshipError):
        return e.exit_code, e.message
    if isinstance(e, Interrupted):
        return 128 + e.signum, f"interrupted by {e.name} — nothing was written; run it again"
    if isinstance(e, KeyboardInterrupt):
        return 128 + signal.SIGINT, "interrupted — nothing was written; run the command again"
    if isinstance(e, MemoryError):
        return ENVIRONMENT, "out of memory — use a smaller --batch-size or fewer samples"
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    fix = _ENVIRONMENT_FIX.get(e.errno, "check the path and the machine, or rerun with --debug")
    return ENVIRONMENT, f"{e.strerror or first_line(e)}{where} — {fix}"


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM (CI runners, ``timeout``) and SIGINT raise :class:`Interrupted` where the
    process is, so every ``with`` block unwinds and removes its temporaries. The earlier
    handlers come back afterwards; outside the main thread nothing is changed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise Interrupted(signum, signal.Signals(signum).name)

    before = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
