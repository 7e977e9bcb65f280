"""Sequence parallelism on gloo CPU processes: LASP-2 vs the LASP-1 ring vs Ulysses vs none.

One lightning-attention layer (linear attention with a constant per-head decay) runs
forward and backward over a sequence of T tokens split across W processes. For each
(method, W, T) a fresh set of processes measures the median step time, the bytes each rank
sends per step (from hyla.parallel's accounting) and each rank's peak resident memory.
Prints a table, writes JSON and a PNG plot.

    python benchmarks/sequence_parallel.py          # W in {2, 4}, T in {16K, 64K, 256K}
    python benchmarks/sequence_parallel.py --lengths 16384 --worlds 2 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

METHODS = ["none", "lasp2", "lasp1", "ulysses"]


def _step(method: str, q, k, v, decay, group) -> None:
    from hyla.kernels import chunk_linear_attn
    from hyla.models.mixers.common import run_ulysses
    from hyla.parallel.context import SequenceParallel
    from hyla.parallel.ops import linear_attn_sp

    if method == "none":
        o, _ = chunk_linear_attn(q, k, v, decay)
    elif method == "ulysses":
        sp = SequenceParallel.even(q.shape[1] * dist.get_world_size(group), group, "ulysses")
        o = run_ulysses(lambda *x: chunk_linear_attn(*x)[0], (q, k, v, decay), sp)
    else:
        o = linear_attn_sp(method, q, k, v, decay, group=group)
    o.square().mean().backward()


def _worker(rank: int, world: int, store: str, cfg: dict, out: str) -> None:
    from hyla.parallel.comm import TRACKER

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if cfg["method"] != "none":
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    local = cfg["length"] // world
    gen = torch.Generator().manual_seed(rank)
    shape = (1, local, cfg["heads"], cfg["dim"])
    q, k, v = (torch.randn(shape, generator=gen).requires_grad_() for _ in range(3))
    decay = torch.log1p(-(2.0 ** (-5.0 - torch.arange(cfg["heads"], dtype=torch.float32))))
    group = dist.group.WORLD if cfg["method"] != "none" else None
    _step(cfg["method"], q, k, v, decay, group)  # warm-up
    times = []
    for _ in range(cfg["repeats"]):
        TRACKER.reset()
        start = time.perf_counter()
        _step(cfg["method"], q, k, v, decay, group)
        times.append(time.perf_counter() - start)
    sent = sum(r.bytes_sent for r in TRACKER.records)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "rank": rank,
        "seconds": statistics.median(times),
        "bytes": sent,
        "peak_mib": peak_mib,
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    if cfg["method"] != "none":
        dist.destroy_process_group()


def measure(method: str, world: int, length: int, heads: int, dim: int, repeats: int) -> dict:
    cfg = {"method": method, "length": length, "heads": heads, "dim": dim, "repeats": repeats}
    procs = 1 if method == "none" else world
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(procs, f"{tmp}/store", cfg, tmp), nprocs=procs, join=True)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(procs)]
    return {
        "method": method,
        "world": world,
        "length": length,
        "step_seconds": max(r["seconds"] for r in ranks),
        "bytes_per_rank": max(r["bytes"] for r in ranks),
        "peak_mib_per_rank": max(r["peak_mib"] for r in ranks),
    }


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    series = sorted(
        {(r["method"], r["world"]) for r in rows}, key=lambda s: (METHODS.index(s[0]), s[1])
    )
    for color, (method, world) in enumerate(series):
        pts = [r for r in rows if (r["method"], r["world"]) == (method, world)]
        label = "no SP" if method == "none" else f"{method} W={world}"
        xs, style = [r["length"] for r in pts], dict(marker="o", color=f"C{color}", label=label)
        axes[0].loglog(xs, [r["step_seconds"] for r in pts], **style)
        if method != "none":
            axes[1].loglog(xs, [r["bytes_per_rank"] for r in pts], **style)
    axes[0].set(xlabel="sequence length T", ylabel="step time (s), fwd+bwd", title="step time")
    axes[1].set(
        xlabel="sequence length T", ylabel="bytes sent per rank per step", title="communication"
    )
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 65536, 262144])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/sequence_parallel-cpu.json")
    )
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    rows = []
    for length in args.lengths:
        rows.append(measure("none", 1, length, args.heads, args.dim, args.repeats))
        for world in args.worlds:
            for method in METHODS[1:]:
                rows.append(measure(method, world, length, args.heads, args.dim, args.repeats))
    table = Table(
        title=f"one lightning-attention layer, fwd+bwd, H={args.heads}, D={args.dim}, gloo CPU"
    )
    for col in ("T", "W", "method", "step s", "bytes sent / rank", "peak MiB / rank"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            str(r["length"]),
            str(r["world"]),
            r["method"],
            f"{r['step_seconds']:.3f}",
            f"{r['bytes_per_rank']:,}",
            f"{r['peak_mib_per_rank']:.0f}",
        )
    Console(width=120).print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": date.today().isoformat(),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "heads": args.heads,
        "dim": args.dim,
    }
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    _plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
