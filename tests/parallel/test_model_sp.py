"""A hybrid model with every mixer type under W sequence-parallel ranks equals one process:
the loss, the MoM balance loss and every parameter's gradient (summed over ranks, as the
trainer does), for contiguous and zigzag layouts with pieces down to one token (shorter than
the convolution halo), and each method on the layouts it supports."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from hyla.models import HybridLM, ModelConfig
from hyla.parallel import SequenceLayout, SequenceParallel, TrainingPolicy, parallelize
from tests.kernels.cases import assert_close
from tests.parallel.launcher import run_distributed

TOTAL = 100
LAYOUTS = {  # (world, kind) -> a layout of 100 tokens
    (1, "contiguous"): SequenceLayout.contiguous([100]),
    (2, "contiguous"): SequenceLayout.contiguous([60, 40]),
    (3, "contiguous"): SequenceLayout.contiguous([1, 64, 35]),
    # one piece (2 tokens) shorter than the convolution halo (3)
    (4, "contiguous"): SequenceLayout.contiguous([30, 2, 40, 28]),
    (2, "zigzag"): SequenceLayout.zigzag([30, 1, 40, 29]),
    (3, "zigzag"): SequenceLayout.zigzag([1, 20, 2, 30, 1, 46]),
    (4, "zigzag"): SequenceLayout.zigzag([10, 1, 2, 17, 30, 1, 25, 14]),
}
CONFIGS = {
    "every-mixer": dict(layers="LGDMA", linear_decay="scalar_gate", n_heads=2, attn_kv_heads=1),
    "plain-and-const": dict(
        layers="LALM",
        linear_decay="constant",
        mom_shared_memory=False,
        n_heads=2,
        attn_kv_heads=1,
    ),
    # Recomputation in backward re-issues the forward collectives, in the same order on all ranks.
    "checkpointed": dict(
        layers="LGDMA",
        linear_decay="scalar_gate",
        n_heads=2,
        attn_kv_heads=1,
        activation_checkpointing=True,
    ),
    # Ulysses splits heads over ranks (every head count divisible by W) and has no MoM.
    "no-mom": dict(layers="LGDA", linear_decay="scalar_gate", n_heads=4, attn_kv_heads=4),
}
RUNS = [  # (config, layout kind, parallel.sp_method)
    ("every-mixer", "contiguous", "lasp2"),
    ("every-mixer", "zigzag", "lasp2"),
    ("plain-and-const", "zigzag", "lasp2"),
    ("checkpointed", "zigzag", "lasp2"),
    ("every-mixer", "contiguous", "lasp1"),
    ("no-mom", "contiguous", "ulysses"),
]


def _runs(world: int) -> list[tuple[str, str, str]]:
    return [
        (c, kind, m)
        for c, kind, m in RUNS
        if (world, kind) in LAYOUTS and (m != "ulysses" or 4 % world == 0)
    ]


def _model(name: str) -> HybridLM:
    return HybridLM(ModelConfig(d_model=32, vocab_size=64, init_std=0.1, **CONFIGS[name]))


def _batch():
    ids = torch.randint(0, 64, (2, TOTAL), generator=torch.Generator().manual_seed(0))
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    labels[0, 10:20] = -100  # masked positions change the token count
    return ids, labels


def _worker(rank: int, world: int, out_dir: str) -> None:
    ids, labels = _batch()
    results = {}
    for name, kind, method in _runs(world):
        sp = SequenceParallel(dist.group.WORLD, LAYOUTS[world, kind], method)
        model = parallelize(_model(name), None, TrainingPolicy(sp))
        out = model(sp.shard(ids), sp.shard(labels))
        out.loss.backward()
        results[name, kind, method] = {
            "loss": out.loss.detach(),
            "aux": out.aux_loss.detach(),
            "grads": [p.grad for p in model.parameters()],  # checkpoint wrappers rename
        }
    torch.save(results, f"{out_dir}/rank{rank}.pt")


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_model_under_sequence_parallelism(world: int, tmp_path: Path):
    run_distributed(_worker, world, tmp_path, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    ids, labels = _batch()
    for name, kind, method in _runs(world):
        model = _model(name)
        out = model(ids, labels)
        out.loss.backward()
        run, tag = (name, kind, method), f"{name}/{kind}/{method} W={world}"
        assert_close(f"{tag} loss", sum(r[run]["loss"] for r in ranks), out.loss.detach())
        assert_close(f"{tag} aux", sum(r[run]["aux"] for r in ranks), out.aux_loss.detach())
        for i, (pname, p) in enumerate(model.named_parameters()):
            assert_close(f"{tag} d{pname}", sum(r[run]["grads"][i] for r in ranks), p.grad)
