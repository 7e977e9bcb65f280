"""Forward and forward+backward time of hyla's chunk kernels against causal softmax attention.

The number of tokens per step (B * T) is fixed, so every row does the same amount of linear
work and the softmax baseline shows its quadratic growth in T. On CPU the PyTorch chunkwise
path runs in fp32; on CUDA the Triton kernels run in bf16 (override with --dtype). Softmax
attention runs twice: hyla's `flash_attention` and torch's SDPA.

Each row also reports its achieved FLOP/s (the FLOPs of the algorithm, see `flops`,
divided by the median time) and that as a fraction of a 2048 x 2048 matmul in the same
dtype, timed on the same device right before the row (so a loaded machine slows both).

    .venv/bin/python benchmarks/kernels.py                 # CPU, a few minutes on 2 cores
    .venv/bin/python benchmarks/kernels.py --quick         # linear attention, T = 8192 only
    .venv/bin/python benchmarks/kernels.py --device cuda   # Triton on the GPU, T = 2K..64K

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
from hyla.kernels.attention import flash_attention
from hyla.kernels.chunking import CHUNK, num_chunks

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
    fwd_gflop: float | None = None  # the FLOPs counted by `flops`, in units of 1e9
    fwd_bwd_gflop: float | None = None
    matmul_gflops: float | None = None  # the reference matmul's rate, measured beside the row
    fwd_gflops: float | None = None  # achieved rates: GFLOP / s
    fwd_bwd_gflops: float | None = None
    fwd_of_matmul: float | None = None  # achieved rate / matmul rate
    fwd_bwd_of_matmul: float | None = None
    skipped: str | None = None


# An op takes its inputs and returns the tensor whose gradient drives the backward pass.
Op = Callable[..., Tensor]


# FLOP counts. Each counts the multiply-adds of the chunkwise algorithm hyla runs, 2 FLOPs
# each (2 m n k per [m, k] x [k, n] matmul), per chunk of C = 64 tokens and head, times
# B * H * ceil(T / C) chunks; elementwise work (gates, masks, exp, scaling) is not counted.
# A full C x C matmul counts in full even where a causal mask zeroes half of it. Backward
# counts the one recompute of the forward quantities it needs plus the gradient matmuls.


def _mm(m: int, n: int, k: int) -> int:
    return 2 * m * n * k


def linear_attn_flops(kd: int, vd: int) -> tuple[int, int]:
    """(forward, backward) FLOPs per chunk and head of linear attention, any gate.

    Forward: scores Q K^T, scores V, the state update K^T V, the inter-chunk output Q S.
    Backward: recompute K^T V (states) and Q K^T (scores); Q^T dO (state gradients);
    dO V^T, dO S^T, dscores K, V dS^T, dscores^T Q, K dS, scores^T dO.
    """
    c = CHUNK
    fwd = _mm(c, c, kd) + _mm(c, vd, c) + _mm(kd, vd, c) + _mm(c, vd, kd)
    bwd = (
        _mm(kd, vd, c) + _mm(c, c, kd) + _mm(kd, vd, c)  # recompute, Q^T dO
        + _mm(c, c, vd) + _mm(c, kd, vd) + _mm(c, kd, c) + _mm(c, kd, vd)  # dq, dk parts
        + _mm(c, kd, c) + _mm(c, vd, kd) + _mm(c, vd, c)  # dk, dv
    )  # fmt: skip
    return fwd, bwd


def gla_flops(kd: int, vd: int) -> tuple[int, int]:
    """(forward, backward) FLOPs per chunk and head of GLA: the same matmuls as
    `linear_attn_flops`, the scores A being (Q e^G)(K e^-G)^T.

    That holds for gates whose cumulative sums within a block stay above -FACTOR_RANGE
    (hyla.kernels.chunking), as this benchmark's do. Stronger gates take SUB-token
    sub-chunks with elementwise diagonal blocks instead (fewer FLOPs, far more time).
    """
    return linear_attn_flops(kd, vd)


def gated_delta_rule_flops(kd: int, vd: int) -> tuple[int, int]:
    """(forward, backward) FLOPs per chunk and head of the gated delta rule (WY form).

    The chunk's WY build: K K^T, the unit-triangular solve T = (I + L)^-1 against the
    identity (C^3: C^2 per right-hand side), W = T (beta K) and U0 = T (beta V); the state
    pass W S and (K e^..)^T U; the outputs Q K^T, (Q e^G) S and scores U. Backward:
    recompute the build and the state pass; Q K^T; scores^T dO, (Q e^G)^T dO; the reverse
    pass K dS, W^T dU; dO U^T, dO S^T, U dS^T; dq, dk through the scores; dU S^T; T^T dU,
    T^T dW; dU (beta V)^T, dW (beta K)^T; T^T dT T^T (two C^3 products); (dKK + dKK^T) K.
    """
    c = CHUNK
    build = _mm(c, c, kd) + c**3 + _mm(c, kd, c) + _mm(c, vd, c)
    state_pass = _mm(c, vd, kd) + _mm(kd, vd, c)
    outputs = _mm(c, c, kd) + _mm(c, vd, kd) + _mm(c, vd, c)
    fwd = build + state_pass + outputs
    bwd = (
        build + state_pass + _mm(c, c, kd) + _mm(c, vd, c) + _mm(kd, vd, c)
        + _mm(c, vd, kd) + _mm(kd, vd, c)  # reverse pass
        + _mm(c, c, vd) + _mm(c, kd, vd) + _mm(c, kd, vd)  # dscores, dqg, dkd
        + 2 * _mm(c, kd, c)  # dq, dk through the scores
        + _mm(c, kd, vd) + _mm(c, vd, c) + _mm(c, kd, c)  # dw, dbv, dbk
        + _mm(c, c, vd) + _mm(c, c, kd) + 2 * _mm(c, c, c) + _mm(c, kd, c)
    )  # fmt: skip
    return fwd, bwd


def attention_flops(s: Shape) -> tuple[int, int]:
    """(forward, forward + backward) FLOPs of causal softmax attention: Q K^T and P V over
    the T (T + 1) / 2 visible pairs; backward recomputes Q K^T and adds dO V^T, P^T dO,
    dS K and dS^T Q, 2.5 times the forward."""
    pairs = s.batch * s.heads * s.seq_len * (s.seq_len + 1) // 2
    fwd = 2 * pairs * (s.head_k + s.head_v)
    return fwd, fwd + 2 * pairs * (2 * s.head_k + 3 * s.head_v)


def flops(op: str, s: Shape) -> tuple[int, int]:
    """(forward, forward + backward) FLOPs of `op` at shape `s` (see the counts above)."""
    if op in ATTENTION_OPS:
        return attention_flops(s)
    per_chunk = {"gla": gla_flops, "gated_delta_rule": gated_delta_rule_flops}.get(
        op, linear_attn_flops
    )
    fwd, bwd = per_chunk(s.head_k, s.head_v)
    chunks = s.batch * s.heads * num_chunks(s.seq_len)
    return fwd * chunks, (fwd + bwd) * chunks


def matmul_gflops(device: str, dtype: torch.dtype, repeats: int = 5) -> float:
    """The rate of a 2048 x 2048 matmul in `dtype` on `device` (median of `repeats`)."""
    n = 2048
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    ms = _median_ms(lambda: a @ b, device, warmup=2, repeats=repeats)
    return 2 * n**3 / ms / 1e6


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
    elif op == "linear_attn (const gate)":
        extra = [torch.log1p(-(2.0 ** (-5.0 - torch.arange(s.heads, dtype=torch.float32))))]
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
        "linear_attn (const gate)": lambda q, k, v, g: chunk_linear_attn(
            q, k, v, g, backend=backend
        )[0],
        "linear_attn (gate)": lambda q, k, v, g: chunk_linear_attn(q, k, v, g, backend=backend)[0],
        "gla": lambda q, k, v, gk: chunk_gla(q, k, v, gk, backend=backend)[0],
        "gated_delta_rule": lambda q, k, v, beta, g: chunk_gated_delta_rule(
            q, k, v, beta, g, backend=backend
        )[0],
        "flash_attention (causal)": lambda q, k, v: flash_attention(q, k, v, backend=backend),
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
    row.matmul_gflops = matmul_gflops(args.device, dtype)
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
        fwd, fwd_bwd = flops(name, s)
        row.fwd_gflop, row.fwd_bwd_gflop = fwd / 1e9, fwd_bwd / 1e9
        row.fwd_gflops = fwd / row.fwd_ms / 1e6
        row.fwd_bwd_gflops = fwd_bwd / row.fwd_bwd_ms / 1e6
        row.fwd_of_matmul = row.fwd_gflops / row.matmul_gflops
        row.fwd_bwd_of_matmul = row.fwd_bwd_gflops / row.matmul_gflops
    except Exception as err:  # an op that is not ready yet is reported, not fatal
        row.fwd_ms = row.fwd_bwd_ms = None
        row.skipped = f"{type(err).__name__}: {err}".splitlines()[0][:200]
    return row


def _cells(rows: list[Row], lens: list[int], name: str, cell: Callable[[Row], str]) -> list[str]:
    out = []
    for t in lens:
        r = next((r for r in rows if r.op == name and r.seq_len == t), None)
        out.append("-" if r is None else "skipped" if r.skipped else cell(r))
    return out


def _tables(rows: list[Row], args: argparse.Namespace) -> list[Table]:
    """Median times, then achieved GFLOP/s and their fraction of the matmul rate."""
    lens = sorted({r.seq_len for r in rows})
    shape = (
        f"{args.device}, {args.dtype}, B*T={args.tokens}, H={args.heads}, "
        f"K={args.head_k}, V={args.head_v}"
    )
    times = Table(title=f"{shape}: median ms (fwd / fwd+bwd)")
    rates = Table(
        title=f"{shape}: GFLOP/s, fwd / fwd+bwd (fraction of a 2048^2 matmul beside the row)"
    )
    for table in (times, rates):
        table.add_column("op")
        for t in lens:
            table.add_column(f"T={t}", justify="right")
    for name in dict.fromkeys(r.op for r in rows):
        times.add_row(
            name, *_cells(rows, lens, name, lambda r: f"{r.fwd_ms:.1f} / {r.fwd_bwd_ms:.1f}")
        )
        rates.add_row(
            name,
            *_cells(
                rows,
                lens,
                name,
                lambda r: (
                    f"{r.fwd_gflops:.1f} / {r.fwd_bwd_gflops:.1f} "
                    f"({r.fwd_of_matmul:.0%} / {r.fwd_bwd_of_matmul:.0%})"
                ),
            ),
        )
    return [times, rates]


LINEAR_OPS = (
    "linear_attn",
    "linear_attn (const gate)",
    "linear_attn (gate)",
    "gla",
    "gated_delta_rule",
)
ATTENTION_OPS = ("flash_attention (causal)", "sdpa (causal)")
CPU_SEQ_LENS = [2048, 8192, 32768]
CUDA_SEQ_LENS = [2048, 4096, 8192, 16384, 32768, 65536]


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
    parser.add_argument(
        "--seq-lens",
        type=int,
        nargs="+",
        default=None,
        help=f"default: {CPU_SEQ_LENS} on cpu, {CUDA_SEQ_LENS} on cuda",
    )
    parser.add_argument("--tokens", type=int, default=32768, help="B * T, fixed for every T")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-k", type=int, default=64)
    parser.add_argument("--head-v", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ops", nargs="+", default=None, help="subset of the op names")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="linear_attn alone at T = 8192 (B*T = 32768 by default): under a minute on cpu",
    )
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        args.seq_lens = args.seq_lens or [8192]
        args.ops = args.ops or ["linear_attn"]
    if args.seq_lens is None:
        args.seq_lens = CUDA_SEQ_LENS if args.device == "cuda" else CPU_SEQ_LENS
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
                console.print(
                    f"{name} T={t}: {row.fwd_ms:.1f} / {row.fwd_bwd_ms:.1f} ms, "
                    f"{row.fwd_of_matmul:.0%} / {row.fwd_bwd_of_matmul:.0%} of a "
                    f"{row.matmul_gflops:.0f} GFLOP/s matmul"
                )
            rows.append(row)
    for table in _tables(rows, args):
        console.print(table)

    out = args.out or RESULTS / f"kernels-{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config["backend"] = backend
    config["flops"] = (
        "per op, the chunkwise algorithm's matmul FLOPs (2 m n k each, elementwise work "
        "not counted; see flops() in benchmarks/kernels.py); *_of_matmul divide the "
        "achieved rate by a 2048 x 2048 matmul in the same dtype timed before the row"
    )
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
