"""LASP-2H attention on real gloo processes equals single-process attention."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from hyla.kernels.attention import flash_attention
from hyla.parallel import lasp2h_attention
from hyla.parallel.comm import TRACKER
from tests.kernels.cases import assert_close
from tests.parallel.launcher import run_distributed

SHARDS = {1: [90], 2: [50, 40], 3: [1, 60, 29], 4: [30, 1, 35, 24]}
CONFIGS = [  # (causal, query heads, kv heads)
    (True, 4, 2),
    (True, 2, 2),
    (False, 4, 1),
]


def _inputs(total: int, hq: int, hkv: int):
    gen = torch.Generator().manual_seed(hq * 10 + hkv)
    q = torch.randn(2, total, hq, 16, generator=gen)
    k, v = (
        torch.randn(2, total, hkv, 16, generator=gen),
        torch.randn(2, total, hkv, 16, generator=gen),
    )
    return q, k, v, torch.randn(2, total, hq, 16, generator=gen)


def _worker(rank: int, world: int, out_dir: str) -> None:
    lengths = SHARDS[world]
    start, end = sum(lengths[:rank]), sum(lengths[: rank + 1])
    results = {}
    for causal, hq, hkv in CONFIGS:
        q, k, v, w = _inputs(sum(lengths), hq, hkv)
        leaves = [x[:, start:end].clone().requires_grad_() for x in (q, k, v)]
        TRACKER.reset()
        o = lasp2h_attention(*leaves, group=dist.group.WORLD, causal=causal, shard_lengths=lengths)
        (o * w[:, start:end]).sum().backward()
        results[(causal, hq, hkv)] = {
            "o": o.detach(),
            "grads": [x.grad for x in leaves],
            "log": [r.op for r in TRACKER.records],
        }
    # Without shard_lengths the lengths are exchanged first; the result is the same.
    q, k, v, _ = _inputs(sum(lengths), 4, 2)
    o = lasp2h_attention(*(x[:, start:end] for x in (q, k, v)), group=dist.group.WORLD)
    results["no-lengths"] = o
    torch.save(results, f"{out_dir}/rank{rank}.pt")


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_lasp2h_matches_single_process(world: int, tmp_path: Path):
    run_distributed(_worker, world, tmp_path, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for causal, hq, hkv in CONFIGS:
        q, k, v, w = _inputs(sum(SHARDS[world]), hq, hkv)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        want = flash_attention(*leaves, causal=causal)
        (want * w).sum().backward()
        name = f"causal={causal} hq={hq} hkv={hkv} W={world}"
        got = torch.cat([r[(causal, hq, hkv)]["o"] for r in ranks], 1)
        assert_close(f"{name} o", got, want.detach())
        for i, leaf in enumerate(leaves):
            got = torch.cat([r[(causal, hq, hkv)]["grads"][i] for r in ranks], 1)
            assert_close(f"{name} grad {'qkv'[i]}", got, leaf.grad)
        for r in ranks:
            assert r[(causal, hq, hkv)]["log"] == ["all_gather", "reduce_scatter"]
    got = torch.cat([r["no-lengths"] for r in ranks], 1)
    assert_close(
        "without shard_lengths", got, flash_attention(*_inputs(sum(SHARDS[world]), 4, 2)[:3])
    )
