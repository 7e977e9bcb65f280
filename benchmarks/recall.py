"""MQAR recall at tiny scale: GLA, Gated DeltaNet, Mixture-of-Memories and softmax attention
at matched parameter counts, trained for the same steps on the same samples, then scored by
the number of key-value pairs (issue 7 section 4).

Every model has the same depth and width; each one's SwiGLU width is solved so its parameter
count matches MoM's (MoM's mixer is the largest). GLA runs with gla_key_ratio 1, so GLA, Gated
DeltaNet and each memory of "MoM" hold the same state; "MoM (equal total state)" uses 4x the
heads (1/16 of the state per memory) and 4 memories, so all its memories together hold what
one GDN layer holds. The state sizes reported are measured: the tensors each layer keeps
after a prefill of seq_len tokens.

Training uses hyla's Trainer (single process, MLflow on a throwaway SQLite store, checkpoints
under the same temporary folder) with its loader swapped for a mix of pair counts; scoring
uses Trainer.evaluate on one validation MQAR set per pair count. Writes JSON, a markdown
table and a PNG.

    python benchmarks/recall.py                      # the defaults used in docs/recall.md
    python benchmarks/recall.py --steps 20 --warmup 5 --models attention --eval-samples 32   # smoke
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import shlex
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import date
from pathlib import Path

import torch
from mlflow import MlflowClient
from torch.utils.data import Dataset

from hyla.models.config import ModelConfig
from hyla.models.hybrid import HybridLM
from hyla.models.presets import count_parameters
from hyla.platform.config import JobConfig, compose
from hyla.platform.data import MQAR, build_loader
from hyla.platform.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
# name -> model overrides on top of the shared ones (width, depth, heads are common).
MODELS: dict[str, dict[str, object]] = {
    "GLA": {"layers": "GG", "gla_key_ratio": 1.0},
    "Gated DeltaNet": {"layers": "DD"},
    "MoM": {"layers": "MM", "mom_memories": 4, "mom_top_k": 2, "mom_shared_memory": True},
    # Total memory state equal to one GDN layer's: 4 memories (3 routed + shared) of a
    # quarter of the per-head state each (4x the heads at a quarter of the head dim ^ 2).
    "MoM (equal total state)": {
        "layers": "MM",
        "mom_memories": 3,
        "mom_top_k": 1,
        "mom_shared_memory": True,
        "n_heads_factor": 4,
    },
    "attention": {"layers": "AA"},
}
VAL_SEED_OFFSET = 10_000  # validation MQAR seeds: never a training seed


class MixedMQAR(Dataset):
    """MQAR samples cycling over several pair counts: sample i has pairs[i % len(pairs)] and
    depends only on (seed, i), like MQAR itself."""

    def __init__(
        self, seq_len: int, pairs: list[int], samples: int, vocab_size: int, seed: int
    ) -> None:
        if not pairs:
            raise ValueError("pairs must name at least one pair count, got []")
        per_part = -(-samples // len(pairs))
        self.parts = [MQAR(seq_len, p, per_part, vocab_size, seed + j) for j, p in enumerate(pairs)]
        self.samples = samples

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.parts[i % len(self.parts)][i // len(self.parts)]


def model_overrides(name: str, args: argparse.Namespace, mlp_hidden: int) -> dict[str, object]:
    spec = dict(MODELS[name])
    heads = args.n_heads * int(spec.pop("n_heads_factor", 1))
    return {
        "d_model": args.d_model,
        "n_heads": heads,
        "mlp_hidden": mlp_hidden,
        "vocab_size": args.vocab_size,
        **spec,
    }


def model_config(name: str, args: argparse.Namespace, mlp_hidden: int) -> ModelConfig:
    return ModelConfig(attn_kv_heads=None, **model_overrides(name, args, mlp_hidden))


def matched_mlp_hidden(name: str, args: argparse.Namespace, target: int) -> int:
    """The SwiGLU width (a multiple of 8) whose parameter count is nearest `target`: the
    count is linear in mlp_hidden, so two counts give it."""
    at8 = count_parameters(model_config(name, args, 8))
    slope = (count_parameters(model_config(name, args, 16)) - at8) / 8
    return max(8, 8 * round(((target - at8) / slope + 8) / 8))


def state_sizes(cfg: ModelConfig, seq_len: int) -> list[dict[str, int]]:
    """Per layer, the elements of each state tensor after a prefill of seq_len tokens
    (batch 1): "recurrent" is the matrix memory (all MoM memories together), "conv_*" the
    short-convolution history, "k"/"v"-like keys an attention layer's KV cache."""
    torch.manual_seed(0)
    model = HybridLM(cfg).eval()
    states = model.new_states()
    with torch.no_grad():
        model.hidden_states(torch.randint(1, cfg.vocab_size, (1, seq_len)), states)
    return [{key: t.numel() for key, t in state.items()} for state in states]


