"""`hyla demo`: run every chunk kernel once and check it against its token-by-token recurrence.

A quick look at what the kernels do on this machine. The checked prefix is short because the
reference recurrence is a Python loop over tokens. torch is imported when the command runs.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def _ops(b: int, t: int, h: int, d: int, device: torch.device) -> dict[str, tuple]:
    """name -> (chunk fn, recurrent fn, args) on random inputs of one shape."""
    import torch
    import torch.nn.functional as F

    from hyla.kernels import (
        chunk_gated_delta_rule,
        chunk_gla,
        chunk_linear_attn,
        recurrent_gated_delta_rule,
        recurrent_gla,
        recurrent_linear_attn,
    )

    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device)

    q, k, v = rand(b, t, h, d), rand(b, t, h, d), rand(b, t, h, d)
    k_unit = F.normalize(k, dim=-1)
    decay = torch.log1p(-(2.0 ** (-5.0 - torch.arange(h, dtype=torch.float32)))).to(device)
    gate = F.logsigmoid(rand(b, t, h) + 3.0)
    gk = F.logsigmoid(rand(b, t, h, d) + 3.0) / 8
    beta = torch.sigmoid(rand(b, t, h))
    return {
        "linear attention": (chunk_linear_attn, recurrent_linear_attn, (q, k, v)),
        "lightning (constant decay)": (chunk_linear_attn, recurrent_linear_attn, (q, k, v, decay)),
        "scalar gate": (chunk_linear_attn, recurrent_linear_attn, (q, k, v, gate)),
        "GLA": (chunk_gla, recurrent_gla, (q, k, v, gk)),
        "gated delta rule": (
            chunk_gated_delta_rule,
            recurrent_gated_delta_rule,
            (q, k_unit, v, beta, gate),
        ),
    }


def _prefix(args: tuple, n: int) -> tuple:
    return tuple(a[:, :n] if a.dim() >= 3 else a for a in args)


def _forward_backward(chunk: Callable, args: tuple) -> None:
    chunk(*args)[0].square().sum().backward()


def _timed(fn: Callable[[], object]) -> float:
    import torch

    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def run_demo(seq_len: int, heads: int, head_dim: int, check_len: int, device: str | None) -> bool:
    """Print a table of timings and errors; returns whether every op matched its reference.
    device: None for CUDA when there is a GPU, else the CPU."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from hyla.kernels.backend import resolve_backend

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    console = Console()
    table = Table(title=f"hyla kernels: B=1, T={seq_len}, H={heads}, K=V={head_dim} on {device}")
    for col in ("op", "backend", "forward ms", "fwd+bwd ms", f"max rel. error (T={check_len})"):
        table.add_column(col)
    all_ok = True
    for name, (chunk, recurrent, args) in _ops(1, seq_len, heads, head_dim, dev).items():
        leaves = tuple(a.detach().requires_grad_() for a in args)
        fwd = _timed(partial(chunk, *leaves))
        both = _timed(partial(_forward_backward, chunk, leaves))
        short = _prefix(args, check_len)
        got, _ = chunk(*short)
        want, _ = recurrent(*(a.double() for a in short))
        err = ((got.double() - want).abs().max() / want.abs().max()).item()
        all_ok &= err < 1e-3
        backend = resolve_backend(None, dev)
        table.add_row(name, backend, f"{fwd:.1f}", f"{both:.1f}", f"{err:.1e}")
    console.print(table)
    console.print("[green]all kernels match the recurrence[/]" if all_ok else "[red]MISMATCH[/]")
    return all_ok


def add_commands(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser("demo", help="run every kernel once and check it")
    demo.add_argument("--seq-len", type=int, default=4096)
    demo.add_argument("--heads", type=int, default=4)
    demo.add_argument("--head-dim", type=int, default=64)
    demo.add_argument(
        "--check-len", type=int, default=256, help="prefix checked against the recurrence"
    )
    demo.add_argument("--device", help="cuda or cpu (default: cuda when there is a GPU)")
    demo.set_defaults(
        func=lambda a: 0 if run_demo(a.seq_len, a.heads, a.head_dim, a.check_len, a.device) else 1
    )
