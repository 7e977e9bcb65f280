"""Transformers wrappers of HybridLM, so that a folder written by
hyla.models.pretrained.save_pretrained loads with
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` (and `AutoConfig`).

Limits: generate keeps no cache or recurrent state, so every step recomputes the whole prefix
(hyla.models.generate decodes in constant memory per token instead). Padding is not supported:
an attention_mask with zeros raises ValueError, so batched prompts must have equal lengths. The
loss with labels is the plain next-token cross-entropy, without MoM's load-balancing term.
Folders load from local disk only, through hyla.models.pretrained (which checks every weight),
not through transformers' loader: no Hub download, quantization or device_map planning.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from hyla.models import pretrained
from hyla.models.config import ModelConfig
from hyla.models.hybrid import IGNORE_INDEX, HybridLM

# Keywords AutoModelForCausalLM passes on, or that only matter for Hub downloads.
_IGNORED_LOAD_KWARGS = frozenset(
    {
        "_from_auto",
        "adapter_kwargs",
        "cache_dir",
        "code_revision",
        "force_download",
        "local_files_only",
        "proxies",
        "revision",
        "token",
        "trust_remote_code",
    }
)

# config.json keys that pretrained.save_pretrained writes from the model itself, or that
# transformers adds when it writes a config.
_WRITTEN_CONFIG_KEYS = frozenset(
    {
        "architectures",
        "auto_map",
        "hidden_size",
        "hyla_model",
        "model_type",
        "num_attention_heads",
        "num_hidden_layers",
        "tie_word_embeddings",
        "transformers_version",
        "use_cache",
        "vocab_size",
    }
)


class HylaConfig(PretrainedConfig):
    """`hyla_model` (ModelConfig's fields) is the whole architecture; the standard keys beside
    it (vocab_size, hidden_size, ...) are copied from it for tools that read them."""

    model_type = "hyla"

    hyla_model: dict[str, Any] | None = None
    vocab_size: int | None = None
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    tie_word_embeddings: bool = True
    use_cache: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        cfg = self.model_config()
        self.hyla_model = dataclasses.asdict(cfg)
        self.vocab_size, self.hidden_size = cfg.vocab_size, cfg.d_model
        self.num_hidden_layers, self.num_attention_heads = len(cfg.pattern), cfg.n_heads
        self.tie_word_embeddings = cfg.tie_embeddings
        super().__post_init__(**kwargs)

    def model_config(self) -> ModelConfig:
        return ModelConfig(**(self.hyla_model or {}))


class HylaForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = HylaConfig
    base_model_prefix = "model"

    def __init__(self, config: HylaConfig, model: HybridLM | None = None) -> None:
        super().__init__(config)
        self.model = model if model is not None else HybridLM(config.model_config())
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Nothing: HybridLM initialises itself (seeded by its config) or is loaded, and
        transformers' generic initialisation must overwrite neither."""

    # narrower than PreTrainedModel's by design: local exported folders, dtype and one device
    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args: Any,
        config: HylaConfig | None = None,
        dtype: torch.dtype | str | None = None,
        device_map: str | torch.device | None = None,
        **kwargs: Any,
    ) -> HylaForCausalLM:
        """The exported folder's model, its weights read and checked by hyla.models.pretrained.
        dtype ("auto": as saved) and device_map (one device) are applied after loading."""
        folder = Path(pretrained_model_name_or_path)
        if not folder.is_dir():
            raise ValueError(
                f"{folder} is not a local folder: HylaForCausalLM loads exported folders only "
                "(download a Hub repository first, e.g. with huggingface_hub.snapshot_download)"
            )
        unsupported = sorted(
            k for k, v in kwargs.items() if k not in _IGNORED_LOAD_KWARGS and v is not None
        )
        if model_args or unsupported or isinstance(device_map, dict) or device_map == "auto":
            raise TypeError(
                f"HylaForCausalLM.from_pretrained supports dtype and a single-device device_map "
                f"only, got positional {model_args}, keywords {unsupported}, "
                f"device_map {device_map!r}"
            )
        model = pretrained.from_pretrained(folder, device_map or "cpu")
        if config is None:
            config = HylaConfig.from_pretrained(folder)
        elif config.model_config() != model.cfg:
            raise ValueError(f"the config passed differs from the one in {folder}")
        if dtype not in (None, "auto"):
            model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        return cls(config, model).eval()

    # narrower than PreTrainedModel's by design: hyla's own folder format, nothing else
    def save_pretrained(self, save_directory: str | os.PathLike) -> None:  # type: ignore[override]
        """The folder hyla.models.pretrained.save_pretrained writes, loadable both ways, with
        this config's keys beyond the architecture (special token ids and the like)."""
        extra = {
            k: v
            for k, v in self.config.to_diff_dict().items()
            if v is not None and k not in _WRITTEN_CONFIG_KEYS
        }
        pretrained.save_pretrained(self.model, save_directory, extra)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """[B, T] ids -> float32 logits [B, T, vocab]. labels (input_ids' shape, IGNORE_INDEX
        where no loss is wanted) give the mean cross-entropy of the logits at t against the
        labels at t + 1, as in transformers' causal LMs. Other keywords (use_cache,
        return_dict, ...) are ignored."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(
                "HylaForCausalLM does not support padding (attention_mask has zeros): "
                "pass prompts of equal length, unpadded"
            )
        hidden, _ = self.model.hidden_states(input_ids)
        logits = self.model.logits(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """The whole sequence at every step: there is no cache to continue from."""
        return {"input_ids": input_ids, "attention_mask": attention_mask}
