"""LASP-2 (and the LASP-1 ring baseline) on real gloo processes equal the single-process
chunk op on the whole sequence, outputs and every input gradient, for contiguous and zigzag
layouts with pieces down to one token. Each collective's count and size are asserted, and
do not change when the sequence doubles."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from hyla.parallel import SequenceLayout
from hyla.parallel.comm import TRACKER
from hyla.parallel.ops import split_recurrence
from tests.devices import INTERPRETED
from tests.kernels.cases import CASES, assert_close
from tests.parallel.launcher import run_distributed, whole_sequence

H, K, V, B = 2, 16, 24, 2
LAYOUTS = {  # (world, kind) -> a layout of 150 tokens
    (1, "contiguous"): SequenceLayout.contiguous([150]),
    (2, "contiguous"): SequenceLayout.contiguous([83, 67]),
    (3, "contiguous"): SequenceLayout.contiguous([1, 70, 79]),
    (4, "contiguous"): SequenceLayout.contiguous([40, 1, 64, 45]),
    (2, "zigzag"): SequenceLayout.zigzag([40, 1, 70, 39]),
    (3, "zigzag"): SequenceLayout.zigzag([1, 30, 20, 1, 50, 48]),
    (4, "zigzag"): SequenceLayout.zigzag([20, 1, 30, 9, 25, 1, 40, 24]),
}
RUNS = [("contiguous", "lasp2"), ("contiguous", "lasp1"), ("zigzag", "lasp2")]


def _runs(world: int) -> list[tuple[str, str]]:
    return [(kind, method) for kind, method in RUNS if (world, kind) in LAYOUTS]


def _inputs(case, total: int):
    inputs = case.inputs(B, total, H, K, V, seed=total)
    weight = torch.randn(B, total, H, V, generator=torch.Generator().manual_seed(99))
    return inputs, weight


def _local(x, layout: SequenceLayout, rank: int):
    return x if x is None or x.dim() == 1 else layout.shard(x, rank)


def _log() -> list[tuple[str, int]]:
    return [(r.op, r.bytes_sent) for r in TRACKER.records]


def _doubled(layout: SequenceLayout) -> SequenceLayout:
    return SequenceLayout(tuple(2 * n for n in layout.pieces), layout.owners, layout.world)


def _worker(rank: int, world: int, out_dir: str, backend: str) -> None:
    results = {}
    for case in CASES:
        inputs, weight = _inputs(case, 150)
        for kind, method in _runs(world):
            layout = LAYOUTS[world, kind]
            leaves = [
                None if x is None else _local(x, layout, rank).clone().requires_grad_()
                for x in inputs
            ]
            TRACKER.reset()
            o = split_recurrence(
                method, case.chunk, *leaves, group=dist.group.WORLD, layout=layout, backend=backend
            )
            forward_log = _log()
            (o * layout.shard(weight, rank)).sum().backward()
            run = {
                "o": o.detach(),
                "grads": [None if x is None else x.grad for x in leaves],
                "forward_log": forward_log,
                "all_log": _log(),
            }
            if method == "lasp2":  # the same layout at twice the length
                doubled = _doubled(layout)
                TRACKER.reset()
                split_recurrence(
                    method,
                    case.chunk,
                    *(_local(x, doubled, rank) for x in case.inputs(B, 300, H, K, V, seed=1)),
                    group=dist.group.WORLD,
                    layout=doubled,
                    backend=backend,
                )
                run["doubled_log"] = _log()
            results[case.name, kind, method] = run
    if (world, "zigzag") in LAYOUTS:  # the ring baseline refuses zigzag pieces
        layout = LAYOUTS[world, "zigzag"]
        q, k, v = CASES[0].inputs(B, layout.local_length(rank), H, K, V)[:3]
        try:
            split_recurrence(
                "lasp1", CASES[0].chunk, q, k, v, group=dist.group.WORLD, layout=layout
            )
        except ValueError as err:
            results["ring-zigzag"] = str(err)
    torch.save(results, f"{out_dir}/rank{rank}.pt")


def _reference(case, backend: str):
    inputs, weight = _inputs(case, 150)
    leaves = [None if x is None else x.clone().requires_grad_() for x in inputs]
    o, _ = case.chunk(*leaves, backend=backend)
    (o * weight).sum().backward()
    return o.detach(), [None if x is None else x.grad for x in leaves]


def _expected_ring_log(rank: int, world: int) -> tuple[list[str], list[str]]:
    forward = ["recv"] * (rank > 0) + ["send"] * (rank < world - 1)
    backward = ["recv"] * (rank < world - 1) + ["send"] * (rank > 0)
    return forward, forward + backward


def _pair_bytes(case, world: int, runs: int) -> int:
    """Bytes one rank sends in LASP-2's forward all-gather: per run and batch row, the
    transition (1, K or K x K numbers per head) and the K x V state, fp32, to W - 1 ranks."""
    family = case.name.split("-")[0]
    transition = {"linear": 1, "gla": K, "deltanet": K * K, "gdn": K * K}[family]
    return runs * B * H * (transition + K * V) * 4 * (world - 1)


@pytest.mark.parametrize(
    "world,backend",
    [
        (1, "torch"),
        (2, "torch"),
        (3, "torch"),
        (4, "torch"),
        pytest.param(2, "triton", marks=INTERPRETED),
    ],
)
def test_matches_single_process(world: int, backend: str, tmp_path: Path):
    run_distributed(_worker, world, tmp_path, str(tmp_path), backend)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for case in CASES:
        want_o, want_grads = _reference(case, backend)
        for kind, method in _runs(world):
            layout = LAYOUTS[world, kind]
            run, tag = (case.name, kind, method), f"{case.name}/{kind}/{method} W={world}"
            got_o = whole_sequence(layout, [r[run]["o"] for r in ranks])
            assert_close(f"{tag} o", got_o, want_o)
            for i, want in enumerate(want_grads):
                if want is None:
                    continue
                parts = [r[run]["grads"][i] for r in ranks]
                # A constant [H] decay is shared by all ranks: its gradient sums over them.
                got = sum(parts) if want.dim() == 1 else whole_sequence(layout, parts)
                assert_close(f"{tag} grad {i}", got, want)
            for rank, r in enumerate(ranks):
                if method == "lasp2":
                    runs = len(layout.runs(rank))
                    sent = _pair_bytes(case, world, runs)
                    assert r[run]["forward_log"] == [("all_gather", sent)], (tag, r[run])
                    # backward: one all-gather of the transitions and the state gradients
                    assert r[run]["all_log"] == [("all_gather", sent)] * 2, (tag, r[run])
                    assert r[run]["doubled_log"] == r[run]["forward_log"], "grew with T"
                else:
                    forward, both = _expected_ring_log(rank, world)
                    assert [op for op, _ in r[run]["forward_log"]] == forward
                    assert [op for op, _ in r[run]["all_log"]] == both
    for r in ranks:
        if world > 1:
            assert "method='lasp1' does not support a zigzag layout" in r["ring-zigzag"]
