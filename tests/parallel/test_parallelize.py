"""`parallelize` applies its policies in the documented order (comm scopes on the bare
blocks, checkpoint wrappers inside the FSDP units, DDP outermost), and on a dp = 2 x sp = 2
mesh the gradients come out summed over sp and averaged over dp: those of the whole batch's
mean loss in one process."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from hyla.models import HybridLM, ModelConfig
from hyla.parallel import ParallelDims, SequenceParallel, TrainingPolicy, parallelize
from tests.kernels.cases import assert_close
from tests.parallel.launcher import run_distributed

CONFIG = dict(
    layers="LA", d_model=32, n_heads=2, vocab_size=64, init_std=0.1, activation_checkpointing=True
)
ROWS, LENGTH = 4, 32  # dp rank d holds rows 2d and 2d + 1, each split over the sp ranks


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 64, (ROWS, LENGTH), generator=torch.Generator().manual_seed(0))
    return ids, torch.roll(ids, -1, 1)  # no ignored labels: every dp rank counts as many


def _structure(module: torch.nn.Module, model: HybridLM) -> dict[str, bool]:
    inner = [block._checkpoint_wrapped_module for block in model.blocks]
    return {
        "ddp_outermost": isinstance(module, DistributedDataParallel) and module.module is model,
        "root_sharded": isinstance(model, FSDPModule),
        "blocks_checkpointed": all(isinstance(b, CheckpointWrapper) for b in model.blocks),
        "blocks_sharded": all(isinstance(b, FSDPModule) for b in model.blocks),
        "inner_sharded": any(isinstance(b, FSDPModule) for b in inner),
        "inner_scoped": all(getattr(b, "_hyla_comm_scope", None) for b in inner),
    }


def _full(grad: torch.Tensor) -> torch.Tensor:
    return grad.full_tensor() if isinstance(grad, DTensor) else grad


def _worker(rank: int, world: int, out_dir: str) -> None:
    mesh = ParallelDims(dp=2, sp=2, world_size=world).build_mesh("cpu")
    sp = SequenceParallel.even(LENGTH, mesh.get_group("sp"))
    rows = slice(2 * mesh.get_local_rank("dp"), 2 * mesh.get_local_rank("dp") + 2)
    ids, labels = (sp.shard(x[rows]) for x in _batch())
    results = {}
    for data_parallel in ("ddp", "fsdp"):
        model = HybridLM(ModelConfig(**CONFIG)).train()
        module = parallelize(model, mesh, TrainingPolicy(sp, data_parallel))
        module(ids, labels).loss.backward()
        results[data_parallel] = {
            "structure": _structure(module, model),
            "grads": [_full(p.grad) for p in model.parameters()],
        }
    torch.save(results, f"{out_dir}/rank{rank}.pt")


def test_policies_in_order_and_gradients_summed_over_sp_averaged_over_dp(tmp_path: Path):
    run_distributed(_worker, 4, tmp_path, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(4)]
    whole = HybridLM(ModelConfig(**CONFIG)).train()
    whole(*_batch()).loss.backward()
    for data_parallel in ("ddp", "fsdp"):
        fsdp = data_parallel == "fsdp"
        for r in ranks:
            assert r[data_parallel]["structure"] == {
                "ddp_outermost": not fsdp,
                "root_sharded": fsdp,
                "blocks_checkpointed": True,
                "blocks_sharded": fsdp,
                "inner_sharded": False,  # the checkpoint wrapper is inside the FSDP unit
                "inner_scoped": True,  # sequence parallelism's hooks sit on the bare block
            }
            grads = r[data_parallel]["grads"]
            for (name, p), got in zip(whole.named_parameters(), grads, strict=True):
                assert_close(f"{data_parallel} d{name}", got, p.grad)
