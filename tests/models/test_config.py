"""Bad model configs: an error naming the field, the value and what is allowed."""

from __future__ import annotations

import pytest

from hyla.models import ModelConfig


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"d_model": 64, "n_heads": 5}, r"model.n_heads must divide model.d_model, got n_heads=5"),
        ({"layers": "LXA"}, r"model.layers has unknown letters \['X'\]; allowed: L \(linear"),
        ({"layers": ""}, r"model.layers must name at least one layer"),
        ({"mom_top_k": 5}, r"model.mom_top_k must be <= model.mom_memories=4, got 5"),
        ({"d_model": 0}, r"model.d_model must be > 0, got 0"),
        ({"vocab_size": -3}, r"model.vocab_size must be > 0, got -3"),
        ({"mom_memories": 0}, r"model.mom_memories must be > 0, got 0"),
        ({"mlp_hidden": 0}, r"model.mlp_hidden must be > 0, got 0"),
        ({"attn_kv_heads": 3}, r"model.attn_kv_heads must divide model.n_heads=4, got 3"),
        ({"linear_decay": "fast"}, r"model.linear_decay must be one of \('none', 'constant', "),
        ({"mom_aux_weight": -1.0}, r"model.mom_aux_weight must be >= 0, got -1.0"),
        (
            {"d_model": 36, "n_heads": 4, "layers": "G", "gla_key_ratio": 0.5},
            r"gla_key_ratio \* d_model must be a positive multiple of n_heads",
        ),
        (
            {"d_model": 20, "n_heads": 4, "layers": "A", "gla_key_ratio": 0.6},
            r"even head dim for rotary positions, got d_model / n_heads = 5",
        ),
    ],
)
def test_bad_config(overrides: dict, message: str):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{"d_model": 64, "n_heads": 4, **overrides})


def test_pattern_as_list():
    assert ModelConfig(layers=["L", "A"]).pattern == ["L", "A"]
