"""Model presets: the YAML files of configs/model/ (shipped inside the package)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch
from omegaconf import OmegaConf

from hyla.models.config import ModelConfig

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs" / "model"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str, **overrides) -> ModelConfig:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"model preset must be one of {preset_names()}, got {name!r}")
    # to_container is annotated for every kind of node; a mapping's is a dict
    fields = cast(dict[str, Any], OmegaConf.to_container(OmegaConf.load(path), resolve=True))
    return ModelConfig(**{**fields, **overrides})


def count_parameters(cfg: ModelConfig) -> int:
    """Parameters of HybridLM(cfg), built on the meta device (no memory, any size)."""
    from hyla.models.hybrid import HybridLM

    with torch.device("meta"):
        model = HybridLM(cfg)
    return sum(p.numel() for p in model.parameters())
