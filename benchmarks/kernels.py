"""Forward and forward+backward time of hyla's chunk kernels against causal softmax attention.

The number of tokens per step (B * T) is fixed, so every row does the same amount of linear
work and the softmax baseline shows its quadratic growth in T. On CPU the PyTorch chunkwise
path runs in fp32; on CUDA the Triton kernels run in bf16 (override with --dtype).

    .venv/bin/python benchmarks/kernels.py                 # CPU, a few minutes on 2 cores
    .venv/bin/python benchmarks/kernels.py --device cuda   # Triton on the GPU

Prints a table and writes JSON to benchmarks/results/kernels-<device>.json (--out) and a
log-log plot of time against T next to it (the same name, .png).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import Tensor

from hyla.kernels import chunk_gated_delta_rule, chunk_gla, chunk_linear_attn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Shape:
    batch: int
    seq_len: int
    heads: int
    head_k: int
    head_v: int


@dataclass
class Row:
    op: str
    seq_len: int
    batch: int
    fwd_ms: float | None = None
    fwd_bwd_ms: float | None = None
    skipped: str | None = None


# An op takes its inputs and returns the tensor whose gradient drives the backward pass.
Op = Callable[..., Tensor]


def _inputs(op: str, s: Shape, device: str, dtype: torch.dtype) -> list[Tensor]:
    """Random inputs in [B, T, H, D] layout; gates are log-sigmoids (<= 0, mostly slow decay)."""
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape: int) -> Tensor:
        return torch.randn(shape, generator=gen)

    q = rand(s.batch, s.seq_len, s.heads, s.head_k)
    k = rand(s.batch, s.seq_len, s.heads, s.head_k)
    v = rand(s.batch, s.seq_len, s.heads, s.head_v)
    gate = F.logsigmoid(rand(s.batch, s.seq_len, s.heads) + 4.0)
    if op == "gla":
        extra = [F.logsigmoid(rand(s.batch, s.seq_len, s.heads, s.head_k) + 4.0)]
    elif op == "gated_delta_rule":
        k = F.normalize(k, dim=-1)
        extra = [torch.sigmoid(rand(s.batch, s.seq_len, s.heads)), gate]
    elif op == "linear_attn (gate)":
        extra = [gate]
    else:
        extra = []
    # Gates and beta stay fp32 as the kernels expect; q, k, v take the benchmark dtype.
    return [x.to(device, dtype) for x in (q, k, v)] + [x.to(device) for x in extra]


def _ops(backend: str) -> dict[str, Op]:
    def sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        return out.transpose(1, 2)

    return {
        "linear_attn": lambda q, k, v: chunk_linear_attn(q, k, v, backend=backend)[0],
        "linear_attn (gate)": lambda q, k, v, g: chunk_linear_attn(q, k, v, g, backend=backend)[0],
        "gla": lambda q, k, v, gk: chunk_gla(q, k, v, gk, backend=backend)[0],
        "gated_delta_rule": lambda q, k, v, beta, g: chunk_gated_delta_rule(
            q, k, v, beta, g, backend=backend
        )[0],
        "sdpa (causal)": sdpa,
    }


def _median_ms(fn: Callable[[], object], device: str, warmup: int, repeats: int) -> float:
    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _measure(name: str, op: Op, s: Shape, args: argparse.Namespace) -> Row:
    row = Row(name, s.seq_len, s.batch)
    dtype = DTYPES[args.dtype]
    try:
        inputs = _inputs(name, s, args.device, dtype)
        with torch.no_grad():
            row.fwd_ms = _median_ms(lambda: op(*inputs), args.device, args.warmup, args.repeats)
        leaves = [x.detach().requires_grad_() for x in inputs]
        grad = torch.randn_like(inputs[2])  # every op returns o shaped like v

        def step() -> None:
            for x in leaves:
                x.grad = None
            op(*leaves).backward(grad)

        row.fwd_bwd_ms = _median_ms(step, args.device, args.warmup, args.repeats)
    except Exception as err:  # an op that is not ready yet is reported, not fatal
        row.fwd_ms = row.fwd_bwd_ms = None
        row.skipped = f"{type(err).__name__}: {err}".splitlines()[0][:200]
    return row


def _table(rows: list[Row], args: argparse.Namespace) -> Table:
    lens = sorted({r.seq_len for r in rows})
    title = (
        f"{args.device}, {args.dtype}, B*T={args.tokens}, H={args.heads}, "
        f"K={args.head_k}, V={args.head_v}: median ms (fwd / fwd+bwd)"
    )
    table = Table(title=title)
    table.add_column("op")
    for t in lens:
        table.add_column(f"T={t}", justify="right")
    for name in dict.fromkeys(r.op for r in rows):
        cells = []
        for t in lens:
            r = next(r for r in rows if r.op == name and r.seq_len == t)
            cells.append("skipped" if r.skipped else f"{r.fwd_ms:.1f} / {r.fwd_bwd_ms:.1f}")
        table.add_row(name, *cells)
    return table


LINEAR_OPS = ("linear_attn", "linear_attn (gate)", "gla", "gated_delta_rule")


def plot(rows: list[dict], tokens: int, path: Path) -> None:
    """Forward and forward+backward time against T, log-log: the linear mixers against
    causal softmax attention (dashed). B * T is fixed, so linear work stays flat."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    names = list(dict.fromkeys(r["op"] for r in rows))
    for ax, key, title in zip(
        axes, ("fwd_ms", "fwd_bwd_ms"), ("forward", "forward + backward"), strict=True
    ):
        for color, name in enumerate(names):
            pts = [r for r in rows if r["op"] == name and r[key] is not None]
            style = "-" if name in LINEAR_OPS else "--"
            xs, ys = [r["seq_len"] for r in pts], [r[key] for r in pts]
            ax.loglog(xs, ys, style, marker="o", color=f"C{color}", label=name)
        ax.set(xlabel="sequence length T", title=f"{title}, B*T = {tokens}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("median time (ms)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default=None,
        help="default: cuda when available, else cpu",
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu"
    )
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--tokens", type=int, default=32768, help="B * T, fixed for every T")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-k", type=int, default=64)
    parser.add_argument("--head-v", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ops", nargs="+", default=None, help="subset of the op names")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    backend = "triton" if args.device == "cuda" else "torch"
    ops = _ops(backend)
    names = args.ops or list(ops)
    unknown = set(names) - set(ops)
    if unknown:
        parser.error(f"unknown ops {sorted(unknown)}; choose from {list(ops)}")

    console = Console()
    rows = []
    for t in args.seq_lens:
        shape = Shape(max(1, args.tokens // t), t, args.heads, args.head_k, args.head_v)
        for name in names:
            row = _measure(name, ops[name], shape, args)
            if row.skipped:
                console.print(f"[yellow]skipped {name} at T={t}: {row.skipped}")
            else:
                console.print(f"{name} T={t}: {row.fwd_ms:.1f} / {row.fwd_bwd_ms:.1f} ms")
            rows.append(row)
    console.print(_table(rows, args))

    out = args.out or RESULTS / f"kernels-{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config["backend"] = backend
    config["torch"] = torch.__version__
    config["date"] = date.today().isoformat()
    config["machine"] = platform.processor() or platform.machine()
    config["cpus"] = os.cpu_count()
    if args.device == "cuda":
        config["gpu"] = torch.cuda.get_device_name()
    results = [asdict(r) for r in rows]
    out.write_text(json.dumps({"config": config, "results": results}, indent=2))
    plot(results, args.tokens, out.with_suffix(".png"))
    console.print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
