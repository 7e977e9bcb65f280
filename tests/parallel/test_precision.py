"""The precision matrix: one training step of a hybrid model (every kernel family, MoM and
softmax attention) in fp32 and under bf16 autocast, as the trainer runs it (`parallelize` on
the (dp, sp) mesh, DDP or FSDP2 over it), on every parallel path, each at 1 and 2 torch
threads per rank (with one thread the kernels run on the autocast thread itself):

- no parallelism (one process, this test's own);
- sp 2: LASP-2 contiguous and zigzag, the LASP-1 ring, Ulysses;
- dp 2 with DDP and with FSDP2;
- activation checkpointing on: one process, sp 2 LASP-2 zigzag, dp 2 FSDP2.

The parallel runs share one pair of gloo ranks. bf16 must run, its loss must equal fp32's,
and its gradients must equal one process's bf16 gradients; the fp32 runs must equal one
process's fp32 losses and gradients, which is what catches a bug that bf16 and fp32 share
(a dropped piece, a lost carry). A counting dispatch mode checks on the way that every
kernel call of the parallel steps goes through one of the `hyla::` custom ops.

Tolerances (relative to the reference's largest magnitude), from the spread measured on this
model (the largest over every path and thread count) and what a real bug does. bf16 keeps 8
significant bits: one rounding is off by up to u = 2^-8 ~ 3.9e-3 relative.

- LOSS_TOL = u / 16 ~ 2.4e-4: bf16 loss against the same path's fp32 loss, and against one
  process's bf16 loss. The loss is the mean of 300 per-token cross-entropies, each moved by
  O(u) by the bf16 matmuls under autocast, in either direction, so their mean moves by
  about u / sqrt(300) ~ u / 17. Measured: 6.7e-5 against fp32, 4.5e-5 against one process.
- FP32_TOL = 1e-5: fp32 losses and gradients against one process's, the same products
  summed in another order (pieces, chunks, all-reduce). Measured: 1.1e-7 and 3.1e-6.
- GRAD_TOL = 1e-1 (~25 u): bf16 gradients against one process's bf16 gradients. The paths
  round the same bf16 products, but not all at the same places: fp32 sums are cut at other
  boundaries (pieces, chunks), so a different handful of values round the other way, and
  LASP-2 rounds its zero-state output to bf16 before adding the carried state's part. A
  gradient that is a long sum with cancellation (a gate's bias) magnifies such O(u)
  differences as it magnifies bf16's own: one process's bf16 gradients are up to 5.6e-2
  from its fp32 ones, a parallel path's up to 4.4e-2 from one process's bf16 ones
  (measured; LASP-2 zigzag, which rounds at the most places).

Breaking LASP-2 on purpose shows what the tolerances catch: a piece dropped from the
state's composition moves bf16 gradients by 3.8 to 6.7 and the bf16 loss by 1.8e-3 to
4.8e-3; a lost carried state moves them by 6.7 to 76 and the loss by 6e-4 to 4.8e-3; the fp32
checks fail as well. MoM routes every token to both of its 2 memories here: with top-k of
more memories, bf16 flips the routing of a token near the boundary, a discontinuity (0.23 in
a memory's gradients) that no tolerance separates from a bug.
"""

from __future__ import annotations

import importlib
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from hyla.models import HybridLM, ModelConfig
from hyla.parallel import ParallelDims, SequenceParallel, TrainingPolicy, parallelize
from tests.parallel.launcher import run_distributed

