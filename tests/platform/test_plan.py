"""hyla.platform.memory_plan and `hyla plan`: the memory model's terms, and its predictions
against peaks measured on CPU in fresh processes."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hyla.jobs.plan import parse_bytes
from hyla.models.config import ModelConfig
from hyla.models.presets import count_parameters
from hyla.platform.memory_plan import MemoryPlan, longest_context, plan_memory

MIB = 2**20
REPO = Path(__file__).resolve().parents[2]
# A small hybrid of the scale-1m kind: linear attention, MoM and softmax attention.
SMALL: dict[str, Any] = dict(layers="LMA", d_model=64, n_heads=4, attn_kv_heads=2, vocab_size=258)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> None:
    """Linux: make the peak resident size (VmHWM) restart from the current one, so that
    earlier spikes (imports, data) are not counted."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def measure_peak(fields: dict, seq_len: int, precision: str) -> int:
    """One training step (forward, backward, AdamW step) of HybridLM(fields), with the
    trainer's policies applied (activation checkpointing), on one
    [1, seq_len] sequence: the process's peak resident bytes above its resident bytes just
    before the model was built (the peak is reset there)."""
    import torch

    from hyla.models.hybrid import HybridLM
    from hyla.parallel import TrainingPolicy, parallelize

    torch.manual_seed(0)
    ids = torch.randint(0, fields["vocab_size"], (1, seq_len))
    base = _rss()
    _reset_peak_rss()
    model = HybridLM(ModelConfig(**fields))
    parallelize(model, None, TrainingPolicy(None, "ddp"))  # checkpointing, as the trainer does
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
        out = model(ids, ids)
    out.loss.backward()
    optimizer.step()
    return _peak_rss() - base


CASES = [  # (activation checkpointing, seq_len, precision)
    (False, 2048, "fp32"),
    (False, 6144, "fp32"),
    (True, 6144, "fp32"),
    (True, 4096, "bf16"),
]


@pytest.fixture(scope="module")
def measured() -> dict[tuple, int]:
    """Peaks of CASES, measured concurrently, one fresh process each. glibc's mmap threshold
    is pinned so that freed large buffers go back to the system instead of being kept in
    the heap, where the resident size would count them after they are dead."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    procs = {}
    for ac, seq_len, precision in CASES:
        fields = {**SMALL, "activation_checkpointing": ac}
        code = (
            "from tests.platform.test_plan import measure_peak; "
            f"print(measure_peak({fields!r}, {seq_len}, {precision!r}))"
        )
        procs[(ac, seq_len, precision)] = subprocess.Popen(
            [sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
        )
    out = {}
    for case, proc in procs.items():
        stdout, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{case} failed"
        out[case] = int(stdout.strip().splitlines()[-1])
    return out


def _plan(ac: bool, seq_len: int, precision: str) -> MemoryPlan:
    cfg = ModelConfig(**{**SMALL, "activation_checkpointing": ac})
    return plan_memory(cfg, seq_len=seq_len, precision=precision)


# Tolerance: +-25% of the terms that grow with T (the probe measures the blocks' saved
# tensors and peaks exactly, but the whole step adds what probing one block at a time cannot
# see: the embedding's and loss's temporaries, allocator rounding, thread-count dependent
# buffers), plus a fixed 320 MiB: the process's own growth that is not the model's (torch's
# CPU runtime, oneDNN and OpenMP buffers, malloc arenas; 120-280 MiB in calibration runs).
GROWING = ("activations", "recompute", "lasp_states", "gathered_kv", "backward", "loss_chunk")
ALLOWANCE = 320 * MIB


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"ac={c[0]}-T={c[1]}-{c[2]}")
def test_prediction_is_within_tolerance_of_measured_peak(measured, case):
    plan = _plan(*case)
    growing = sum(plan.breakdown()[name] for name in GROWING)
    error = measured[case] - plan.total
    assert abs(error) <= 0.25 * growing + ALLOWANCE, (
        f"{case}: measured {measured[case] / MIB:.0f} MiB, predicted {plan.total / MIB:.0f} "
        f"MiB: { ({k: round(v / MIB) for k, v in plan.breakdown().items()}) }"
    )


def test_growth_with_length_matches_measured_growth(measured):
    """The fixed allowance cancels in the difference between two lengths: what the model
    says 4096 more tokens cost must match what they cost, within 25%."""
    predicted = _plan(False, 6144, "fp32").total - _plan(False, 2048, "fp32").total
    actual = measured[(False, 6144, "fp32")] - measured[(False, 2048, "fp32")]
    assert abs(actual - predicted) <= 0.25 * predicted, (actual / MIB, predicted / MIB)


def test_checkpointing_measured_and_predicted_saving_agree(measured):
    saved_pred = _plan(False, 6144, "fp32").total - _plan(True, 6144, "fp32").total
    saved_meas = measured[(False, 6144, "fp32")] - measured[(True, 6144, "fp32")]
    assert saved_pred > 0 and saved_meas > 0
    assert abs(saved_meas - saved_pred) <= 0.25 * saved_pred + 64 * MIB


def test_static_terms_and_precision():
    cfg = ModelConfig(**SMALL)
    n = count_parameters(cfg)
    fp32, bf16 = (plan_memory(cfg, seq_len=1024, precision=p) for p in ("fp32", "bf16"))
    assert (fp32.parameters, fp32.gradients, fp32.optimizer) == (4 * n, 4 * n, 8 * n)
    assert fp32.weight_copies == 0 and bf16.weight_copies == 2 * n
    assert bf16.activations < fp32.activations  # autocast keeps bf16 activations


def test_sequence_parallel_terms():
    """LASP-2H keeps the whole sequence's K/V on every rank (per attention layer without
    checkpointing, one at a time with it); LASP-2 keeps, per piece of the rank, an initial
    state and its own transition: the same at any sp, twice that for zigzag's two pieces."""
    cfg = ModelConfig(**SMALL)
    one, four = (plan_memory(cfg, seq_len=8192, sp=sp, precision="fp32") for sp in (1, 4))
    assert one.gathered_kv == 0 and one.lasp_states == 0
    kv = 8192 * cfg.kv_heads * cfg.head_dim * 2 * 4
    assert four.gathered_kv == kv
    assert four.tokens_per_rank == 2048 and four.activations < one.activations
    double = plan_memory(cfg, seq_len=16384, sp=4, precision="fp32")
    assert double.gathered_kv == 2 * kv
    two_attn = dataclasses.replace(cfg, layers="LALA")
    assert plan_memory(two_attn, seq_len=8192, sp=4, precision="fp32").gathered_kv == 2 * kv
    ac = dataclasses.replace(two_attn, activation_checkpointing=True)
    assert plan_memory(ac, seq_len=8192, sp=4, precision="fp32").gathered_kv == kv
    eight = plan_memory(cfg, seq_len=8192, sp=8, precision="fp32")
    assert eight.lasp_states == four.lasp_states > 0
    zigzag = plan_memory(cfg, seq_len=8192, sp=4, precision="fp32", layout="zigzag")
    assert zigzag.lasp_states == 2 * four.lasp_states


