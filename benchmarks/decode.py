"""Decoding speed: tokens/s through the chunk ops (before) and the fused recurrent ops (after).

Two measurements, each on both paths:

- generate: `hyla.models.generation.generate` on the `tiny` preset (every mixer type once,
  the default training config's model), randomly initialised: a short prompt, then greedy
  decoding; tokens/s counts the new tokens of every row (prefill included in the time).
- layer: one decoding step (T = 1) of a single mixer shaped as the 1.3B-scale preset of its
  family (L: linear-llama3-1b, G: gla-1.3b, D: gdn-1.3b, M: mom-1.3b), as tokens/s of the
  whole layer (projections included) and ms per step of the recurrence op alone.

With `--hf`, it measures transformers' generate() instead: a preset exported and loaded
with `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`, ms per generated
token after prompts of `--hf-prompts` tokens (default 256 and 4,096), for each batch size,
with the cache (`use_cache=True`, the wrapper's default) and without it (every step
recomputes the prefix). A token's time is the time from the first new token (after the
prefill) to the last, over `--hf-new-tokens`, best of three. `--hf-models` names presets, and
`PRESET:LAYERS` one with another layer pattern: the default `tiny:LGDM` is the tiny preset
without its attention layer, whose time per token should not grow with the prompt.

    .venv/bin/python -m benchmarks.decode --hf --threads 1              # CPU: long
    .venv/bin/python -m benchmarks.decode --hf --hf-prompts 16 64 --batches 1 2

(as a module: run as a script, benchmarks/kernels.py would shadow the `kernels` package
that transformers looks for).

The path is chosen through `hyla.models.mixers.common.FUSED_MAX_TOKENS`, the longest
decoding input that takes the fused recurrent op: `chunk` sets it to 0 on every device
(every step runs the chunk op, as before the fused ops existed), `fused` keeps its
defaults. `--sweep` times the gated delta rule op alone against T instead, which is how
those defaults were chosen. The ops use the default backend: PyTorch on CPU, Triton on CUDA.

    .venv/bin/python benchmarks/decode.py --threads 1           # CPU, a few minutes
    .venv/bin/python benchmarks/decode.py --device cuda         # bf16, Triton

On a CPU shared with other work, one thread measures the ops rather than the wait for a
busy core: a [16, 128, 128] baddbmm took 0.1 ms on one thread and 15 ms on two there.

Prints a table and writes JSON to benchmarks/results/decode-<device>.json
(decode-hf-<device>.json with --hf; --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from hyla.kernels import (
    FUSED_RECURRENT_OPS,
    chunk_gated_delta_rule,
    chunk_gla,
    chunk_linear_attn,
    fused_recurrent_gated_delta_rule,
)
from hyla.models import HybridLM, generate
from hyla.models.config import ModelConfig
from hyla.models.decoding import DecodingContext
from hyla.models.mixers import MIXERS
from hyla.models.mixers import common as mixer_common
from hyla.models.presets import load_preset

RESULTS = Path(__file__).resolve().parent / "results"
PATHS = ("chunk", "fused")
LAYER_PRESETS = {"L": "linear-llama3-1b", "G": "gla-1.3b", "D": "gdn-1.3b", "M": "mom-1.3b"}
LAYER_OPS = {"L": chunk_linear_attn, "G": chunk_gla, "D": chunk_gated_delta_rule}
LAYER_OPS["M"] = chunk_gated_delta_rule


DEFAULT_LIMITS = dict(mixer_common.FUSED_MAX_TOKENS)


def use_path(path: str) -> None:
    """Route decoding through the chunk ops ("chunk") or the fused recurrent ops ("fused")."""
    limits = dict.fromkeys(DEFAULT_LIMITS, 0) if path == "chunk" else DEFAULT_LIMITS
    mixer_common.FUSED_MAX_TOKENS = dict(limits)


def seconds_per_call(fn: Callable[[], object], device: str, calls: int) -> float:
    """Best of three rounds of `calls` calls (after one warm-up call): the least disturbed
    by the other work on a shared machine."""
    fn()
    rounds = []
    for _ in range(3):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        rounds.append((time.perf_counter() - start) / calls)
    return min(rounds)


def bench_generate(args: argparse.Namespace, batch: int, path: str) -> dict:
    model = HybridLM(load_preset("tiny")).to(args.device).eval()
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 256, (batch, args.prompt), generator=gen).to(args.device)
    use_path(path)

    def run() -> None:
        generate(model, prompt, args.new_tokens)

    sec = seconds_per_call(run, args.device, 1)
    return {
        "bench": "generate",
        "model": "tiny",
        "batch": batch,
        "path": path,
        "tokens_per_s": batch * args.new_tokens / sec,
    }


def _layer_inputs(letter: str, cfg: ModelConfig, batch: int, device: str, dtype: torch.dtype):
    """The recurrence op's inputs for one decoded token of the mixer, and a state to
    continue from (the shapes of the mixer's own call; MoM: every memory of every row)."""
    gen = torch.Generator().manual_seed(1)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device, dtype)

    h = cfg.n_heads
    kd = cfg.gla_key_dim if letter == "G" else cfg.head_dim
    vd = cfg.head_dim
    rows = batch * (cfg.mom_memories + int(cfg.mom_shared_memory)) if letter == "M" else batch
    q, k = rand(1 if letter == "M" else batch, 1, h, kd), rand(1, 1, h, kd)
    kw: dict = {"initial_state": rand(rows, h, kd, vd).float(), "output_final_state": True}
    if letter == "M":  # every row's token routed to top_k memories and the shared one
        routed = batch * (cfg.mom_top_k + int(cfg.mom_shared_memory))
        q, k = rand(1, routed, h, kd), rand(1, routed, h, kd)
        lengths = torch.zeros(rows, dtype=torch.long)
        lengths[torch.randperm(rows, generator=gen)[:routed]] = 1
        kw["cu_seqlens"] = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(device)
    else:
        k = rand(batch, 1, h, kd)
    v = rand(*q.shape[:3], vd)
    k = torch.nn.functional.normalize(k.float(), dim=-1).to(dtype)
    if letter == "L":
        gates: tuple = (None,)
    elif letter == "G":
        gates = (-torch.rand(q.shape, generator=gen).to(device) / 16,)
    else:
        beta = torch.rand(q.shape[:3], generator=gen).to(device)
        gates = (beta, -torch.rand(q.shape[:3], generator=gen).to(device))
    return (q, k, v, *gates), kw


