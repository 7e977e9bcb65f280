"""Presets instantiate, and their parameter counts match closed-form counts."""

from __future__ import annotations

import pytest
import torch

from hyla.jobs.cli import main
from hyla.models import HybridLM, ModelConfig
from hyla.models.presets import count_parameters, load_preset, preset_names


def closed_form_parameters(cfg: ModelConfig) -> int:
    """Counted by hand from the architecture (bias-free projections unless noted)."""
    d, h, dh, v = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.vocab_size
    gla_k = cfg.gla_key_dim * h
    memory = 2 * d * d + 2 * d * h + 2 * h  # k, v projections; beta, a projections; A_log, dt_bias
    mixer = {
        "L": 4 * d * d + dh + (d * h + h if cfg.linear_decay == "scalar_gate" else 0),
        "G": 2 * d * gla_k
        + 3 * d * d
        + d * cfg.gla_gate_rank
        + cfg.gla_gate_rank * gla_k
        + gla_k
        + dh,
        "D": 5 * d * d + 3 * d * cfg.conv_size + 2 * d * h + 2 * h + dh,
        "M": d * cfg.mom_memories
        + 3 * d * d
        + dh
        + (cfg.mom_memories + cfg.mom_shared_memory) * memory,
        "A": 2 * d * d + 2 * d * cfg.kv_heads * dh,
    }
    block = 2 * d + 3 * d * cfg.mlp_width
    total = sum(mixer[x] + block for x in cfg.pattern) + v * d + d
    return total + (0 if cfg.tie_embeddings else v * d)


@pytest.mark.parametrize("name", preset_names())
def test_parameter_count_matches_closed_form(name: str):
    cfg = load_preset(name)
    assert count_parameters(cfg) == closed_form_parameters(cfg)


@pytest.mark.parametrize(
    "overrides",
    [{"linear_decay": "scalar_gate"}, {"tie_embeddings": False}, {"mom_shared_memory": False}],
)
def test_closed_form_covers_options(overrides):
    cfg = load_preset("tiny", **overrides)
    assert count_parameters(cfg) == closed_form_parameters(cfg)


def test_published_presets_have_their_published_shapes():
    cfg = load_preset("linear-llama3-1b")
    assert (len(cfg.pattern), cfg.d_model, cfg.n_heads, set(cfg.pattern)) == (16, 2048, 16, {"L"})
    hybrid = load_preset("linear-llama3-1b-hybrid")
    assert hybrid.pattern.count("A") * 4 == len(hybrid.pattern)


def test_tiny_preset_trains_one_step():
    model = HybridLM(load_preset("tiny"))
    ids = torch.randint(0, 258, (2, 65))
    out = model(ids, torch.roll(ids, -1, 1))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None for p in model.parameters())


def test_unknown_preset():
    with pytest.raises(ValueError, match=r"model preset must be one of \[.*'tiny'.*\], got 'huge'"):
        load_preset("huge")


def test_params_command(capsys):
    assert main(["params", "tiny", "mom-340m"]) == 0
    out = capsys.readouterr().out
    assert f"{count_parameters(load_preset('mom-340m')):,}" in out
