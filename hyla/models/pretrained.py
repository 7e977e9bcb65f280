"""A trained model as a folder anyone can load: `model.safetensors` (tensors only, no pickle)
and `config.json` (the ModelConfig under "hyla_model", beside the keys Hugging Face's Auto
classes read). With `transformers` installed the folder also loads through
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`: its `auto_map` names
HF_MODULE, a two-line file that imports hyla.models.hf."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from hyla.models.config import ModelConfig
from hyla.models.hybrid import HybridLM
from hyla.platform.fieldtypes import check_types

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
HF_MODULE = "hyla_hf.py"
_HF_SHIM = (
    '"""Loads this folder through transformers (trust_remote_code); hyla must be installed."""'
    "\n\nfrom hyla.models.hf import HylaConfig, HylaForCausalLM  # noqa: F401\n"
)


def save_pretrained(
    model: HybridLM, folder: str | os.PathLike, extra: dict[str, Any] | None = None
) -> None:
    """Write the model's weights and config into `folder` (created; files in it replaced).
    `extra`: more config.json keys (the tokenizer's eos_token_id, where it came from)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt"})
    cfg = model.cfg
    config = {
        "model_type": "hyla",
        "architectures": ["HylaForCausalLM"],
        "auto_map": {
            "AutoConfig": f"{HF_MODULE.removesuffix('.py')}.HylaConfig",
            "AutoModelForCausalLM": f"{HF_MODULE.removesuffix('.py')}.HylaForCausalLM",
        },
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": len(cfg.pattern),
        "num_attention_heads": cfg.n_heads,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hyla_model": dataclasses.asdict(cfg),
        **(extra or {}),
    }
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    (folder / HF_MODULE).write_text(_HF_SHIM)


def read_model_config(folder: str | Path) -> ModelConfig:
    """The ModelConfig of an exported folder."""
    path = Path(folder) / CONFIG_FILE
    try:
        fields = json.loads(path.read_text())["hyla_model"]
        check_types("model", ModelConfig, fields)  # as on the command line
        return ModelConfig(**fields)
    except FileNotFoundError:
        raise ValueError(f"{folder} holds no {CONFIG_FILE}: not an exported hyla model") from None
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{path} is not a hyla model config (expected a 'hyla_model' object of "
            f"ModelConfig fields): {type(e).__name__}: {e}"
        ) from None


def from_pretrained(folder: str | Path, device: str | torch.device = "cpu") -> HybridLM:
    """The model saved by `save_pretrained`, every weight checked against the config."""
    from safetensors.torch import load_file

    cfg = read_model_config(folder)
    path = Path(folder) / WEIGHTS_FILE
    try:
        tensors = load_file(path, device=str(device))
    except FileNotFoundError:
        raise ValueError(f"{folder} holds no {WEIGHTS_FILE}") from None
    except Exception as e:  # safetensors' own error type for truncated or garbled files
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from None
    model = HybridLM(cfg).to(device)
    expected = model.state_dict().keys()
    missing, unexpected = expected - tensors.keys(), tensors.keys() - expected
    if missing or unexpected:
        raise ValueError(
            f"{path} does not fit its config: missing {sorted(missing)}, "
            f"unexpected {sorted(unexpected)}"
        )
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:  # shapes that differ from the config's
        raise ValueError(f"{path} does not fit its config: {e}") from None
    return model.eval()
