"""Autoregressive generation with recurrent states (linear mixers, MoM) and KV caches, through
the same DecodingState as the transformers wrapper's cache."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from hyla.models.decoding import DecodingState
from hyla.models.hybrid import HybridLM


def sample_next(
    logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> Tensor:
    """[B, V] logits -> [B] token ids: greedy at temperature 0, else nucleus sampling."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(
            f"temperature must be >= 0 and top_p in (0, 1], got {temperature} and {top_p}"
        )
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_p, order = probs.sort(-1, descending=True)
    # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
    keep = sorted_p.cumsum(-1) - sorted_p < top_p
    sorted_p = sorted_p * keep
    choice = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


@torch.no_grad()
def generate(
    model: HybridLM,
    prompt: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    on_token: Callable[[Tensor], None] | None = None,
) -> Tensor:
    """[B, T0] prompt -> [B, T0 + max_new_tokens]: one prefill pass, then one token per step
    with constant memory per token for every linear mixer. `on_token` sees each step's [B]
    new tokens as they come (to stream them)."""
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be [B, T] with T >= 1, got shape {tuple(prompt.shape)}")
    state = DecodingState(model)
    hidden = state.step(model, prompt)
    tokens = [prompt]
    for step in range(max_new_tokens):
        nxt = sample_next(model.logits(hidden[:, -1]), temperature, top_p, generator)
        tokens.append(nxt[:, None])
        if on_token is not None:
            on_token(nxt)
        if step + 1 < max_new_tokens:
            hidden = state.step(model, nxt[:, None])
    return torch.cat(tokens, dim=1)