def job_config(name: str, args: argparse.Namespace, mlp_hidden: int, workdir: Path) -> JobConfig:
    model = [f"model.{k}={v}" for k, v in model_overrides(name, args, mlp_hidden).items()]
    run = name.lower().replace(" ", "-").replace("(", "").replace(")", "")
    return compose(
        [
            "model=tiny",
            "parallel=none",
            "data=mqar",
            "model.attn_kv_heads=null",
            *model,
            f"data.seq_len={args.seq_len}",
            f"data.batch_size={args.batch_size}",
            f"data.mqar_pairs={max(args.train_pairs)}",
            f"data.mqar_samples={args.steps * args.batch_size}",
            f"data.val_sequences={args.batch_size}",
            f"data.seed={args.seed}",
            f"trainer.steps={args.steps}",
            f"trainer.eval_every={args.steps}",
            f"trainer.log_every={max(1, args.steps // 10)}",
            f"trainer.eval_batches={args.eval_samples // args.batch_size}",
            f"trainer.seed={args.seed}",
            f"optim.lr={args.lr}",
            f"optim.warmup_steps={args.warmup}",
            f"checkpoint.dir={workdir / 'checkpoints'}",
            f"checkpoint.every={args.steps}",
            "checkpoint.keep_last=1",
            # one store per model: parallel workers must not share a SQLite file
            f"tracking.uri=sqlite:///{workdir / run}.db",
            "tracking.experiment=recall",
            f"tracking.run_name=recall-{run}",
            "tracking.system_metrics=false",
        ]
    )


def run_model(name: str, args: argparse.Namespace, mlp_hidden: int, workdir: Path) -> dict:
    torch.set_num_threads(1)
    cfg = job_config(name, args, mlp_hidden, workdir)
    trainer = Trainer(cfg)
    train_set = MixedMQAR(
        args.seq_len, args.train_pairs, cfg.data.mqar_samples, cfg.model.vocab_size, args.seed
    )
    trainer.loader = build_loader(cfg.data, train_set, dp_rank=0, dp_size=1)
    start = time.perf_counter()
    result = trainer.fit()
    train_seconds = time.perf_counter() - start
    accuracy, val_loss = {}, {}
    for pairs in args.eval_pairs:
        trainer.val_set = MQAR(
            args.seq_len,
            pairs,
            args.eval_samples,
            cfg.model.vocab_size,
            args.seed + VAL_SEED_OFFSET,
        )
        scores = trainer.evaluate()
        accuracy[pairs], val_loss[pairs] = scores["val_accuracy"], scores["val_loss"]
    client = MlflowClient(result.tracking_uri)
    for pairs in args.eval_pairs:
        client.log_metric(result.run_id, f"recall_accuracy_pairs_{pairs}", accuracy[pairs])
    losses = sorted(result.losses.items())
    return {
        "model": name,
        "overrides": model_overrides(name, args, mlp_hidden),
        "parameters": count_parameters(cfg.model),
        "state_elements_per_layer": state_sizes(cfg.model, args.seq_len),
        "accuracy": accuracy,
        "val_loss": val_loss,
        "train_loss_first": losses[0][1],
        "train_loss_last_10": sum(v for _, v in losses[-10:]) / len(losses[-10:]),
        "train_losses": [v for _, v in losses],
        "train_seconds": train_seconds,
        "mlflow_run_id": result.run_id,
    }


def state_cell(layer_states: list[dict[str, int]]) -> str:
    """One layer's state in elements: the matrix memory, plus conv history / KV cache."""
    first = layer_states[0]
    memory = first.get("recurrent", 0)
    other = sum(v for k, v in first.items() if k != "recurrent")
    if memory and other:
        return f"{memory:,} + {other:,} conv"
    if memory:
        return f"{memory:,}"
    return f"{other:,} KV cache (grows with T)"