WORLD = 2
TOTAL = 150  # 75-token contiguous pieces cross a 64-token chunk boundary
ROWS = 2  # dp rank d holds row d
THREADS = (1, 2)
PRECISIONS = ("fp32", "bf16")
# Every chunk family, MoM and softmax attention; head counts divisible by the 2 ranks for
# Ulysses, which runs without MoM (it does not support it). MoM routes every token to both
# its memories (see the tolerances), and its balance loss is off: it is computed per dp
# rank, so under dp it is not the whole batch's (README, resuming).
CONFIG = dict(
    linear_decay="scalar_gate",
    d_model=32,
    n_heads=2,
    attn_kv_heads=2,
    vocab_size=64,
    init_std=0.1,
    mom_memories=2,
    mom_top_k=2,
    mom_aux_weight=0.0,
)
FAMILIES = ("linear_attn", "gla", "gated_delta_rule", "attention")
CHECKPOINT_WRAPPED = "._checkpoint_wrapped_module"

LOSS_TOL = 2**-8 / 16
FP32_TOL = 1e-5
GRAD_TOL = 1e-1


@dataclass(frozen=True)
class Run:
    """One parallel path: sp 2 with a method and layout, or dp 2 with DDP or FSDP2."""

    name: str
    sp_method: str | None = None
    layout: str = "contiguous"
    data_parallel: str = "ddp"
    checkpointing: bool = False

    @property
    def layers(self) -> str:
        return "LGDA" if self.sp_method == "ulysses" else "LGDMA"


RUNS = (
    Run("sp2 lasp2 contiguous", "lasp2"),
    Run("sp2 lasp2 zigzag", "lasp2", "zigzag"),
    Run("sp2 ring", "lasp1"),
    Run("sp2 ulysses", "ulysses"),
    Run("dp2 ddp"),
    Run("dp2 fsdp", data_parallel="fsdp"),
    Run("sp2 lasp2 zigzag checkpointed", "lasp2", "zigzag", checkpointing=True),
    Run("dp2 fsdp checkpointed", data_parallel="fsdp", checkpointing=True),
)


def _model(layers: str, checkpointing: bool) -> HybridLM:
    return HybridLM(ModelConfig(layers=layers, activation_checkpointing=checkpointing, **CONFIG))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 64, (ROWS, TOTAL), generator=torch.Generator().manual_seed(0))
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    return ids, labels


def _full(grad: torch.Tensor) -> torch.Tensor:
    return grad.full_tensor() if isinstance(grad, DTensor) else grad


def _step(model: HybridLM, module: torch.nn.Module, ids, labels, precision: str) -> dict:
    """Forward and backward of the trainer's step: the loss is this rank's cross-entropy
    sum and token count (the trainer sums both over the world), the gradients the model's,
    by the parameter names of the bare model."""
    with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
        out = module(ids, labels)
    out.loss.backward()
    return {
        "terms": torch.stack([out.ce_sum.detach().double(), out.n_tokens.double()]),
        "grads": {
            n.replace(CHECKPOINT_WRAPPED, ""): _full(p.grad).float()
            for n, p in model.named_parameters()
        },
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


def _parallel_step(run: Run, meshes: dict, ids, labels, precision: str) -> dict:
    """One step of `run` on this rank; the loss summed over the world, as the trainer does."""
    sp_mesh = run.sp_method is not None
    mesh = meshes["sp" if sp_mesh else "dp"]
    sp = None
    if sp_mesh:
        group = mesh.get_group("sp")
        sp = SequenceParallel.even(TOTAL, group, run.sp_method, run.layout)
        ids, labels = sp.shard(ids), sp.shard(labels)
    else:
        row = slice(mesh.get_local_rank("dp"), mesh.get_local_rank("dp") + 1)
        ids, labels = ids[row], labels[row]
    model = _model(run.layers, run.checkpointing)
    module = parallelize(model, mesh, TrainingPolicy(sp, run.data_parallel))
    result = _step(model, module, ids, labels, precision)
    dist.all_reduce(result["terms"])
    ce_sum, n_tokens = result["terms"].tolist()
    return {"loss": ce_sum / n_tokens, "grads": result["grads"]}


def _worker(rank: int, world: int, out_dir: str) -> None:
    os.environ["HYLA_KERNEL_BACKEND"] = "torch"  # the implementations KernelCalls counts
    meshes = {
        "sp": ParallelDims(dp=1, sp=world, world_size=world).build_mesh("cpu"),
        "dp": ParallelDims(dp=world, sp=1, world_size=world).build_mesh("cpu"),
    }
    ids, labels = _batch()
    calls = KernelCalls()
    calls.patch_kernels()
    results = {}
    for threads in THREADS:
        torch.set_num_threads(threads)
        for run in RUNS:
            for precision in PRECISIONS:
                with calls:
                    result = _parallel_step(run, meshes, ids, labels, precision)
                results[threads, run.name, precision] = result
    assert calls.kernels and calls.ops == calls.kernels, (
        f"kernel calls outside the hyla:: ops: ops {dict(calls.ops)}, kernels {dict(calls.kernels)}"
    )
    assert set(calls.kernels) == {f"{f}_{d}" for f in FAMILIES for d in ("forward", "backward")}
    if rank == 0:  # every rank holds the same losses and (all-reduced) gradients
        torch.save(results, f"{out_dir}/rank0.pt")


def _relative_error(actual, expected) -> float:
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-6)).item()


