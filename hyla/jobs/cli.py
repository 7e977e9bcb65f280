"""The `hyla` command."""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hyla", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run every kernel once and check it")
    demo.add_argument("--seq-len", type=int, default=4096)
    demo.add_argument("--heads", type=int, default=4)
    demo.add_argument("--head-dim", type=int, default=64)
    demo.add_argument(
        "--check-len", type=int, default=256, help="prefix checked against the recurrence"
    )
    demo.add_argument("--device", default="cuda" if _cuda() else "cpu")
    return parser


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from hyla.jobs.demo import run_demo

        ok = run_demo(args.seq_len, args.heads, args.head_dim, args.check_len, args.device)
        return 0 if ok else 1
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
