"""The `hyla` command. Each subcommand lives in the module that implements it; this file only
collects them, and turns errors in what the user gave (a config value, an input, a path: hyla
raises ValueError for those, on the driver or in a worker) into one line,
`hyla: error: <message>`, and exit code 2; other failures that end a command (training that
failed for good, a store that stopped answering) get one line and exit code 1; a job
stopped by SIGTERM or SIGINT says so in one line and exits with 143 or 130 (128 + the
signal). `--debug` (or HYLA_DEBUG=1) shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from hyla.jobs.stopping import Stopped

USAGE_ERROR = 2  # as argparse exits on a bad command line
FAILED = 1

# module -> function(subparsers) that adds its subcommands; each sets `func` (args -> exit code)
COMMAND_MODULES = (
    "hyla.jobs.demo",
    "hyla.jobs.params",
    "hyla.jobs.train",
    "hyla.jobs.data",
    "hyla.jobs.model_commands",
    "hyla.jobs.cluster",
    "hyla.jobs.plan",
    "hyla.jobs.bench",
)


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="hyla", description=__doc__)
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error (or HYLA_DEBUG=1)"
    )
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


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line; overrides may also follow options (`hyla resume RUN --storage X
    trainer.steps=9`), which argparse alone stops at."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and (not hasattr(args, "overrides") or any(a.startswith("-") for a in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    debug = args.debug or os.environ.get("HYLA_DEBUG", "") not in ("", "0")
    try:
        return int(args.func(args) or 0)
    except Stopped as e:  # SIGTERM or SIGINT: the job stopped cleanly (hyla.jobs.stopping)
        print(f"hyla: {e}", file=sys.stderr)
        return e.exit_code
    except (ValueError, RuntimeError, ConnectionError) as e:
        if debug:
            raise
        print(f"hyla: error: {e}", file=sys.stderr)
        return USAGE_ERROR if isinstance(e, ValueError) else FAILED


if __name__ == "__main__":
    sys.exit(main())