def _single_step(layers: str, checkpointing: bool, precision: str) -> dict:
    """One process, the whole batch: the reference."""
    model = _model(layers, checkpointing)
    module = parallelize(model, None, TrainingPolicy())
    result = _step(model, module, *_batch(), precision)
    ce_sum, n_tokens = result["terms"].tolist()
    return {"loss": ce_sum / n_tokens, "grads": result["grads"]}


def _check(tag: str, got: dict, reference: dict[str, dict]) -> None:
    """`got[precision]` against its own fp32 loss, and against `reference[precision]`,
    one process's step."""
    assert torch.isfinite(torch.tensor(got["bf16"]["loss"])), f"{tag}: bf16 loss not finite"
    err = _relative_error(got["bf16"]["loss"], got["fp32"]["loss"])
    assert err <= LOSS_TOL, f"{tag}: bf16 loss off fp32's by {err:.3g} relative"
    for precision, loss_tol, grad_tol in (
        ("fp32", FP32_TOL, FP32_TOL),
        ("bf16", LOSS_TOL, GRAD_TOL),
    ):
        expected, step = reference[precision], got[precision]
        err = _relative_error(step["loss"], expected["loss"])
        assert err <= loss_tol, f"{tag}: {precision} loss off one process's by {err:.3g}"
        assert step["grads"].keys() == expected["grads"].keys(), tag
        for name, want in expected["grads"].items():
            err = _relative_error(step["grads"][name], want)
            assert err <= grad_tol, f"{tag}: {precision} d{name} off one process's by {err:.3g}"


def test_precision_matrix(tmp_path: Path):
    run_distributed(_worker, WORLD, tmp_path, str(tmp_path))
    parallel = torch.load(tmp_path / "rank0.pt")
    before = torch.get_num_threads()
    try:
        for threads in THREADS:
            torch.set_num_threads(threads)
            single = {
                (layers, ckpt, p): _single_step(layers, ckpt, p)
                for layers, ckpt in {(run.layers, False) for run in RUNS} | {("LGDMA", True)}
                for p in PRECISIONS
            }
            reference = {p: single["LGDMA", False, p] for p in PRECISIONS}
            # no parallelism: bf16 against fp32; checkpointing against none
            _check(f"one process threads={threads}", reference, reference)
            checkpointed = {p: single["LGDMA", True, p] for p in PRECISIONS}
            _check(f"one process checkpointed threads={threads}", checkpointed, reference)
            for run in RUNS:
                got = {p: parallel[threads, run.name, p] for p in PRECISIONS}
                expected = {p: single[run.layers, False, p] for p in PRECISIONS}
                _check(f"{run.name} threads={threads}", got, expected)
    finally:
        torch.set_num_threads(before)
