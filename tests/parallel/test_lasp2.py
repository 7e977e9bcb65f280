"""LASP-2 on real gloo processes equals the single-process chunk op on the whole sequence."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from hyla.parallel import lasp2_gated_delta_rule, lasp2_gla, lasp2_linear_attn
from hyla.parallel.comm import TRACKER
from tests.kernels.cases import CASES, assert_close
from tests.parallel.launcher import run_distributed

LASP2 = {
    "linear": lasp2_linear_attn,
    "gla": lasp2_gla,
    "deltanet": lasp2_gated_delta_rule,
    "gdn": lasp2_gated_delta_rule,
}
H, K, V = 2, 16, 24
SHARDS = {1: [150], 2: [83, 67], 3: [1, 70, 79], 4: [40, 1, 64, 45]}


def _lasp2_for(case) -> callable:
    return LASP2[case.name.split("-")[0]]


def _inputs(case, total: int):
    inputs = case.inputs(2, total, H, K, V, seed=total)
    weight = torch.randn(2, total, H, V, generator=torch.Generator().manual_seed(99))
    return inputs, weight


def _slice(x, start: int, end: int):
    return x if x is None or x.dim() == 1 else x[:, start:end]


def _worker(rank: int, world: int, out_dir: str, backend: str) -> None:
    lengths = SHARDS[world]
    start, end = sum(lengths[:rank]), sum(lengths[: rank + 1])
    group = dist.group.WORLD
    results = {}
    for case in CASES:
        inputs, weight = _inputs(case, sum(lengths))
        leaves = [
            None if x is None else _slice(x, start, end).clone().requires_grad_() for x in inputs
        ]
        TRACKER.reset()
        o = _lasp2_for(case)(*leaves, group=group, backend=backend)
        forward_log = [(r.op, r.bytes_sent) for r in TRACKER.records]
        (o * weight[:, start:end]).sum().backward()
        results[case.name] = {
            "o": o.detach(),
            "grads": [None if x is None else x.grad for x in leaves],
            "forward_log": forward_log,
            "all_log": [(r.op, r.bytes_sent) for r in TRACKER.records],
        }
        # Doubling this rank's shard must not change the size of any collective.
        doubled = case.inputs(2, 2 * (end - start), H, K, V, seed=1)
        TRACKER.reset()
        _lasp2_for(case)(*[None if x is None else x for x in doubled], group=group, backend=backend)
        results[case.name]["doubled_log"] = [(r.op, r.bytes_sent) for r in TRACKER.records]
    torch.save(results, f"{out_dir}/rank{rank}.pt")


def _reference(case, backend: str):
    total = sum(SHARDS[1])
    inputs, weight = _inputs(case, total)
    leaves = [None if x is None else x.clone().requires_grad_() for x in inputs]
    o, _ = case.chunk(*leaves, backend=backend)
    (o * weight).sum().backward()
    return o.detach(), [None if x is None else x.grad for x in leaves]


@pytest.mark.parametrize(
    "world,backend", [(1, "torch"), (2, "torch"), (3, "torch"), (4, "torch"), (2, "triton")]
)
def test_lasp2_matches_single_process(world: int, backend: str, tmp_path: Path):
    assert sum(SHARDS[world]) == sum(SHARDS[1])
    run_distributed(_worker, world, tmp_path, str(tmp_path), backend)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for case in CASES:
        want_o, want_grads = _reference(case, backend)
        got_o = torch.cat([r[case.name]["o"] for r in ranks], dim=1)
        assert_close(f"{case.name} W={world} o", got_o, want_o)
        for i, want in enumerate(want_grads):
            if want is None:
                continue
            parts = [r[case.name]["grads"][i] for r in ranks]
            got = sum(parts) if want.dim() == 1 else torch.cat(parts, dim=1)  # [H] decay: summed
            assert_close(f"{case.name} W={world} grad {i}", got, want)
        for r in ranks:
            log = r[case.name]
            assert [op for op, _ in log["forward_log"]] == ["all_gather"], log["forward_log"]
            assert [op for op, _ in log["all_log"]] == ["all_gather"] * 2, log["all_log"]
            assert log["doubled_log"] == log["forward_log"], "collective size grew with T"
