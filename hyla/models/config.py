"""The model's configuration: one validated dataclass, flat so hydra can override any field."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MIXER_LETTERS = {
    "L": "linear attention (plain, constant decay or scalar gate: see linear_decay)",
    "G": "gated linear attention (GLA)",
    "D": "Gated DeltaNet",
    "M": "Mixture-of-Memories (gated delta rule memories)",
    "A": "softmax attention (GQA, RoPE)",
}
LINEAR_DECAYS = ("none", "constant", "scalar_gate")


@dataclass
class ModelConfig:
    """A hybrid stack. `layers` names each layer's token mixer, e.g. "DDDA" or ["L", "A"]."""

    layers: str | list[str] = "LGDMA"
    vocab_size: int = 258
    d_model: int = 64
    n_heads: int = 4
    mlp_hidden: int | None = None  # SwiGLU width; None: 8/3 d_model rounded up to 64
    tie_embeddings: bool = True
    norm_eps: float = 1e-6
    init_std: float = 0.02
    seed: int = 0
    # Recompute each block in backward (attention keeps its kernel's outputs). A training
    # policy, not the model's: hyla.parallel.parallelize reads it and wraps the blocks.
    activation_checkpointing: bool = False
    loss_chunk_size: int = 2048  # tokens per chunk of the loss: [T, vocab] never exists whole
    linear_decay: str = "constant"  # for "L" layers: none | constant | scalar_gate
    gla_key_ratio: float = 0.5  # GLA key dim = ratio * value dim (the GLA paper's 0.5)
    gla_gate_rank: int = 16
    conv_size: int = 4  # short causal convolutions of Gated DeltaNet
    attn_kv_heads: int | None = None  # None: as many as n_heads (MHA)
    rope_theta: float = 10000.0
    mom_memories: int = 4
    mom_top_k: int = 2
    mom_shared_memory: bool = True
    mom_aux_weight: float = 0.01
    name: str = field(default="custom")

    def __post_init__(self) -> None:
        self.validate()

    @property
    def pattern(self) -> list[str]:
        return list(self.layers)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.attn_kv_heads if self.attn_kv_heads is not None else self.n_heads

    @property
    def mlp_width(self) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        return -(-8 * self.d_model // 3 // 64) * 64

    def validate(self) -> None:
        def positive(name: str, value: int | float | None, allow_none: bool = False) -> None:
            if value is None and allow_none:
                return
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value <= 0
            ):
                raise ValueError(f"model.{name} must be a finite number > 0, got {value!r}")

        for name in (
            "vocab_size",
            "d_model",
            "n_heads",
            "loss_chunk_size",
            "gla_gate_rank",
            "conv_size",
            "mom_memories",
            "mom_top_k",
            "norm_eps",
            "init_std",
            "rope_theta",
            "gla_key_ratio",
        ):
            positive(name, getattr(self, name))
        positive("mlp_hidden", self.mlp_hidden, allow_none=True)
        positive("attn_kv_heads", self.attn_kv_heads, allow_none=True)
        if self.mom_aux_weight < 0:
            raise ValueError(f"model.mom_aux_weight must be >= 0, got {self.mom_aux_weight!r}")
        if not self.pattern:
            raise ValueError("model.layers must name at least one layer, got an empty pattern")
        unknown = sorted({x for x in self.pattern if x not in MIXER_LETTERS})
        if unknown:
            allowed = ", ".join(f"{k} ({v})" for k, v in MIXER_LETTERS.items())
            raise ValueError(f"model.layers has unknown letters {unknown}; allowed: {allowed}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"model.n_heads must divide model.d_model, got n_heads={self.n_heads}, "
                f"d_model={self.d_model}"
            )
        if self.n_heads % self.kv_heads:
            raise ValueError(
                f"model.attn_kv_heads must divide model.n_heads={self.n_heads}, "
                f"got {self.attn_kv_heads}"
            )
        if self.mom_top_k > self.mom_memories:
            raise ValueError(
                f"model.mom_top_k must be <= model.mom_memories={self.mom_memories}, "
                f"got {self.mom_top_k}"
            )
        if "A" in self.pattern and self.head_dim % 2:
            raise ValueError(
                f"attention layers need an even head dim for rotary positions, got "
                f"d_model / n_heads = {self.head_dim}"
            )
        if self.linear_decay not in LINEAR_DECAYS:
            raise ValueError(
                f"model.linear_decay must be one of {LINEAR_DECAYS}, got {self.linear_decay!r}"
            )
        gla_key = self.gla_key_dim
        if gla_key < 1 or (gla_key * self.n_heads) != round(self.gla_key_ratio * self.d_model):
            raise ValueError(
                f"model.gla_key_ratio * d_model must be a positive multiple of n_heads, got "
                f"{self.gla_key_ratio} * {self.d_model} with n_heads={self.n_heads}"
            )

    @property
    def gla_key_dim(self) -> int:
        """GLA's key head dim (its value head dim is head_dim)."""
        return round(self.gla_key_ratio * self.d_model) // self.n_heads
