"""The mesh, the sequence-parallel context, their errors, and per-layer communication
accounting."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from hyla.models import HybridLM, ModelConfig
from hyla.parallel import (
    ParallelDims,
    SequenceLayout,
    SequenceParallel,
    TrainingPolicy,
    parallelize,
)
from hyla.parallel.comm import TRACKER
from tests.kernels.cases import assert_close
from tests.parallel.launcher import run_distributed


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (
            dict(dp=2, sp=2, world_size=6),
            r"^world_size must equal dp x sp = 2 x 2 = 4, got 6$",
        ),
        (dict(dp=0, sp=2, world_size=0), r"^dp must be an integer >= 1, got 0$"),
        (dict(dp=1, sp=1.5, world_size=1), r"^sp must be an integer >= 1, got 1.5$"),
    ],
)
def test_parallel_dims_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ParallelDims(**kwargs)


def test_parallel_dims_from_world():
    assert ParallelDims.from_world(8, 4) == ParallelDims(dp=2, sp=4, world_size=8)
    with pytest.raises(
        ValueError,
        match=r"^sp must be an integer >= 1 that divides world_size = 6, got 4$",
    ):
        ParallelDims.from_world(6, 4)


def _errors(fn) -> str:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return ""


def _worker(rank: int, world: int, out_dir: str) -> None:
    out = {}
    mesh = ParallelDims.from_world(world, 2).build_mesh("cpu")
    out["sp_ranks"] = dist.get_process_group_ranks(mesh["sp"].get_group())
    out["dp_ranks"] = dist.get_process_group_ranks(mesh["dp"].get_group())
    out["wrong_world"] = _errors(lambda: ParallelDims(dp=1, sp=2, world_size=2).build_mesh())
    group = mesh["sp"].get_group()
    sp_rank = dist.get_rank(group)
    zigzag = SequenceParallel.even(40, group, layout="zigzag")
    out["zigzag"] = (zigzag.layout.pieces, zigzag.layout.runs(sp_rank))
    out["too_short"] = _errors(lambda: SequenceParallel.even(3, group, layout="zigzag"))
    out["spiral"] = _errors(lambda: SequenceParallel.even(40, group, layout="spiral"))
    out["mismatch"] = _errors(lambda: SequenceParallel(group, SequenceLayout.contiguous([5] * 3)))
    out["method"] = _errors(lambda: SequenceParallel(group, zigzag.layout, "ring"))
    out["ring_zigzag"] = _errors(lambda: SequenceParallel(group, zigzag.layout, "lasp1"))
    halves = SequenceLayout.contiguous([20, 20])
    ulysses = TrainingPolicy(SequenceParallel(group, halves, "ulysses"))
    mom = HybridLM(ModelConfig(layers="LM", d_model=16, n_heads=2, vocab_size=32))
    heads = HybridLM(ModelConfig(layers="LA", d_model=24, n_heads=3, attn_kv_heads=1))
    out["ulysses_mom"] = _errors(lambda: parallelize(mom, None, ulysses))
    out["ulysses_heads"] = _errors(lambda: parallelize(heads, None, ulysses))

    model = HybridLM(ModelConfig(layers="LDA", d_model=16, n_heads=2, vocab_size=32))
    ids = torch.randint(0, 32, (1, 40), generator=torch.Generator().manual_seed(0))
    parallelize(model, None, TrainingPolicy(zigzag))
    out["wrong_length"] = _errors(lambda: model(ids, ids))
    with torch.no_grad():  # decoding runs in this process whatever the model's strategy
        plain = HybridLM(ModelConfig(layers="LDA", d_model=16, n_heads=2, vocab_size=32))
        out["decoded"] = model.hidden_states(ids, model.new_states())[0]
        out["whole"] = plain.hidden_states(ids)[0]
    TRACKER.reset()
    model(zigzag.shard(ids), zigzag.shard(ids)).loss.backward()
    out["by_scope"] = {k: v["count"] for k, v in TRACKER.summary(by_scope=True).items()}
    torch.save(out, f"{out_dir}/rank{rank}.pt")


def test_mesh_context_and_accounting(tmp_path: Path):
    run_distributed(_worker, 4, tmp_path, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(4)]
    for rank, out in enumerate(ranks):
        assert out["sp_ranks"] == [rank // 2 * 2, rank // 2 * 2 + 1]  # sp innermost
        assert out["dp_ranks"] == [rank % 2, rank % 2 + 2]
        assert "ParallelDims.world_size=2 but the process group has 4 ranks" in out["wrong_world"]
        assert out["zigzag"] == ((10, 10, 10, 10), [0, 3] if rank % 2 == 0 else [1, 2])
        assert out["too_short"] == (
            "length must be >= the 4 pieces of a zigzag layout over group = 2 ranks, got 3"
        )
        assert out["spiral"] == "layout must be one of ('contiguous', 'zigzag'), got 'spiral'"
        assert out["mismatch"] == "layout must be over the 2 ranks of group, got one over 3"
        assert out["method"] == "method must be one of ('lasp2', 'lasp1', 'ulysses'), got 'ring'"
        assert out["ring_zigzag"] == (
            "method='lasp1' does not support a zigzag layout (the ring passes states in rank "
            "order); use layout='contiguous' or method='lasp2'"
        )
        assert out["ulysses_mom"] == (
            "method='ulysses' does not support MoM layers (each memory's routed tokens differ "
            "per rank); use method='lasp2' or 'lasp1'"
        )
        assert out["ulysses_heads"] == (
            "method='ulysses' needs every head count to divide by the sequence-parallel degree "
            "sp = 2, got head counts [3, 1]"
        )
        assert "input_ids must hold this rank's 20 tokens of the 40-token" in out["wrong_length"]
        assert_close("decoding a parallelized model", out["decoded"], out["whole"], tol=1e-5)
        # Forward and backward collectives land on the layer that issued them.
        assert out["by_scope"] == {
            "layer0.L/all_gather": 2,  # LASP-2: states forward, state gradients backward
            "layer1.D/all_gather": 4,  # the convolution halo, both ways, and LASP-2
            "layer2.A/all_gather": 1,  # K/V forward
            "layer2.A/reduce_scatter": 1,  # dK/dV backward
            "-/all_reduce": 1,  # the token count of the loss
        }