def bench_layer(args: argparse.Namespace, letter: str, batch: int, path: str) -> dict:
    cfg = load_preset(LAYER_PRESETS[letter], layers=letter)
    mixer = MIXERS[letter](cfg).to(args.device, args.dtype).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, cfg.d_model, generator=gen).to(args.device, args.dtype)
    use_path(path)
    state: dict = {}
    ids = torch.zeros(batch, 1, dtype=torch.long, device=args.device)  # the step's shape
    with torch.no_grad():
        mixer(x, DecodingContext(ids, state))  # a first token: the state has its shape

        def layer_step() -> None:
            mixer(x, DecodingContext(ids, state))

        layer_sec = seconds_per_call(layer_step, args.device, args.layer_steps)
        chunk_op = LAYER_OPS[letter]
        op = chunk_op if path == "chunk" else FUSED_RECURRENT_OPS[chunk_op]
        inputs, kw = _layer_inputs(letter, cfg, batch, args.device, args.dtype)
        op_sec = seconds_per_call(lambda: op(*inputs, **kw), args.device, args.layer_steps)
    return {
        "bench": "layer",
        "model": f"{letter} ({LAYER_PRESETS[letter]})",
        "batch": batch,
        "path": path,
        "tokens_per_s": batch / layer_sec,
        "op_ms": 1e3 * op_sec,
    }


def load_exported(spec: str, device: str, folder: Path):
    """The model of `spec` ("PRESET" or "PRESET:LAYERS"), randomly initialised, exported to
    `folder` and loaded back through transformers' Auto class."""
    import transformers

    name, _, layers = spec.partition(":")
    cfg = load_preset(name, **({"layers": layers} if layers else {}))
    HybridLM(cfg).save_pretrained(str(folder))
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    return model.to(device).eval()


class TokenClock:
    """A transformers streamer that notes when each put arrives: the prompt first, then each
    generated token."""

    def __init__(self, device: str) -> None:
        self.device, self.times = device, []

    def put(self, value: torch.Tensor) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def end(self) -> None:
        """Nothing: the times are read after generate returns."""


