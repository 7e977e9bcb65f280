"""Document masking under sequence parallelism equals one process with doc_start: the loss,
the MoM balance loss and every parameter gradient, summed over ranks. The single-process
masked model is itself checked against separate per-document runs in
tests/models/test_doc_masking.py.

Documents cross piece boundaries, some ranks hold no document start in a row (row 1 has
none at all), documents start exactly at a piece's first token, and pieces of a single
token (shorter than the convolution halo) occur, in contiguous and zigzag layouts.
Communication: document masking adds no collective to any linear layer and keeps their
sizes (also at half the tokens), adds one channel to LASP-2H's K/V gather, and one
fixed-size all-gather per forward for the convolutions' halo of document starts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from hyla.models import HybridLM, ModelConfig
from hyla.parallel import SequenceLayout, SequenceParallel, TrainingPolicy, parallelize
from hyla.parallel.comm import TRACKER
from hyla.parallel.context import ShardedSequence
from tests.kernels.cases import assert_close
from tests.models.test_doc_masking import packed_batch
from tests.parallel.launcher import run_distributed

T = 100
STARTS = [[0, 5, 6, 7, 10, 80, 99], [], [1, 50, 51, 90]]
LAYOUTS = {
    # W = 2: the document 10..79 of row 0 crosses the boundary at 60 (and the chunk edge
    # at 64); zigzag: a 1-token piece at 20, row 2's document at 51 starts a piece.
    (2, "contiguous"): SequenceLayout.contiguous([60, 40]),
    (2, "zigzag"): SequenceLayout.zigzag([20, 1, 30, 49]),
    # W = 3: rank 0 is one token; rank 1 starts with a document start in row 2
    # (position 1), rank 2 with the 1-token document at 50; row 1 holds no start at all.
    (3, "contiguous"): SequenceLayout.contiguous([1, 49, 50]),
    (3, "zigzag"): SequenceLayout.zigzag([1, 9, 40, 1, 30, 19]),
}
CONFIGS = {
    "every-mixer": dict(layers="LGDMA", linear_decay="scalar_gate"),
    # Recomputation in backward re-runs the masked blocks (and their collectives).
    "constant-plain-mom-checkpointed": dict(
        layers="LDAM",
        linear_decay="constant",
        mom_shared_memory=False,
        activation_checkpointing=True,
    ),
}
RUNS = [  # (config, layout kind, parallel.sp_method)
    ("every-mixer", "contiguous", "lasp2"),
    ("every-mixer", "zigzag", "lasp2"),
    ("every-mixer", "contiguous", "lasp1"),
    ("constant-plain-mom-checkpointed", "zigzag", "lasp2"),
]


def _model(name: str) -> HybridLM:
    base = dict(d_model=32, n_heads=2, attn_kv_heads=1, vocab_size=50, init_std=0.2)
    return HybridLM(ModelConfig(**base, **CONFIGS[name])).train()


def _batch(length: int = T):
    return tuple(x[:, :length] for x in packed_batch(STARTS, T))


def _step(name: str, sp: SequenceParallel, batch, masked: bool) -> dict:
    """One training step on this rank's shards: loss parts, gradients and the traffic,
    {scope/op: (count, bytes)}."""
    ids, labels, doc_start = (sp.shard(x) for x in batch)
    model = parallelize(_model(name), None, TrainingPolicy(sp))
    TRACKER.reset()
    out = model(ids, labels, doc_start=doc_start if masked else None)
    out.loss.backward()
    return {
        "loss": out.loss.detach(),
        "aux": out.aux_loss.detach(),
        "grads": [p.grad for p in model.parameters()],  # checkpoint wrappers rename
        "traffic": {k: (v["count"], v["bytes"]) for k, v in TRACKER.summary(True).items()},
    }


def _half(layout: SequenceLayout) -> SequenceLayout:
    """The same layout over half the tokens (pieces halved, at least one token each)."""
    return SequenceLayout(tuple(max(1, n // 2) for n in layout.pieces), layout.owners, layout.world)


def _worker(rank: int, world: int, out_dir: str) -> None:
    results = {}
    for name, kind, method in RUNS:
        sp = SequenceParallel(dist.group.WORLD, LAYOUTS[world, kind], method)
        results[name, kind, method] = _step(name, sp, _batch(), masked=True)
    for kind in ("contiguous", "zigzag"):
        layout = LAYOUTS[world, kind]
        sp, short = SequenceParallel(dist.group.WORLD, layout), _half(layout)
        results["traffic", kind] = {
            "masked": results["every-mixer", kind, "lasp2"]["traffic"],
            "unmasked": _step("every-mixer", sp, _batch(), masked=False)["traffic"],
            "shorter": _step(
                "every-mixer",
                SequenceParallel(dist.group.WORLD, short),
                _batch(short.length),
                masked=True,
            )["traffic"],
        }
    ulysses = SequenceParallel(dist.group.WORLD, LAYOUTS[world, "contiguous"], "ulysses")
    ids, _, doc_start = (ulysses.shard(x) for x in _batch())
    try:  # refused when a forward meets document starts
        ShardedSequence(ulysses).context(ids, doc_start)
    except ValueError as err:
        results["ulysses"] = str(err)
    torch.save(results, f"{out_dir}/rank{rank}.pt")


def _check_traffic(traffic: dict, world: int, runs: int) -> None:
    masked, unmasked, shorter = traffic["masked"], traffic["unmasked"], traffic["shorter"]
    pattern = CONFIGS["every-mixer"]["layers"]
    for i, letter in enumerate(pattern):
        scope = f"layer{i}.{letter}"
        mine = {k: v for k, v in masked.items() if k.startswith(scope + "/")}
        plain = {k: v for k, v in unmasked.items() if k.startswith(scope + "/")}
        if letter == "A":  # K/V gather and dK/dV reduce-scatter carry one more channel
            assert {k: c for k, (c, _) in mine.items()} == {
                f"{scope}/all_gather": 1,
                f"{scope}/reduce_scatter": 1,
            }
            kv_width = 2 * 16  # head_dim of k and of v, one kv head
            for key, (_, size) in mine.items():
                assert size * kv_width == plain[key][1] * (kv_width + 1), (key, size)
            continue
        # Linear layers: the same collectives of the same sizes as unmasked, T-independent.
        assert mine == plain, (scope, mine, plain)
        assert mine == {k: v for k, v in shorter.items() if k.startswith(scope + "/")}
        lasp2_gathers = mine[f"{scope}/all_gather"][0] - (2 if letter == "D" else 0)
        assert lasp2_gathers == 2, (scope, mine)  # one forward, one backward
    # One halo of document starts per forward: [R, B, conv_size - 1] fp32 to each other rank.
    halo_bytes = runs * 3 * 3 * 4 * (world - 1)
    assert masked["documents/all_gather"] == (1, halo_bytes)
    assert shorter["documents/all_gather"] == (1, halo_bytes)
    assert not any(k.startswith("documents/") for k in unmasked)


@pytest.mark.parametrize("world", [2, 3])
def test_doc_masking_under_sequence_parallelism(world: int, tmp_path: Path):
    run_distributed(_worker, world, tmp_path, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    ids, labels, doc_start = _batch()
    for name in CONFIGS:
        model = _model(name)
        want = model(ids, labels, doc_start=doc_start)
        want.loss.backward()
        for run in [r for r in RUNS if r[0] == name]:
            tag = f"{'/'.join(run)} W={world}"
            got = [r[run] for r in ranks]
            assert_close(f"{tag} loss", sum(r["loss"] for r in got), want.loss.detach())
            assert_close(f"{tag} aux", sum(r["aux"] for r in got), want.aux_loss.detach())
            for i, (pname, p) in enumerate(model.named_parameters()):
                assert_close(f"{tag} d{pname}", sum(r["grads"][i] for r in got), p.grad)
    for r in ranks:
        _check_traffic(r["traffic", "contiguous"], world, runs=1)
        _check_traffic(r["traffic", "zigzag"], world, runs=2)
        message = "method='ulysses' does not support document masking (doc_start)"
        assert message in r.get("ulysses", "no ValueError")
