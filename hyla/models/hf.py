"""Transformers wrappers of HybridLM, so that a folder written by
hyla.models.pretrained.save_pretrained loads with
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` (and `AutoConfig`).

generate() keeps a HylaCache (use_cache=True, the default): each layer's recurrent state,
short-convolution tail or K/V, in hyla.models.decoding.DecodingState, the state that
hyla.models.generate decodes with, so each new token costs constant memory and time in every
linear layer. Batches may be left-padded (attention_mask 0 before a row's first token): a
row gets the tokens it gets alone, its logits equal up to float summation order.

Limits: padding goes on the left only (other padding raises ValueError). The cache cannot be
cropped (recurrent states do not roll back), so assisted generation is not supported. The
loss with labels is the plain next-token cross-entropy, without MoM's load-balancing term.
Folders load from local disk only, through hyla.models.pretrained (which checks every weight),
not through transformers' loader. Its keywords are honoured where they apply (subfolder,
dtype, a device_map onto one device, config attributes), ignored where they cannot change
the result (downloads, caches, memory planning, and keywords unknown today), and refused
where they would (quantization, other weight files, sharding).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import (
    Cache,
    GenerationConfig,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from hyla.models import pretrained
from hyla.models.config import ModelConfig
from hyla.models.decoding import DecodingState
from hyla.models.hybrid import IGNORE_INDEX, HybridLM

logger = logging.getLogger(__name__)

# transformers 5.25 renamed the cache's keyword and output field from past_key_values to
# cache (reading the old name with a warning); earlier 5.x releases know the old name only.
_CACHE_FIELD = (
    "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
)

# PreTrainedModel.from_pretrained's keywords, sorted by what they mean for an exported folder
# read from local disk by hyla.models.pretrained. Keywords about downloads, caches, memory
# planning or kernel choice change nothing here: they are accepted and ignored.
_NO_EFFECT_LOAD_KWARGS = frozenset(
    {
        "_commit_hash",
        "_from_auto",
        "_from_pipeline",
        "adapter_kwargs",
        "allow_all_kernels",
        "attn_implementation",
        "cache_dir",
        "code_revision",
        "disable_mmap",
        "experts_implementation",
        "force_download",
        "kernel_config",
        "kernels_mode",
        "local_files_only",
        "low_cpu_mem_usage",
        "max_memory",
        "offload_buffers",
        "offload_folder",
        "offload_state_dict",
        "proxies",
        "resume_download",
        "revision",
        "token",
        "tqdm_class",
        "trust_remote_code",
        "use_auth_token",
        "use_safetensors",
        "weights_only",
    }
)

# Keywords that would change the model loaded (quantisation, other weight files, sharding
# plans, a different return value): accepted only at the value that leaves it unchanged.
_NEUTRAL_LOAD_KWARGS: dict[str, Any] = {
    "adapter_name": None,
    "device_mesh": None,
    "distributed_config": None,
    "from_flax": False,
    "from_tf": False,
    "fusion_config": None,
    "gguf_file": None,
    "ignore_mismatched_sizes": False,
    "key_mapping": None,
    "load_in_4bit": False,
    "load_in_8bit": False,
    "output_loading_info": False,
    "quantization_config": None,
    "state_dict": None,
    "tp_plan": None,
    "tp_size": None,
    "use_kernels": False,
    "variant": None,
}

# device_map strings that ask transformers to plan placement; on one model they mean "the
# first accelerator if there is one".
_PLANNED_DEVICE_MAPS = frozenset({"auto", "balanced", "balanced_low_0", "sequential"})

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
        "vocab_size",
    }
)


def _load_dtype(dtype: torch.dtype | str | None, torch_dtype: Any) -> torch.dtype | None:
    """The dtype to cast the loaded weights to (None: as saved). `torch_dtype` is the older
    spelling of `dtype`; both given must agree."""
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise ValueError(
            f"HylaForCausalLM.from_pretrained got dtype={dtype!r} and torch_dtype="
            f"{torch_dtype!r}; pass one of them"
        )
    chosen = dtype if dtype is not None else torch_dtype
    if chosen is None or chosen == "auto":
        return None
    if isinstance(chosen, torch.dtype):
        return chosen
    resolved = getattr(torch, str(chosen), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(
            f"HylaForCausalLM.from_pretrained dtype must be 'auto', a floating torch.dtype or "
            f"its name (e.g. 'bfloat16'), got {chosen!r}"
        )
    return resolved


def _single_device(device_map: Any) -> torch.device:
    """The one device a device_map places the whole model on. None: CPU. A planning strategy
    ("auto", ...): the first CUDA device if there is one, else CPU. A dict (module prefix ->
    device, as `{"": "cpu"}`) must name a single device: hyla does not split a model."""
    if device_map is None:
        return torch.device("cpu")
    if isinstance(device_map, str) and device_map in _PLANNED_DEVICE_MAPS:
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, dict):
        devices = {str(torch.device(d) if isinstance(d, int) else d) for d in device_map.values()}
        if len(devices) != 1 or devices & {"disk", "meta"}:
            raise ValueError(
                f"HylaForCausalLM.from_pretrained places the whole model on one device; "
                f"device_map {device_map!r} names {sorted(devices)}"
            )
        device_map = devices.pop()
    try:
        return torch.device(f"cuda:{device_map}" if isinstance(device_map, int) else device_map)
    except (RuntimeError, TypeError) as e:
        raise ValueError(
            f"HylaForCausalLM.from_pretrained device_map must be a device, one of "
            f"{sorted(_PLANNED_DEVICE_MAPS)} or a dict onto one device, got {device_map!r}: {e}"
        ) from None


def _refuse_result_changes(kwargs: dict[str, Any]) -> None:
    """TypeError naming each loading keyword whose value would change the weights loaded."""
    changing = {
        k: v
        for k, v in kwargs.items()
        if k in _NEUTRAL_LOAD_KWARGS and v is not None and v != _NEUTRAL_LOAD_KWARGS[k]
    }
    if changing:
        raise TypeError(
            f"HylaForCausalLM.from_pretrained loads the exported weights as saved; these "
            f"keywords would change them: {changing}"
        )


def _config_overrides(config: PretrainedConfig, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The loading keywords that name an attribute of the config: as in transformers, they
    set it. Any other keyword does not apply to a local hyla folder and is ignored, so a
    transformers release that passes a new loading keyword keeps loading."""
    applies = {
        k: v
        for k, v in kwargs.items()
        if k not in _NEUTRAL_LOAD_KWARGS and k not in _NO_EFFECT_LOAD_KWARGS and hasattr(config, k)
    }
    if ignored := sorted(kwargs.keys() - applies.keys() - _NEUTRAL_LOAD_KWARGS.keys()):
        logger.info("HylaForCausalLM.from_pretrained ignores keywords %s", ignored)
    return applies


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
    use_cache: bool = True
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