def bench_hf(args: argparse.Namespace, model, spec: str, prompt_len: int, batch: int) -> list:
    """ms per generated token through model.generate, with and without the cache: the time
    between the first new token (after the prefill) and the last, per token, best of 3."""
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompt = torch.randint(1, vocab, (batch, prompt_len), generator=gen).to(args.device)
    rows = []
    for use_cache in (True, False):
        per_token = []
        for _ in range(3):
            clock = TokenClock(args.device)
            model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),  # no padding, whatever the ids
                max_new_tokens=args.hf_new_tokens + 1,
                do_sample=False,
                use_cache=use_cache,
                pad_token_id=0,
                streamer=clock,
            )
            per_token.append((clock.times[-1] - clock.times[1]) / args.hf_new_tokens)
        rows.append(
            {
                "bench": "hf-generate",
                "model": spec,
                "prompt": prompt_len,
                "batch": batch,
                "cache": use_cache,
                "ms_per_token": 1e3 * min(per_token),
            }
        )
    return rows


def hf_table(rows: list[dict], title: str) -> Table:
    out = Table(title=title)
    for name in ("model", "prompt", "batch", "cache ms/token", "no cache ms/token", "speed-up"):
        out.add_column(name, justify="left" if name == "model" else "right")
    for cached, plain in zip(rows[::2], rows[1::2], strict=True):
        a, b = cached["ms_per_token"], plain["ms_per_token"]
        ratio = f"{b / a:.1f}x" if a > 0 else "-"
        out.add_row(
            cached["model"],
            str(cached["prompt"]),
            str(cached["batch"]),
            f"{a:.2f}",
            f"{b:.2f}",
            ratio,
        )
    return out


def run_hf(args: argparse.Namespace, console: Console) -> list[dict]:
    torch.set_grad_enabled(False)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows: list[dict] = []
    for spec in args.hf_models:
        with tempfile.TemporaryDirectory() as folder:
            model = load_exported(spec, args.device, Path(folder))
        for prompt_len in args.hf_prompts:
            for batch in args.batches:
                rows.extend(bench_hf(args, model, spec, prompt_len, batch))
                console.print(rows[-2:])
    console.print(hf_table(rows, f"transformers generate(), {args.device}: ms per new token"))
    return rows


SWEEP_SHAPES = {"tiny": (4, 16), "gdn-1.3b": (8, 256)}  # heads, head dim


def bench_sweep(args: argparse.Namespace, shape: str, tokens: int) -> dict:
    """The gated delta rule op alone on a [1, T] input from a state: where the token loop
    stops beating the chunk op (for FUSED_MAX_TOKENS)."""
    h, d = SWEEP_SHAPES[shape]
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, tokens, h, d, generator=gen).to(args.device) for _ in range(3))
    k = torch.nn.functional.normalize(k, dim=-1)
    beta = torch.rand(1, tokens, h, generator=gen).to(args.device)
    g = -torch.rand(1, tokens, h, generator=gen).to(args.device)
    s0 = torch.randn(1, h, d, d, generator=gen).to(args.device)
    row = {"bench": "sweep", "model": shape, "tokens": tokens}
    with torch.no_grad():
        ops = (chunk_gated_delta_rule, fused_recurrent_gated_delta_rule)
        for path, op in zip(PATHS, ops, strict=True):
            sec = seconds_per_call(
                lambda op=op: op(q, k, v, beta, g, initial_state=s0), args.device, 5
            )
            row[f"{path}_ms"] = 1e3 * sec
    return row


def table(rows: list[dict], title: str) -> Table:
    out = Table(title=title)
    for name in ("bench", "model", "batch", "chunk tok/s", "fused tok/s", "speed-up"):
        out.add_column(name, justify="left" if name in ("bench", "model") else "right")
    out.add_column("op ms chunk / fused", justify="right")
    keys = dict.fromkeys((r["bench"], r["model"], r["batch"]) for r in rows)
    for key in keys:
        by_path = {r["path"]: r for r in rows if (r["bench"], r["model"], r["batch"]) == key}
        rates = [by_path[p]["tokens_per_s"] if p in by_path else None for p in PATHS]
        cells = [f"{r:,.1f}" if r is not None else "-" for r in rates]
        ratio = f"{rates[1] / rates[0]:.1f}x" if None not in rates else "-"
        ops = [by_path[p].get("op_ms") for p in PATHS if p in by_path]
        op_cell = " / ".join(f"{ms:.3f}" for ms in ops if ms is not None) or "-"
        out.add_row(key[0], key[1], str(key[2]), *cells, ratio, op_cell)
    return out


