"""One module per CLI verb: its flags, and a ``run`` that calls the Python API.
``register(subparsers, common)`` adds the parser and sets ``run``; the API is imported
inside ``run``, so that ``onnxship --help`` loads no onnxruntime (0.09 s instead of 0.8 s)
and never torch."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from passes.options import add_arguments
from passes.settings import TARGET_HELP, Int8Settings

__all__ = ["add_command", "add_target_argument", "add_executor_args", "TARGET_HELP"]


def add_command(
    sub: argparse._SubParsersAction,
    common: argparse.ArgumentParser,
    name: str,
    help: str,
    epilog: str,
    run: Callable[[argparse.Namespace], int],
) -> argparse.ArgumentParser:
    """A subcommand parser with the global flags, the one-line help, examples kept as written."""
    parser = sub.add_parser(
        name,
        help=help,
        description=help,
        epilog=epilog,
        parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(run=run)
    return parser


def add_target_argument(group: argparse._ActionsContainer) -> None:
    """``--target``, as the int8 passes declare it (validated, with its aliases, by
    converter.core.machine when the command runs)."""
    add_arguments(group, Int8Settings, only=("target",))


def add_executor_args(parser: argparse.ArgumentParser, what: str, note: str = "") -> None:
    """``--executor`` and ``--ray-address``, the same for every verb that can scale out."""
    group = parser.add_argument_group("scale-out (pip install 'onnxship[ray]')", note or None)
    group.add_argument(
        "--executor",
        choices=("in-process", "ray"),
        default="in-process",
        help=f"where {what} run: here (default) or as Ray tasks; the results are identical",
    )
    group.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="an existing Ray cluster (the address `ray start --head` prints); "
        "default: start a local Ray with this machine's cores",
    )
