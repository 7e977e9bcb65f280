"""LASP-2H attention on real gloo processes equals single-process attention, for contiguous
and zigzag layouts with pieces down to one token: one all-gather forward, one
reduce-scatter backward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from hyla.kernels.attention import flash_attention
from hyla.parallel import SequenceLayout, lasp2h_attention
from hyla.parallel.comm import TRACKER
from tests.kernels.cases import assert_close
from tests.parallel.launcher import run_distributed, whole_sequence

LAYOUTS = {  # world -> layouts of 90 tokens
    1: [SequenceLayout.contiguous([90])],
    2: [SequenceLayout.contiguous([50, 40]), SequenceLayout.zigzag([30, 1, 20, 39])],
    3: [SequenceLayout.contiguous([1, 60, 29]), SequenceLayout.zigzag([10, 1, 30, 1, 20, 28])],
    4: [
        SequenceLayout.contiguous([30, 1, 35, 24]),
        SequenceLayout.zigzag([10, 1, 15, 9, 20, 1, 20, 14]),
    ],
}
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
    results = {}
    for i, layout in enumerate(LAYOUTS[world]):
        for causal, hq, hkv in CONFIGS:
            q, k, v, w = _inputs(90, hq, hkv)
            leaves = [layout.shard(x, rank).clone().requires_grad_() for x in (q, k, v)]
            TRACKER.reset()
            o = lasp2h_attention(*leaves, group=dist.group.WORLD, causal=causal, layout=layout)
            (o * layout.shard(w, rank)).sum().backward()
            results[i, causal, hq, hkv] = {
                "o": o.detach(),
                "grads": [x.grad for x in leaves],
                "log": [r.op for r in TRACKER.records],
            }
    # Without a layout the pieces are contiguous and their lengths are exchanged first.
    layout = LAYOUTS[world][0]
    q, k, v, _ = _inputs(90, 4, 2)
    o = lasp2h_attention(*(layout.shard(x, rank) for x in (q, k, v)), group=dist.group.WORLD)
    results["no-layout"] = o
    torch.save(results, f"{out_dir}/rank{rank}.pt")


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_lasp2h_matches_single_process(world: int, tmp_path: Path):
    run_distributed(_worker, world, tmp_path, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for i, layout in enumerate(LAYOUTS[world]):
        for causal, hq, hkv in CONFIGS:
            q, k, v, w = _inputs(90, hq, hkv)
            leaves = [x.clone().requires_grad_() for x in (q, k, v)]
            want = flash_attention(*leaves, causal=causal)
            (want * w).sum().backward()
            run = (i, causal, hq, hkv)
            name = f"{layout.kind} causal={causal} hq={hq} hkv={hkv} W={world}"
            assert_close(f"{name} o", whole_sequence(layout, [r[run]["o"] for r in ranks]), want)
            for j, leaf in enumerate(leaves):
                got = whole_sequence(layout, [r[run]["grads"][j] for r in ranks])
                assert_close(f"{name} grad {'qkv'[j]}", got, leaf.grad)
            for r in ranks:
                assert r[run]["log"] == ["all_gather", "reduce_scatter"]
    got = whole_sequence(LAYOUTS[world][0], [r["no-layout"] for r in ranks])
    assert_close("without a layout", got, flash_attention(*_inputs(90, 4, 2)[:3]))
