"""`hyla plan`: per-rank memory of a training config on N GPUs, and its longest context.

    hyla plan model=linear-llama3-1b trainer.precision=bf16 data.seq_len=2097152 --gpus 128
    hyla plan trainer.precision=bf16 data.batch_size=1 --gpus 8 16 32 64 128 \\
        --presets linear-llama3-1b gla-1.3b --markdown docs/plan-tables.md

--gpus sets the world: parallel.sp = gpus / parallel.dp (dp from the overrides, default 1).
One preset at one GPU count prints the breakdown (without and with activation
checkpointing); several print, per preset and GPU count, the longest trainable context.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hyla.models.config import ModelConfig
    from hyla.platform.config import JobConfig

GIB = 2**30
UNITS = {
    **{"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12},
    **{"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40},
    **{"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40},
}


def add_commands(commands: argparse._SubParsersAction) -> None:
    plan = commands.add_parser(
        "plan",
        help="predict per-rank training memory and the longest context that fits",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    plan.add_argument("overrides", nargs="*", help="config overrides, e.g. model=gdn-1.3b")
    plan.add_argument("--gpus", type=int, nargs="+", required=True, help="world size(s)")
    plan.add_argument("--gpu-mem", default="80GB", help="memory per GPU (80GB, 80GiB, ...)")
    plan.add_argument(
        "--headroom",
        type=float,
        default=0.1,
        help="fraction of --gpu-mem kept free for CUDA context, NCCL and fragmentation",
    )
    plan.add_argument("--presets", nargs="+", help="model presets to compare (default: model=)")
    plan.add_argument("--markdown", type=Path, help="also write the summary table here")
    plan.set_defaults(func=run_plan)


def parse_bytes(text: str) -> int:
    """--gpu-mem sizes: "80GB" -> 80e9, "80GiB" / "80G" -> 80 * 2**30, "1024" -> 1024 bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in UNITS or float(match.group(1)) <= 0:
        raise ValueError(
            f"--gpu-mem must be a positive size such as 80GB, 80GiB or 81920MiB, got {text!r}"
        )
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


def _sp(gpus: int, dp: int) -> int:
    if gpus < 1 or gpus % dp:
        raise ValueError(f"--gpus must be a positive multiple of parallel.dp = {dp}, got {gpus}")
    return gpus // dp


def _gib(n: int) -> str:
    return f"{n / GIB:,.1f}"


def _tokens(t: int) -> str:
    return f"{t / 1024:,.0f}K" if t >= 1024 else str(t)


def run_plan(args: argparse.Namespace) -> int:
    from hyla.platform.config import compose

    memory = parse_bytes(args.gpu_mem)
    if not 0 <= args.headroom < 1:
        raise ValueError(f"--headroom must be in [0, 1), got {args.headroom!r}")
    cfg = compose(args.overrides)
    names = args.presets or [cfg.model.name]
    if len(names) == 1 and len(args.gpus) == 1 and args.markdown is None:
        return _breakdown(cfg, args.gpus[0], memory, args.headroom)
    return _summary(cfg, names, args, memory)


def _with_checkpointing(model: ModelConfig, on: bool) -> ModelConfig:
    return dataclasses.replace(model, activation_checkpointing=on)


def _auto_layout(model: ModelConfig, cfg: JobConfig) -> str:
    """The layout parallel.sp_layout=auto gives this model under the job's method."""
    from hyla.platform.config import resolve_layout

    return resolve_layout("auto", cfg.parallel.sp_method, model.pattern, sp=2)


def _breakdown(cfg: JobConfig, gpus: int, memory: int, headroom: float) -> int:
    from rich.console import Console
    from rich.table import Table

    from hyla.platform.memory_plan import MemoryPlan, longest_context, plan_memory

    sp = _sp(gpus, cfg.parallel.dp)
    common: dict[str, Any] = dict(
        batch_size=cfg.data.batch_size,
        sp=sp,
        precision=cfg.trainer.precision,
        layout=cfg.parallel.sp_layout,
    )
    models = [_with_checkpointing(cfg.model, on) for on in (False, True)]
    plans = [plan_memory(m, seq_len=cfg.data.seq_len, **common) for m in models]
    longest = [longest_context(m, memory=memory, headroom=headroom, **common) for m in models]
    title = (
        f"{cfg.model.name}: T = {cfg.data.seq_len:,} tokens x batch {cfg.data.batch_size}, "
        f"{gpus} GPUs (dp {cfg.parallel.dp} x sp {sp}), {cfg.trainer.precision}; GiB per rank"
    )
    table = Table(title=title)
    for col in ("term", "no checkpointing", "activation checkpointing"):
        table.add_column(col, justify="right" if col != "term" else "left")
    for name in (*MemoryPlan.TERMS, "total"):
        table.add_row(name, *(_gib(p.breakdown()[name]) for p in plans))
    budget = f"fits {_gib(int(memory * (1 - headroom)))} GiB"
    table.add_row(f"longest T that {budget}", *(f"{t:,} ({_tokens(t)})" for t in longest))
    Console(width=120).print(table)
    return 0


def _summary(cfg: JobConfig, names: list[str], args: argparse.Namespace, memory: int) -> int:
    from rich.console import Console
    from rich.table import Table

    from hyla.models.presets import load_preset
    from hyla.platform.memory_plan import longest_context

    rows = []
    for name in names:
        model = load_preset(name) if args.presets else cfg.model
        for gpus in args.gpus:
            common = dict(
                memory=memory,
                headroom=args.headroom,
                batch_size=cfg.data.batch_size,
                sp=_sp(gpus, cfg.parallel.dp),
                precision=cfg.trainer.precision,
                layout=_auto_layout(model, cfg) if args.presets else cfg.parallel.sp_layout,
            )
            t_off, t_on = (
                longest_context(_with_checkpointing(model, on), **common) for on in (False, True)
            )
            rows.append((name, str(gpus), _tokens(t_off), _tokens(t_on)))
    title = (
        f"longest trainable context, {args.gpu_mem} per GPU ({args.headroom:.0%} kept free), "
        f"{cfg.trainer.precision}, batch {cfg.data.batch_size} per dp rank, dp "
        f"{cfg.parallel.dp}, sp = GPUs / dp"
    )
    header = ("preset", "GPUs", "no checkpointing", "activation checkpointing")
    table = Table(title=title)
    for col in header:
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    Console(width=120).print(table)
    if args.markdown is not None:
        command = " ".join(["hyla plan", *args.overrides, "--gpus", *map(str, args.gpus)])
        command += f" --gpu-mem {args.gpu_mem} --presets {' '.join(names)}"
        lines = [
            f"### {title}",
            "",
            f"`{command}` ({date.today().isoformat()})",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows),
            "",
        ]
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text("\n".join(lines))
    return 0
