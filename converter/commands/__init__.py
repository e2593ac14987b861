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
