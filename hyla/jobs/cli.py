"""The `hyla` command. Each subcommand lives in the module that implements it; this file only
collects them."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

# module -> function(subparsers) that adds its subcommands; each sets `func` (args -> exit code)
COMMAND_MODULES = (
    "hyla.jobs.demo",
    "hyla.jobs.params",
    "hyla.jobs.train",
    "hyla.jobs.cluster",
    "hyla.jobs.plan",
    "hyla.jobs.bench",
)


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="hyla", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        add: Callable[[argparse._SubParsersAction], None] = importlib.import_module(
            name
        ).add_commands
        add(commands)
    return parser


def command_names() -> list[str]:
    """Every `hyla` subcommand (infra tests check that entrypoints name real ones)."""
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(action.choices)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
