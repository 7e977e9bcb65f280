"""Real-data loss curves: a tiny hybrid vs pure linear attention vs pure softmax attention.

Each model trains with `Trainer(cfg).fit()` in this process (no Ray, one rank) on the
default corpus (the Python standard library's source files, byte tokens), with the same
steps, batch, sequence length, width, optimizer, data order and validation sequences. Only
`model.layers` differs, and the script refuses models whose parameter counts differ by more
than --tolerance. Every run logs to MLflow; the train and validation losses are read back
from MLflow and drawn into one PNG. A JSON summary (run ids included) goes next to the store.

    python benchmarks/curves.py                     # 500 steps each, ~15 min on 2 CPU cores
    python benchmarks/curves.py --steps 20 --out /tmp/c.json --png /tmp/c.png
    python benchmarks/curves.py --models hybrid=DDDA linear=DDDD attention=AAAA
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
# GLA on both sides: the hybrid swaps one GLA layer of four for softmax attention.
MODELS = {"hybrid": "GGGA", "linear": "GGGG", "attention": "AAAA"}
TAIL = 20  # steps averaged for the reported final training loss (one step's loss is noisy)


def parse_models(items: list[str]) -> dict[str, str]:
    """["hybrid=GGGA", ...] -> {"hybrid": "GGGA", ...}."""
    models = {}
    for item in items:
        name, sep, layers = item.partition("=")
        if not (sep and name and layers) or name in models:
            raise ValueError(
                f"--models items must be distinct NAME=LAYERS pairs (e.g. hybrid=GGGA), "
                f"got {item!r}"
            )
        models[name] = layers
    return models


def overrides(layers: str, args: argparse.Namespace, run_name: str, storage: str) -> list[str]:
    """The hydra overrides of one run: everything but the layer pattern is shared."""
    return [
        "parallel=none",
        f"model.layers={layers}",
        f"model.d_model={args.d_model}",
        f"model.n_heads={args.heads}",
        "model.attn_kv_heads=null",
        f"data.seq_len={args.seq_len}",
        f"data.batch_size={args.batch}",
        f"data.val_sequences={args.val_sequences}",
        f"trainer.steps={args.steps}",
        f"trainer.eval_every={args.eval_every}",
        f"trainer.eval_batches={-(-args.val_sequences // args.batch)}",
        "trainer.log_every=25",
        f"checkpoint.dir={storage}",
        f"checkpoint.every={args.steps}",
        "checkpoint.keep_last=1",
        f"tracking.uri={args.tracking_uri}",
        f"tracking.experiment={args.experiment}",
        f"tracking.run_name={run_name}",
        "tracking.system_metrics=false",
        *args.override,
    ]


def check_matched(counts: dict[str, int], tolerance: float) -> None:
    """Matched parameter counts: the largest within `tolerance` (a fraction) of the smallest."""
    low, high = min(counts.values()), max(counts.values())
    if high > low * (1 + tolerance):
        raise ValueError(
            f"parameter counts must agree within --tolerance={tolerance}, got {counts}: change "
            f"the layer patterns or pass --override model.mlp_hidden=..."
        )


def metric_history(tracking_uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """[(step, value)] of one metric as MLflow stored it."""
    from mlflow import MlflowClient

    history = MlflowClient(tracking_uri).get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in history)


def train(name: str, layers: str, args: argparse.Namespace, stamp: str) -> dict:
    """Train one model; its metrics as logged to MLflow."""
    from hyla.models.presets import count_parameters
    from hyla.platform.config import compose
    from hyla.platform.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="hyla-curves-") as storage:
        cfg = compose(overrides(layers, args, f"curves-{name}-{layers}-{stamp}", storage))
        start = time.perf_counter()
        result = Trainer(cfg).fit()
        wall = time.perf_counter() - start
    loss = metric_history(result.tracking_uri, result.run_id, "loss")
    val = metric_history(result.tracking_uri, result.run_id, "val_loss")
    tail = [v for _, v in loss[-TAIL:]]
    return {
        "name": name,
        "layers": layers,
        "parameters": count_parameters(cfg.model),
        "run_id": result.run_id,
        "wall_s": round(wall, 1),
        "tokens_per_s": round(result.tokens_per_second, 1),
        "final_loss": loss[-1][1],
        f"loss_last_{TAIL}_mean": sum(tail) / len(tail),
        "final_val_loss": val[-1][1],
        "loss": loss,
        "val_loss": val,
    }


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot(runs: list[dict], title: str, path: Path) -> None:
    """Training loss (faint: per step; solid: moving average) and validation loss vs step.
    The training panel starts its y range after the first tenth of the steps: the early
    drop from ln(vocab) would otherwise flatten the differences between the models."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    low, high = float("inf"), float("-inf")
    for color, run in enumerate(runs):
        label = f"{run['name']} {run['layers']} ({run['parameters'] / 1e6:.2f}M)"
        steps, values = zip(*run["loss"], strict=True)
        smooth = _moving_average(list(values), 10)
        left.plot(steps, values, color=f"C{color}", alpha=0.25, linewidth=0.8)
        left.plot(steps, smooth, color=f"C{color}", label=label)
        later = smooth[len(smooth) // 10 :]
        low, high = min(low, *later), max(high, *later)
        val_steps, val_values = zip(*run["val_loss"], strict=True)
        right.plot(val_steps, val_values, color=f"C{color}", marker="o", label=label)
    margin = 0.05 * (high - low)
    left.set_ylim(low - margin, high + margin)
    left.set(xlabel="step", ylabel="cross-entropy (nats / byte)", title="training loss")
    right.set(xlabel="step", title="validation loss (held-out documents)")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def draw(summary: dict, path: Path) -> None:
    """The PNG of a summary as main() writes it (also from an earlier run's JSON)."""
    meta, settings = summary["meta"], summary["meta"]["settings"]
    title = (
        f"stdlib bytes, seq_len {settings['seq_len']}, batch {settings['batch']}, d_model "
        f"{settings['d_model']}, {settings['steps']} steps, {meta['date']}"
    )
    plot(summary["runs"], title, path)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=[f"{k}={v}" for k, v in MODELS.items()])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--val-sequences", type=int, default=64)
    parser.add_argument("--tolerance", type=float, default=0.10)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--override", action="append", default=[], help="an extra hydra override for every run"
    )
    parser.add_argument("--tracking-uri", default=f"sqlite:///{RESULTS / 'mlflow.db'}")
    parser.add_argument("--experiment", default="hyla-curves")
    parser.add_argument("--out", type=Path, default=RESULTS / "curves.json")
    parser.add_argument("--png", type=Path, default=ROOT / "docs" / "curves.png")
    parser.add_argument(
        "--replot", action="store_true", help="only redraw --png from an earlier --out JSON"
    )
    args = parser.parse_args(argv)
    if args.replot:
        draw(json.loads(args.out.read_text()), args.png)
        return
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    models = parse_models(args.models)

    from hyla.models.presets import count_parameters
    from hyla.platform.config import compose

    counts = {
        name: count_parameters(compose(overrides(layers, args, "count", "unused")).model)
        for name, layers in models.items()
    }
    check_matched(counts, args.tolerance)
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    runs = []
    for name, layers in models.items():
        print(f"== {name} {layers}: {counts[name]:,} parameters", flush=True)
        runs.append(train(name, layers, args, stamp))

    meta = {
        "date": datetime.now().date().isoformat(),
        "machine": f"{_cpu_name()}, {os.cpu_count()} cores, CPU",
        "torch": torch.__version__,
        "threads": args.threads,
        "tracking_uri": args.tracking_uri,
        "experiment": args.experiment,
        "settings": {k: v for k, v in vars(args).items() if not isinstance(v, Path)},
    }
    summary = {"meta": meta, "runs": runs}
    args.out.write_text(json.dumps(summary, indent=1))
    draw(summary, args.png)
    for run in runs:
        print(
            f"{run['name']:>10} {run['layers']}  {run['parameters']:,} params  "
            f"loss {run[f'loss_last_{TAIL}_mean']:.4f} (last {TAIL} mean)  "
            f"val {run['final_val_loss']:.4f}  {run['wall_s']:.0f}s  run {run['run_id']}"
        )
    print(f"wrote {args.out} and {args.png}")


if __name__ == "__main__":
    main()
