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
    params = commands.add_parser("params", help="print each model preset's parameter count")
    params.add_argument("presets", nargs="*", help="preset names (default: all)")
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
    if args.command == "params":
        _print_params(args.presets)
        return 0
    raise AssertionError(args.command)


def _print_params(names: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    from hyla.models.presets import count_parameters, load_preset, preset_names

    table = Table(title="hyla model presets (configs/model/)")
    for col in ("preset", "layers", "d_model", "heads", "vocab", "parameters"):
        table.add_column(col)
    for name in names or preset_names():
        cfg = load_preset(name)
        n = count_parameters(cfg)
        table.add_row(
            name,
            "".join(cfg.pattern),
            str(cfg.d_model),
            str(cfg.n_heads),
            str(cfg.vocab_size),
            f"{n:,} ({n / 1e6:.1f}M)",
        )
    Console(width=120).print(table)


if __name__ == "__main__":
    sys.exit(main())