def markdown(rows: list[dict], args: argparse.Namespace, command: str) -> str:
    pairs = args.eval_pairs
    lines = [
        "| model | layers | d_model x heads | mlp_hidden | parameters | state per layer (T="
        f"{args.seq_len}) | " + " | ".join(f"{p} pairs" for p in pairs) + " |",
        "|---|---|---|---|---|---|" + "---|" * len(pairs),
    ]
    for r in rows:
        o = r["overrides"]
        acc = " | ".join(f"{100 * r['accuracy'][p]:.1f}" for p in pairs)
        lines.append(
            f"| {r['model']} | {o['layers']} | {o['d_model']} x {o['n_heads']} | "
            f"{o['mlp_hidden']} | {r['parameters']:,} | {state_cell(r['state_elements_per_layer'])}"
            f" | {acc} |"
        )
    header = (
        f"Command: `{command}`\n\n"
        f"Machine: {args.machine}, torch {torch.__version__}, 1 thread; {date.today()}.\n"
        f"Training: {args.steps} steps x {args.batch_size} sequences of {args.seq_len} tokens, "
        f"pairs cycling over {args.train_pairs}, lr {args.lr}, seed {args.seed}. Accuracy (%) "
        f"on {args.eval_samples} held-out sequences per pair count.\n\n"
    )
    return header + "\n".join(lines) + "\n"


def plot(rows: list[dict], pairs: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.plot(pairs, [100 * r["accuracy"][p] for p in pairs], marker="o", label=r["model"])
    ax.set_xscale("log", base=2)
    ax.set_xticks(pairs, [str(p) for p in pairs])
    ax.set_xlabel("key-value pairs")
    ax.set_ylabel("recall accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("MQAR recall at matched parameters")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pair_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated pair counts >= 1, e.g. 4,8,16, got {text!r}"
        )
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--train-pairs", type=pair_list, default=[2, 4, 8, 16])
    p.add_argument("--eval-pairs", type=pair_list, default=[2, 4, 8, 16])
    p.add_argument("--eval-samples", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=130)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-heads", type=int, default=2)
    p.add_argument(
        "--mom-mlp-hidden",
        type=int,
        default=64,
        help="MoM's SwiGLU width (the parameter target the other models are matched to)",
    )
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        help="models trained at once, one process (and one thread) each",
    )
    p.add_argument("--machine", default="2-core AMD EPYC VM, CPU")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/recall.json")
    p.add_argument("--markdown", type=Path, default=ROOT / "docs/recall.md")
    p.add_argument("--png", type=Path, default=ROOT / "docs/recall.png")
    args = p.parse_args(argv)
    if args.eval_samples % args.batch_size:
        p.error(
            f"--eval-samples must be a multiple of --batch-size={args.batch_size}, "
            f"got {args.eval_samples}"
        )
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    target = count_parameters(model_config("MoM", args, args.mom_mlp_hidden))
    hidden = [matched_mlp_hidden(name, args, target) for name in args.models]
    spawn = multiprocessing.get_context("spawn")
    with (
        tempfile.TemporaryDirectory(prefix="hyla-recall-", dir="/tmp") as tmp,
        ProcessPoolExecutor(args.workers, mp_context=spawn) as pool,
    ):
        n = len(args.models)
        rows = list(pool.map(run_model, args.models, [args] * n, hidden, [Path(tmp)] * n))
    for row in rows:
        accs = ", ".join(f"{p}: {100 * a:.1f}%" for p, a in row["accuracy"].items())
        print(f"{row['model']}: {row['parameters']:,} params, {row['train_seconds']:.0f}s, {accs}")
    rows.sort(key=lambda r: list(MODELS).index(r["model"]))
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python benchmarks/recall.py", *(shlex.quote(a) for a in given)])
    for path in (args.json, args.markdown, args.png):
        path.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": args.machine,
        "platform": platform.platform(),
        "torch": torch.__version__,
        "date": str(date.today()),
        "command": command,
        "settings": {k: v for k, v in vars(args).items() if not isinstance(v, Path)},
        "parameter_target": target,
        "results": rows,
    }
    args.json.write_text(json.dumps(report, indent=1))
    args.markdown.write_text("# MQAR recall\n\n" + markdown(rows, args, command))
    plot(rows, args.eval_pairs, args.png)
    print(markdown(rows, args, command))


if __name__ == "__main__":
    main()
