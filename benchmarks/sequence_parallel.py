"""Sequence parallelism on gloo CPU processes.

Layer mode (default): one lightning-attention layer (linear attention with a constant
per-head decay) runs forward and backward over T tokens split across W processes, under
LASP-2, the LASP-1 ring, Ulysses and no split. For each (method, W, T) a fresh set of
processes measures the median step time, the bytes each rank sends per step (from
hyla.parallel's accounting) and each rank's peak resident memory.

Model mode (--model PRESET): a whole model, forward and backward, at one length and W, on
each sequence layout (contiguous, zigzag). Per rank: the step time, the seconds it was
blocked in collectives (waiting for the others, mostly), the rest (its compute) and the
bytes it sent; the last of --steps steps is reported.

Both print a table and write JSON and a PNG.

    python benchmarks/sequence_parallel.py          # W in {2, 4}, T in {16K, 64K, 256K}
    python benchmarks/sequence_parallel.py --lengths 16384 --worlds 2 --repeats 1
    python benchmarks/sequence_parallel.py --model scale-1m --lengths 262144 --worlds 4
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
LAYOUTS = ["contiguous", "zigzag"]


def _step(method: str, q, k, v, decay, group) -> None:
    from hyla.kernels import chunk_linear_attn
    from hyla.parallel import SequenceParallel
    from hyla.parallel.context import ShardedSequence

    if method == "none":
        o, _ = chunk_linear_attn(q, k, v, decay)
    else:
        sp = SequenceParallel.even(q.shape[1] * dist.get_world_size(group), group, method)
        seq = ShardedSequence(sp).context(q.new_zeros(q.shape[:2], dtype=torch.long), None)
        o = seq.recurrence(chunk_linear_attn, q, k, v, decay)
    o.square().mean().backward()


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _layer_worker(rank: int, world: int, store: str, cfg: dict, out: str) -> None:
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
    result = {"rank": rank, "seconds": statistics.median(times), "bytes": sent}
    Path(out, f"rank{rank}.json").write_text(json.dumps({**result, "peak_mib": _peak_mib()}))
    if cfg["method"] != "none":
        dist.destroy_process_group()


def _model_worker(rank: int, world: int, store: str, cfg: dict, out: str) -> None:
    from hyla.models import HybridLM
    from hyla.models.presets import load_preset
    from hyla.parallel import SequenceParallel, TrainingPolicy, parallelize
    from hyla.parallel.comm import TRACKER

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    model_cfg = load_preset(cfg["model"])
    sp = SequenceParallel.even(cfg["length"], dist.group.WORLD, "lasp2", cfg["layout"])
    model = parallelize(HybridLM(model_cfg).train(), None, TrainingPolicy(sp))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model_cfg.vocab_size, (1, cfg["length"]), generator=gen)
    labels = torch.roll(ids, -1, 1)
    ids, labels = sp.shard(ids), sp.shard(labels)
    steps = []
    for _ in range(cfg["steps"]):
        dist.barrier()  # every rank starts the step together
        TRACKER.reset()
        start = time.perf_counter()
        model(ids, labels).loss.backward()
        seconds = time.perf_counter() - start
        blocked = sum(r.seconds for r in TRACKER.records)
        sent = sum(r.bytes_sent for r in TRACKER.records)
        steps.append(
            {"step_s": seconds, "wait_s": blocked, "compute_s": seconds - blocked, "bytes": sent}
        )
        model.zero_grad(set_to_none=True)
    result = {
        "rank": rank,
        **steps[-1],
        "steps": steps,
        "peak_mib": _peak_mib(),
        "causal_pairs": sp.layout.causal_pairs(rank),
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _spawn(worker, procs: int, cfg: dict) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(procs, f"{tmp}/store", cfg, tmp), nprocs=procs, join=True)
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(procs)]


def measure(method: str, world: int, length: int, heads: int, dim: int, repeats: int) -> dict:
    cfg = {"method": method, "length": length, "heads": heads, "dim": dim, "repeats": repeats}
    ranks = _spawn(_layer_worker, 1 if method == "none" else world, cfg)
    return {
        "method": method,
        "world": world,
        "length": length,
        "step_seconds": max(r["seconds"] for r in ranks),
        "bytes_per_rank": max(r["bytes"] for r in ranks),
        "peak_mib_per_rank": max(r["peak_mib"] for r in ranks),
    }


def measure_model(model: str, layout: str, world: int, length: int, steps: int) -> dict:
    cfg = {"model": model, "layout": layout, "length": length, "steps": steps}
    ranks = _spawn(_model_worker, world, cfg)
    compute = [r["compute_s"] for r in ranks]
    return {
        "model": model,
        "layout": layout,
        "world": world,
        "length": length,
        "step_seconds": max(r["step_s"] for r in ranks),
        "compute_spread": max(compute) / min(compute),
        "ranks": ranks,
    }


def _setup_axes(axes) -> None:
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)


def _plot_layers(rows: list[dict], path: Path) -> None:
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
    _setup_axes(axes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_model(rows: list[dict], path: Path) -> None:
    """Per rank, compute and time blocked in collectives, stacked; one panel per run."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(5 * len(rows), 4), sharey=True, squeeze=False)
    for ax, row in zip(axes[0], rows, strict=True):
        ranks = [r["rank"] for r in row["ranks"]]
        compute = [r["compute_s"] for r in row["ranks"]]
        wait = [r["wait_s"] for r in row["ranks"]]
        ax.bar(ranks, compute, color="C0", label="compute")
        ax.bar(ranks, wait, bottom=compute, color="C3", label="blocked in collectives")
        ax.set(
            xlabel="rank",
            title=f"{row['layout']}, W={row['world']}, T={row['length']:,}: "
            f"{row['step_seconds']:.0f} s",
            xticks=ranks,
        )
    axes[0][0].set(ylabel="seconds per step (fwd+bwd)")
    _setup_axes(axes[0])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _meta(args) -> dict:
    return {
        "date": date.today().isoformat(),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        **{k: getattr(args, k) for k in ("heads", "dim", "model", "steps")},
    }