def run_paths(args: argparse.Namespace, paths: tuple[str, ...], console: Console) -> list[dict]:
    rows = []
    for batch in args.batches:
        for path in paths:
            rows.append(bench_generate(args, batch, path))
            console.print(rows[-1])
    for letter in args.layers:
        for batch in args.batches:
            for path in paths:
                rows.append(bench_layer(args, letter, batch, path))
                console.print(rows[-1])
    dtype = str(args.dtype).removeprefix("torch.")
    console.print(table(rows, f"decoding, {args.device}, {dtype}: tokens/s"))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--path", choices=[*PATHS, "both"], default="both")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--layers", nargs="+", default=list(LAYER_PRESETS), help="L G D M")
    parser.add_argument("--prompt", type=int, default=8, help="prompt tokens for generate")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--layer-steps", type=int, default=10, help="timed steps per round")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's own)"
    )
    parser.add_argument(
        "--sweep",
        type=int,
        nargs="*",
        default=None,
        help="instead: the gated delta rule op alone at these T, chunk against fused",
    )
    parser.add_argument(
        "--hf", action="store_true", help="instead: transformers' generate(), cache or not"
    )
    parser.add_argument("--hf-models", nargs="+", default=["tiny", "tiny:LGDM"])
    parser.add_argument("--hf-prompts", type=int, nargs="+", default=[256, 4096])
    parser.add_argument("--hf-new-tokens", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    paths = PATHS if args.path == "both" else (args.path,)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    console = Console()
    if args.sweep is not None:
        sweep = Table(title=f"gated delta rule op, {args.device}: ms per call, chunk / fused")
        for name in ("shape", *map(str, args.sweep)):
            sweep.add_column(name if name == "shape" else f"T={name}", justify="right")
        results = []
        for shape in SWEEP_SHAPES:
            cells = []
            for t in args.sweep:
                results.append(bench_sweep(args, shape, t))
                cells.append(f"{results[-1]['chunk_ms']:.2f} / {results[-1]['fused_ms']:.2f}")
            sweep.add_row(shape, *cells)
        console.print(sweep)
        out = args.out or RESULTS / f"decode-sweep-{args.device}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"results": results}, indent=2))
        return
    rows = run_hf(args, console) if args.hf else run_paths(args, paths, console)
    out = args.out or RESULTS / f"decode{'-hf' if args.hf else ''}-{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: str(v) for k, v in vars(args).items()}
    config.update(
        torch=torch.__version__,
        date=date.today().isoformat(),
        machine=platform.processor() or platform.machine(),
        cpus=str(os.cpu_count()),
        threads=str(torch.get_num_threads()),
    )
    if args.device == "cuda":
        config["gpu"] = torch.cuda.get_device_name()
    out.write_text(json.dumps({"config": config, "results": rows}, indent=2))
    console.print(f"wrote {out}")
    if args.hf:
        plot_hf(rows, out.with_suffix(".png"))


def plot_hf(rows: list[dict], path: Path) -> None:
    """ms per generated token against the prompt's length: one panel per model, a line per
    batch size and cache setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for batch in sorted({r["batch"] for r in rows}):
            for cache in (True, False):
                line = [
                    r for r in rows if (r["model"], r["batch"], r["cache"]) == (model, batch, cache)
                ]
                prompts = [r["prompt"] for r in line]
                label = f"batch {batch}, {'cache' if cache else 'no cache'}"
                ax.plot(prompts, [r["ms_per_token"] for r in line], "o-", label=label)
        ax.set(
            title=model,
            xlabel="prompt tokens",
            ylabel="ms per new token",
            xscale="log",
            yscale="log",
        )
        ticks = sorted({r["prompt"] for r in rows})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
