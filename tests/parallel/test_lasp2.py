"""LASP-2 (and the LASP-1 ring baseline) on real gloo processes equal the single-process
chunk op on the whole sequence, outputs and every input gradient."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from hyla.parallel.comm import TRACKER
from hyla.parallel.ops import gated_delta_rule_sp, gla_sp, linear_attn_sp
from tests.kernels.cases import CASES, assert_close
from tests.parallel.launcher import run_distributed

SP_OPS = {
    "linear": linear_attn_sp,
    "gla": gla_sp,
    "deltanet": gated_delta_rule_sp,
    "gdn": gated_delta_rule_sp,
}
METHODS = ["lasp2", "lasp1"]
H, K, V = 2, 16, 24
SHARDS = {1: [150], 2: [83, 67], 3: [1, 70, 79], 4: [40, 1, 64, 45]}


def _inputs(case, total: int):
    inputs = case.inputs(2, total, H, K, V, seed=total)
    weight = torch.randn(2, total, H, V, generator=torch.Generator().manual_seed(99))
    return inputs, weight


def _slice(x, start: int, end: int):
    return x if x is None or x.dim() == 1 else x[:, start:end]


def _log() -> list[tuple[str, int]]:
    return [(r.op, r.bytes_sent) for r in TRACKER.records]


def _worker(rank: int, world: int, out_dir: str, backend: str) -> None:
    lengths = SHARDS[world]
    start, end = sum(lengths[:rank]), sum(lengths[: rank + 1])
    results = {}
    for case in CASES:
        op = SP_OPS[case.name.split("-")[0]]
        inputs, weight = _inputs(case, sum(lengths))
        for method in METHODS:
            leaves = [
                None if x is None else _slice(x, start, end).clone().requires_grad_()
                for x in inputs
            ]
            TRACKER.reset()
            o = op(method, *leaves, group=dist.group.WORLD, backend=backend)
            forward_log = _log()
            (o * weight[:, start:end]).sum().backward()
            results[case.name, method] = {
                "o": o.detach(),
                "grads": [None if x is None else x.grad for x in leaves],
                "forward_log": forward_log,
                "all_log": _log(),
            }
        # Doubling this rank's shard must not change the size of any LASP-2 collective.
        doubled = case.inputs(2, 2 * (end - start), H, K, V, seed=1)
        TRACKER.reset()
        op("lasp2", *doubled, group=dist.group.WORLD, backend=backend)
        results[case.name, "lasp2"]["doubled_log"] = _log()
    torch.save(results, f"{out_dir}/rank{rank}.pt")


def _reference(case, backend: str):
    inputs, weight = _inputs(case, sum(SHARDS[1]))
    leaves = [None if x is None else x.clone().requires_grad_() for x in inputs]
    o, _ = case.chunk(*leaves, backend=backend)
    (o * weight).sum().backward()
    return o.detach(), [None if x is None else x.grad for x in leaves]


def _expected_ring_log(rank: int, world: int) -> tuple[list[str], list[str]]:
    forward = ["recv"] * (rank > 0) + ["send"] * (rank < world - 1)
    backward = ["recv"] * (rank < world - 1) + ["send"] * (rank > 0)
    return forward, forward + backward


@pytest.mark.parametrize(
    "world,backend", [(1, "torch"), (2, "torch"), (3, "torch"), (4, "torch"), (2, "triton")]
)
def test_matches_single_process(world: int, backend: str, tmp_path: Path):
    assert sum(SHARDS[world]) == sum(SHARDS[1])
    run_distributed(_worker, world, tmp_path, str(tmp_path), backend)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for case in CASES:
        want_o, want_grads = _reference(case, backend)
        for method in METHODS:
            run, tag = (case.name, method), f"{case.name}/{method} W={world}"
            assert_close(f"{tag} o", torch.cat([r[run]["o"] for r in ranks], dim=1), want_o)
            for i, want in enumerate(want_grads):
                if want is None:
                    continue
                parts = [r[run]["grads"][i] for r in ranks]
                # A constant [H] decay is shared by all shards: its gradient sums over them.
                got = sum(parts) if want.dim() == 1 else torch.cat(parts, dim=1)
                assert_close(f"{tag} grad {i}", got, want)
        for rank, r in enumerate(ranks):
            lasp2 = r[case.name, "lasp2"]
            assert [op for op, _ in lasp2["forward_log"]] == ["all_gather"], lasp2["forward_log"]
            assert [op for op, _ in lasp2["all_log"]] == ["all_gather"] * 2, lasp2["all_log"]
            assert lasp2["doubled_log"] == lasp2["forward_log"], "collective size grew with T"
            forward, both = _expected_ring_log(rank, world)
            ring = r[case.name, "lasp1"]
            assert [op for op, _ in ring["forward_log"]] == forward
            assert [op for op, _ in ring["all_log"]] == both