def _layer_table(rows: list[dict], args):
    from rich.table import Table

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
    return table


def _model_table(rows: list[dict], args):
    from rich.table import Table

    table = Table(title=f"{args.model}, fwd+bwd, gloo CPU (last of {args.steps} steps)")
    for col in ("T", "W", "layout", "step s", "rank", "compute s", "blocked s", "bytes sent"):
        table.add_column(col)
    for row in rows:
        for r in row["ranks"]:
            table.add_row(
                f"{row['length']:,}",
                str(row["world"]),
                row["layout"],
                f"{row['step_seconds']:.1f}",
                str(r["rank"]),
                f"{r['compute_s']:.1f}",
                f"{r['wait_s']:.1f}",
                f"{r['bytes']:,}",
            )
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 65536, 262144])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", help="model mode: a preset of configs/model, e.g. scale-1m")
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=LAYOUTS)
    parser.add_argument("--steps", type=int, default=2, help="model mode: steps per run")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    import matplotlib
    from rich.console import Console

    matplotlib.use("Agg")
    if args.model:
        rows = [
            measure_model(args.model, layout, world, length, args.steps)
            for length in args.lengths
            for world in args.worlds
            for layout in args.layouts
        ]
        table, plot = _model_table(rows, args), _plot_model
        default = Path("benchmarks/results/sequence_parallel_model-cpu.json")
    else:
        rows = []
        for length in args.lengths:
            rows.append(measure("none", 1, length, args.heads, args.dim, args.repeats))
            for world in args.worlds:
                for method in METHODS[1:]:
                    rows.append(measure(method, world, length, args.heads, args.dim, args.repeats))
        table, plot = _layer_table(rows, args), _plot_layers
        default = Path("benchmarks/results/sequence_parallel-cpu.json")
    Console(width=120).print(table)
    out = args.out or default
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": _meta(args), "rows": rows}, indent=2))
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
