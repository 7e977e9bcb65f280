"""`hyla params`: each model preset's parameter count (counted on the meta device)."""

from __future__ import annotations

import argparse


def add_commands(commands: argparse._SubParsersAction) -> None:
    params = commands.add_parser("params", help="print each model preset's parameter count")
    params.add_argument("presets", nargs="*", help="preset names (default: all)")
    params.set_defaults(func=lambda args: print_params(args.presets))


def print_params(names: list[str]) -> int:
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
    return 0
