"""One module per CLI verb: ``register(subparsers, common)`` adds the parser and sets
``run``; heavy imports happen inside ``run`` so ``--help`` stays fast and torch-free."""

from __future__ import annotations

import argparse
from collections.abc import Callable


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


TARGET_HELP = (
    "CPU kind the int8 model is for: host (default, read from this CPU's flags), avx2 (x86 "
    "without VNNI, incl. AVX-512F: 7-bit weights), avx512-vnni (AVX512-VNNI or AVX-VNNI: full "
    "8-bit weights), arm64 (full 8-bit weights)"
)


def add_target_argument(group: argparse._ActionsContainer) -> None:
    """``--target``, validated (with its aliases) by converter.targets when the command runs."""
    group.add_argument("--target", default="host", metavar="TARGET", help=TARGET_HELP)
