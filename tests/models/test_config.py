"""Bad model configs: an error naming the field, the value and what is allowed."""

from __future__ import annotations

import json

import pytest

from hyla.models import ModelConfig


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"d_model": 64, "n_heads": 5}, r"model.n_heads must divide model.d_model, got n_heads=5"),
        ({"layers": "LXA"}, r"model.layers has unknown letters \['X'\]; allowed: L \(linear"),
        ({"layers": ""}, r"model.layers must name at least one layer"),
        ({"mom_top_k": 5}, r"model.mom_top_k must be <= model.mom_memories=4, got 5"),
        ({"d_model": 0}, r"model.d_model must be a finite number > 0, got 0"),
        ({"norm_eps": float("nan")}, r"model.norm_eps must be a finite number > 0, got nan"),
        ({"rope_theta": float("inf")}, r"model.rope_theta must be a finite number > 0, got inf"),
        ({"vocab_size": -3}, r"model.vocab_size must be a finite number > 0, got -3"),
        ({"mom_memories": 0}, r"model.mom_memories must be a finite number > 0, got 0"),
        ({"mlp_hidden": 0}, r"model.mlp_hidden must be a finite number > 0, got 0"),
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


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("norm_eps", float("nan"), r"model.norm_eps must be a finite number, got nan"),
        ("rope_theta", float("nan"), r"model.rope_theta must be a finite number, got nan"),
        ("init_std", float("inf"), r"model.init_std must be a finite number, got inf"),
        ("tie_embeddings", "no", r"model.tie_embeddings must be true or false, got 'no'"),
    ],
)
def test_exported_config_gets_the_command_lines_checks(tmp_path, field, value, message):
    """A hand-edited config.json of an exported model is refused as the command line would."""
    from hyla.models.hybrid import HybridLM
    from hyla.models.pretrained import CONFIG_FILE, save_pretrained

    tiny = {"vocab_size": 32, "d_model": 16, "n_heads": 2, "layers": "L"}
    save_pretrained(HybridLM(ModelConfig(**tiny)), tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    config["hyla_model"][field] = value
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        HybridLM.from_pretrained(str(tmp_path))