def _new_tokens_mask(attention_mask: Tensor | None, seen: int, input_ids: Tensor) -> Tensor | None:
    """The new tokens' part of transformers' attention_mask, which covers the `seen` tokens
    already decoded and the new ones."""
    if attention_mask is None:
        return None
    expected = (input_ids.shape[0], seen + input_ids.shape[1])
    if tuple(attention_mask.shape) != expected:
        raise ValueError(
            f"attention_mask must cover the {seen} cached tokens and the {input_ids.shape[1]} "
            f"new ones, [B, cached + new] = {list(expected)}, got {list(attention_mask.shape)}"
        )
    return attention_mask[:, seen:]


class HylaCache(Cache):
    """transformers' Cache for HylaForCausalLM: a hyla DecodingState, whose layers keep their
    own state (recurrent state, short-convolution tail, K/V), so the Cache's per-layer list
    stays empty and the methods generate() calls act on the DecodingState. Beam search can
    reorder it; it cannot be cropped, since a recurrent state does not roll back."""

    def __init__(self, model: HybridLM) -> None:
        super().__init__(layers=[])
        self.state = DecodingState(model)

    def step(self, model: HybridLM, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        """Decode input_ids [B, T] after the cached tokens -> final-normed hidden [B, T, d];
        attention_mask as transformers passes it (cached and new tokens) or None."""
        mask = _new_tokens_mask(attention_mask, self.state.seen, input_ids)
        return self.state.step(model, input_ids, mask)

    def __len__(self) -> int:
        return len(self.state.layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.state.seen

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # no maximum

    @property
    def batch_size(self) -> int:
        rows = self.state.batch_size
        return -1 if rows is None else rows

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    def reset(self) -> None:
        self.state.reset()

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self.state.select(beam_idx)

    def batch_select_indices(self, indices: Tensor) -> None:
        self.state.select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        rows = self.state.batch_size
        if rows is not None:
            self.state.select(torch.arange(rows).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise ValueError(
                f"HylaCache cannot crop (tokens_to_remove={tokens_to_remove}): recurrent "
                "states do not roll back; assisted generation is not supported"
            )


def _cache_argument(cache: Any, past_key_values: Any) -> HylaCache | None:
    """The cache passed under either of transformers' names, checked."""
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the cache as `cache` or as `past_key_values`, not both")
    given = cache if cache is not None else past_key_values
    if given is not None and not isinstance(given, HylaCache):
        raise TypeError(
            f"HylaForCausalLM's cache must be the HylaCache a previous call returned, or None, "
            f"got {type(given).__name__}"
        )
    return given


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

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args: Any,
        config: HylaConfig | str | os.PathLike | None = None,
        subfolder: str = "",
        dtype: torch.dtype | str | None = None,
        device_map: Any = None,
        generation_config: GenerationConfig | None = None,
        **kwargs: Any,
    ) -> HylaForCausalLM:
        """The exported folder's model, its weights read and checked by hyla.models.pretrained.

        Follows transformers' loading protocol: `subfolder`, `dtype` (or `torch_dtype`; "auto"
        keeps the saved dtype), a device_map that puts the whole model on one device, a
        `generation_config`, and config attributes as keywords (as `use_cache=False`) apply.
        Keywords about downloads, caches and memory planning are ignored, since the folder is
        local and read whole. Only what would change the result is refused: quantisation,
        other weight files, sharding, or a config keyword that changes the architecture."""
        folder = Path(pretrained_model_name_or_path) / subfolder
        if not folder.is_dir():
            raise ValueError(
                f"{folder} is not a local folder: HylaForCausalLM loads exported folders only "
                "(download a Hub repository first, e.g. with huggingface_hub.snapshot_download)"
            )
        if model_args:
            raise TypeError(
                f"HylaForCausalLM.from_pretrained takes no positional arguments after the "
                f"folder, got {model_args!r}"
            )
        dtype = _load_dtype(dtype, kwargs.pop("torch_dtype", None))
        device = _single_device(device_map)
        _refuse_result_changes(kwargs)
        model = pretrained.from_pretrained(folder, device)
        if config is None or isinstance(config, (str, os.PathLike)):
            config = HylaConfig.from_pretrained(folder if config is None else config)
        if config.model_config() != model.cfg:
            raise ValueError(f"the config passed differs from the one in {folder}")
        for key, value in _config_overrides(config, kwargs).items():
            if key in _WRITTEN_CONFIG_KEYS and getattr(config, key) != value:
                raise ValueError(
                    f"HylaForCausalLM.from_pretrained: {key}={value!r} would change the "
                    f"architecture saved in {folder} ({key}={getattr(config, key)!r})"
                )
            setattr(config, key, value)
        if dtype is not None:
            model = model.to(dtype)
        wrapped = cls(config, model).eval()
        if generation_config is not None:
            wrapped.generation_config = generation_config
        return wrapped

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

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """No: forward makes its own HylaCache, so generate() must not pass a DynamicCache."""
        return False

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        cache: HylaCache | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """[B, T] ids -> float32 logits [B, T, vocab]. labels (input_ids' shape, IGNORE_INDEX
        where no loss is wanted) give the mean cross-entropy of the logits at t against the
        labels at t + 1, as in transformers' causal LMs.

        As in transformers: `cache` (or `past_key_values`), a HylaCache from a previous call,
        continues its rows, updated in place; attention_mask then covers the cached tokens
        and the new ones, 0 at left padding. use_cache (default: the config's, off in
        training mode) returns the cache. Without a cache, use_cache or padding, the
        sequence takes the model's whole-sequence pass. Other keywords (return_dict, ...)
        are ignored."""
        cache = _cache_argument(cache, kwargs.pop("past_key_values", None))
        if use_cache is None:
            use_cache = bool(self.config.use_cache) and not self.training
        padded = attention_mask is not None and not bool(attention_mask.all())
        if cache is not None or use_cache or padded:
            cache = cache if cache is not None else HylaCache(self.model)
            hidden = cache.step(self.model, input_ids, attention_mask)
        else:
            _new_tokens_mask(attention_mask, 0, input_ids)  # checks its shape
            hidden, _ = self.model.hidden_states(input_ids)
        logits = self.model.logits(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
            )
        output = CausalLMOutputWithPast(loss=loss, logits=logits)
        if use_cache:
            setattr(output, _CACHE_FIELD, cache)
        return output
