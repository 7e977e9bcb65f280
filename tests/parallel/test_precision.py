"""bf16 training under sequence parallelism: one step of a hybrid model (every kernel family
and softmax attention) on 2 gloo ranks, in fp32 and under bf16 autocast as the trainer runs
it, for LASP-2 (contiguous and zigzag), the LASP-1 ring and Ulysses, at 1 and 2 torch
threads per rank (with one thread the kernels run on the autocast thread itself).

bf16 must run, its loss must match fp32's, and its gradients (summed over ranks, as the
trainer does) must match one process's bf16 gradients. A counting dispatch mode checks on
the way that every kernel call of the step goes through one of the `hyla::` custom ops.
"""

from __future__ import annotations

import importlib
import os
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from hyla.models import HybridLM, ModelConfig
from hyla.parallel import SequenceParallel, TrainingPolicy, parallelize
from tests.parallel.launcher import run_distributed

WORLD = 2
TOTAL = 150  # 75-token contiguous pieces cross a 64-token chunk boundary
THREADS = (1, 2)
RUNS = [
    ("contiguous", "lasp2"),
    ("zigzag", "lasp2"),
    ("contiguous", "lasp1"),
    ("contiguous", "ulysses"),
]
PRECISIONS = ("fp32", "bf16")
# Every chunk family and softmax attention; head counts divisible by the 2 ranks for Ulysses.
CONFIG = dict(
    layers="LGDA",
    linear_decay="scalar_gate",
    d_model=32,
    n_heads=2,
    attn_kv_heads=2,
    vocab_size=64,
    init_std=0.1,
)
FAMILIES = ("linear_attn", "gla", "gated_delta_rule", "attention")

# Tolerances, relative to the reference's largest magnitude. bf16 keeps 8 significant bits:
# one rounding is off by up to u = 2^-8 ~ 3.9e-3 relative.
# The loss is the mean of 300 per-token losses, each moved by a few roundings of u in
# either direction by the bf16 matmuls under autocast; their mean stays well within one u
# (about 1e-4 measured).
LOSS_TOL = 2**-8
# sp 2 and one process round the same bf16 products, but not all at the same places: the
# fp32 sums are cut at other boundaries (pieces, chunks), so a different handful of values
# round the other way, and LASP-2 rounds its zero-state output to bf16 before adding the
# carried state's part. A gradient that is a long sum with cancellation (a gate's bias)
# magnifies such O(u) differences, as it does bf16's own: on this model one process's bf16
# gradients are up to 5e-2 from its fp32 ones, sp 2's up to 4e-2 from one process's bf16
# (measured). 1e-1 (~25 u) bounds both with a margin; a lost carry or a wrong piece order
# is off by O(1).
GRAD_TOL = 1e-1


def _model() -> HybridLM:
    return HybridLM(ModelConfig(**CONFIG))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 64, (2, TOTAL), generator=torch.Generator().manual_seed(0))
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    return ids, labels


def _step(model: HybridLM, ids, labels, precision: str) -> dict:
    with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
        out = model(ids, labels)
    out.loss.backward()
    return {
        "loss": out.loss.detach().float(),
        "grads": {n: p.grad.float() for n, p in model.named_parameters()},
    }


class KernelCalls(TorchDispatchMode):
    """Counts the `hyla::` custom ops dispatched, and (patched in) the calls of each
    family's PyTorch implementation: equal counts mean no kernel call bypassed the ops (an
    op's body runs outside the mode, so the kernels' own calls are not seen twice)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.kernels: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "hyla":
            self.ops[func.name().split("::")[1].split(".")[0]] += 1
        return func(*args, **(kwargs or {}))

    def patch_kernels(self) -> None:
        """Count each family's implementation calls (for good: a spawned rank's process)."""
        for family in FAMILIES:
            module = importlib.import_module(f"hyla.kernels.{family}.torch_chunk")
            for direction in ("forward", "backward"):
                counted = self._counting(getattr(module, direction), family, direction)
                setattr(module, direction, counted)

    def _counting(self, fn, family: str, direction: str):
        def counted(*args, **kwargs):
            self.kernels[f"{family}_{direction}"] += 1
            return fn(*args, **kwargs)

        return counted


def _worker(rank: int, world: int, out_dir: str) -> None:
    os.environ["HYLA_KERNEL_BACKEND"] = "torch"  # the implementations KernelCalls counts
    ids, labels = _batch()
    calls = KernelCalls()
    calls.patch_kernels()
    results = {}
    for threads in THREADS:
        torch.set_num_threads(threads)
        for kind, method in RUNS:
            sp = SequenceParallel.even(TOTAL, dist.group.WORLD, method, kind)
            for precision in PRECISIONS:
                model = parallelize(_model(), None, TrainingPolicy(sp))
                with calls:
                    results[threads, kind, method, precision] = _step(
                        model, sp.shard(ids), sp.shard(labels), precision
                    )
    assert calls.kernels and calls.ops == calls.kernels, (
        f"kernel calls outside the hyla:: ops: ops {dict(calls.ops)}, kernels {dict(calls.kernels)}"
    )
    assert set(calls.kernels) == {f"{f}_{d}" for f in FAMILIES for d in ("forward", "backward")}
    torch.save(results, f"{out_dir}/rank{rank}.pt")


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-6)).item()


def test_bf16_under_sequence_parallelism(tmp_path: Path):
    run_distributed(_worker, WORLD, tmp_path, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    ids, labels = _batch()
    before = torch.get_num_threads()
    try:
        for threads in THREADS:
            torch.set_num_threads(threads)
            single = _step(_model(), ids, labels, "bf16")
            for kind, method in RUNS:
                tag = f"{kind}/{method} threads={threads}"
                loss = {
                    p: sum(r[threads, kind, method, p]["loss"] for r in ranks) for p in PRECISIONS
                }
                assert torch.isfinite(loss["bf16"]), f"{tag}: bf16 loss {loss['bf16']}"
                err = _relative_error(loss["bf16"], loss["fp32"])
                assert err <= LOSS_TOL, f"{tag}: bf16 loss off fp32's by {err:.3g} relative"
                for name, expected in single["grads"].items():
                    got = sum(r[threads, kind, method, "bf16"]["grads"][name] for r in ranks)
                    err = _relative_error(got, expected)
                    assert err <= GRAD_TOL, f"{tag}: d{name} off one process's by {err:.3g}"
    finally:
        torch.set_num_threads(before)
