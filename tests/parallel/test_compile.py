"""torch.compile as `parallelize` applies it (each block in place, after sequence
parallelism and activation checkpointing, before DDP / FSDP2): a compiled training step of a
tiny model with every layer type gives the eager step's loss and gradients, in one process
(with and without activation checkpointing) and on sp = 2 gloo ranks (LASP-2 zigzag with
checkpointing under FSDP2), where the collectives run eagerly between the compiled regions
and are accounted to the same layers.

The backend is aot_eager: it traces forward and backward through the custom ops' fake
implementations as inductor does, without generating code, which on a CPU takes minutes
per model (inductor on this model, per block as `parallelize` applies it, one process: 3.4
minutes for its first step on the 2-core VM with other work running, the loss equal to
eager's, gradients within 2.3e-6). Tolerance: the traced graphs run the eager
ops, with some decomposed (a reduction in another order), so results agree to fp32 round-off
on sums of a few hundred terms: 1e-5 relative to the reference's largest entry (measured:
2e-6 at most).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import DTensor

from hyla.models import HybridLM, ModelConfig
from hyla.parallel import ParallelDims, SequenceParallel, TrainingPolicy, parallelize
from hyla.parallel.comm import TRACKER
from tests.kernels.cases import assert_close
from tests.parallel.launcher import run_distributed

TOL = 1e-5
TOTAL = 150
CONFIG = dict(
    layers="LGDMA",
    linear_decay="scalar_gate",
    d_model=32,
    n_heads=2,
    vocab_size=64,
    init_std=0.1,
)
BACKEND = "aot_eager"
CHECKPOINT_WRAPPED = "._checkpoint_wrapped_module"


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 64, (2, TOTAL), generator=torch.Generator().manual_seed(0))
    return ids, torch.roll(ids, -1, 1)


def _step(mesh, sp: SequenceParallel | None, data_parallel: str, ckpt: bool, compile: bool):
    """Loss, gradients (by the bare model's names) and the collectives each layer ran
    (count and bytes)."""
    model = HybridLM(ModelConfig(activation_checkpointing=ckpt, **CONFIG))
    policy = TrainingPolicy(sp, data_parallel, compile=compile, compile_backend=BACKEND)
    module = parallelize(model, mesh, policy)
    ids, labels = _batch() if sp is None else (sp.shard(x) for x in _batch())
    TRACKER.reset()
    out = module(ids, labels)
    out.loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        grads[name.replace(CHECKPOINT_WRAPPED, "")] = grad
    comm = {k: (v["count"], v["bytes"]) for k, v in TRACKER.summary(by_scope=True).items()}
    compiled = all(block._compiled_call_impl is not None for block in model.blocks)
    assert compiled == compile, f"blocks compiled: {compiled}, asked: {compile}"
    return {"loss": out.loss.detach(), "grads": grads, "comm": comm}


def _compare(tag: str, compiled: dict, eager: dict) -> None:
    assert_close(f"{tag} loss", compiled["loss"], eager["loss"], TOL)
    assert compiled["grads"].keys() == eager["grads"].keys()
    for name, want in eager["grads"].items():
        assert_close(f"{tag} d{name}", compiled["grads"][name], want, TOL)
    assert compiled["comm"] == eager["comm"], f"{tag}: collectives {compiled['comm']}"


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "checkpointed"])
def test_compiled_step_equals_eager_in_one_process(ckpt: bool):
    eager, compiled = (_step(None, None, "ddp", ckpt, compile) for compile in (False, True))
    _compare("one process", compiled, eager)
    assert compiled["comm"] == {}  # nothing to exchange


RUNS = [("fsdp", True)]  # (data parallel, checkpointing): FSDP2's hooks around compiled blocks


def _worker(rank: int, world: int, out_dir: str) -> None:
    mesh = ParallelDims(dp=1, sp=world, world_size=world).build_mesh("cpu")
    sp = SequenceParallel.even(TOTAL, mesh.get_group("sp"), "lasp2", "zigzag")
    results = {
        (dp, ckpt, compile): _step(mesh, sp, dp, ckpt, compile)
        for dp, ckpt in RUNS
        for compile in (False, True)
    }
    torch.save(results, f"{out_dir}/rank{rank}.pt")


def test_compiled_step_equals_eager_under_sequence_parallelism(tmp_path: Path):
    run_distributed(_worker, 2, tmp_path, str(tmp_path))
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for dp, ckpt in RUNS:
            tag = f"sp2 rank {rank} {dp}{' checkpointed' if ckpt else ''}"
            eager = results[dp, ckpt, False]
            assert any(key.startswith("layer") for key in eager["comm"]), tag
            _compare(tag, results[dp, ckpt, True], eager)


def test_unknown_compile_backend_is_refused():
    with pytest.raises(
        ValueError,
        match=r"compile_backend must be a torch.compile backend, .*"
        r"got 'nope'",
    ):
        TrainingPolicy(compile=True, compile_backend="nope")