def test_longest_context_is_the_boundary():
    cfg = ModelConfig(**SMALL)
    memory = 2 * 2**30
    t = longest_context(cfg, memory=memory, sp=2, precision="fp32", headroom=0.0)
    assert t > 0 and t % (2 * 64) == 0
    assert plan_memory(cfg, seq_len=t, sp=2, precision="fp32").total <= memory
    assert plan_memory(cfg, seq_len=t + 128, sp=2, precision="fp32").total > memory
    ac = dataclasses.replace(cfg, activation_checkpointing=True)
    assert longest_context(ac, memory=memory, sp=2, precision="fp32", headroom=0.0) > t
    assert longest_context(cfg, memory=1024, precision="fp32") == 0


def test_parse_bytes_and_bad_input():
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("80GiB") == parse_bytes("80G") == 80 * 2**30
    assert parse_bytes("1.5MiB") == 3 * 2**19
    for bad in ("80XB", "-1GB", "", "GB"):
        with pytest.raises(ValueError, match="--gpu-mem"):
            parse_bytes(bad)
    cfg = ModelConfig(**SMALL)
    with pytest.raises(ValueError, match="seq_len must be divisible by sp"):
        plan_memory(cfg, seq_len=1000, sp=3)
    with pytest.raises(ValueError, match="precision must be one of"):
        plan_memory(cfg, seq_len=1024, precision="fp8")
    with pytest.raises(ValueError, match="headroom"):
        longest_context(cfg, memory=2**30, headroom=1.5)


def test_cli_breakdown_and_markdown(capsys, tmp_path):
    from hyla.jobs.cli import main

    args = [
        "plan",
        "model=tiny",
        "model.layers=LA",
        "data.seq_len=4096",
        "data.batch_size=1",
        "--gpus",
        "4",
    ]
    assert main([*args, "--gpu-mem", "2GiB"]) == 0
    out = capsys.readouterr().out
    for word in ("gathered_kv", "lasp_states", "total", "longest T", "sp 4"):
        assert word in out
    md = tmp_path / "plan.md"
    assert main([*args[:3], "--gpus", "2", "4", "--gpu-mem", "1GiB", "--markdown", str(md)]) == 0
    table = md.read_text()
    assert "| tiny | 2 |" in table and "| tiny | 4 |" in table and "hyla plan" in table
    capsys.readouterr()
    assert main(["plan", "parallel.dp=2", "--gpus", "3"]) == 2
    assert "hyla: error: --gpus must be a positive multiple" in capsys.readouterr().err
    assert main(["plan", "--gpus", "2", "--gpu-mem", "lots"]) == 2
    assert "hyla: error: --gpu-mem" in capsys.readouterr().err
