"""A batch's decoding state: what a HybridLM needs to continue its rows one step at a time.

`hyla.models.generate` and the transformers wrapper's cache (hyla.models.hf.HylaCache) both
decode through `DecodingState.step`, so they run the same code on the same numbers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hyla.models.hybrid import HybridLM
from hyla.models.mixers.common import LayerState


class DecodingState:
    """Each layer's LayerState (recurrent state of L, G, D and MoM layers, short-convolution
    tails, attention K/V), the tokens every row has taken so far (padding included), and
    which rows have begun, i.e. taken a token that is not padding.

    Padding goes on the left only: a row's padding comes before its first token, as
    transformers' decoder-only generation lays out a batch of prompts. Padding elsewhere
    would have to be skipped by the short convolutions, which read it as zeros instead, so
    it is refused.

    Every state tensor holds its rows group-major (group g of row b at g * B + b): one group
    for most layers, one per memory for MoM. `select` relies on it."""

    layers: list[LayerState]
    seen: int
    begun: Tensor | None  # [B] bool, from the first step on

    def __init__(self, model: HybridLM) -> None:
        self.layers = model.new_states()
        self.reset()

    def reset(self) -> None:
        """Back to the start of a sequence, for any batch size."""
        self.layers = [{} for _ in self.layers]
        self.seen, self.begun = 0, None

    @property
    def batch_size(self) -> int | None:
        """Rows decoded so far; None before the first step."""
        return None if self.begun is None else self.begun.shape[0]

    def step(self, model: HybridLM, input_ids: Tensor, mask: Tensor | None = None) -> Tensor:
        """input_ids [B, T] continuing every row -> final-normed hidden states [B, T, d].
        mask [B, T] (1 at tokens, 0 at padding, as transformers' attention_mask) covers
        these tokens only; None: all tokens."""
        if len(self.layers) != len(model.blocks):
            raise ValueError(
                f"this decoding state holds {len(self.layers)} layers' states but the model "
                f"has {len(model.blocks)} layers: start a new state for it"
            )
        valid = self._valid(input_ids, mask)
        hidden, _ = model.hidden_states(input_ids, self.layers, valid=valid)
        self.seen += input_ids.shape[1]
        return hidden

    def _valid(self, input_ids: Tensor, mask: Tensor | None) -> Tensor | None:
        """The step's [B, T] bool padding mask (None when it holds no padding, so that an
        unpadded batch decodes exactly as before), with `begun` updated."""
        if input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise ValueError(
                f"input_ids must be [B, T] with T >= 1, got shape {tuple(input_ids.shape)}"
            )
        if self.batch_size not in (None, input_ids.shape[0]):
            raise ValueError(
                f"input_ids has {input_ids.shape[0]} rows but the decoding state holds "
                f"{self.batch_size}"
            )
        if mask is None:
            self.begun = torch.ones_like(input_ids[:, 0], dtype=torch.bool)
            return None
        valid = _check_mask(mask, input_ids)
        started = valid.cumsum(1) > 0  # a token at or before t
        if self.begun is not None:
            started = started | self.begun[:, None]
        if (late := started & ~valid).any():
            row = int(late.any(1).nonzero()[0])
            raise ValueError(
                f"attention_mask row {row} has padding (0) after a token (1): only left "
                "padding is supported, each row's padding before its first token"
            )
        self.begun = started[:, -1]
        return None if bool(valid.all()) else valid

    def select(self, index: Tensor) -> None:
        """Keep the rows `index` [B'] (int64) picks, in its order, repeats allowed: beam
        search's reordering, or a batch expanded for several sequences per prompt."""
        if self.begun is None:
            return
        rows, index = self.begun.shape[0], index.to(self.begun.device)
        for state in self.layers:
            for key, value in state.items():
                state[key] = value.unflatten(0, (-1, rows)).index_select(1, index).flatten(0, 1)
        self.begun = self.begun.index_select(0, index)


def _check_mask(mask: Tensor, input_ids: Tensor) -> Tensor:
    """An attention_mask of 0s and 1s shaped as input_ids, as bool."""
    if mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask for these tokens must have input_ids' shape "
            f"{tuple(input_ids.shape)}, got {tuple(mask.shape)}"
        )
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(
            f"attention_mask must hold 0 (padding) and 1 (token) only, got values "
            f"{sorted(set(mask.unique().tolist()))}"
        )
    return mask.bool()
