"""Decoding: what a HybridLM needs to continue its rows one step at a time.

`DecodingContext` is one layer's view of a decoding step, through the same
`SequenceContext` interface as a whole pass, so each mixer has one path: each request
continues from, and updates, the layer's state. `DecodingState` holds a batch's states
between steps; `hyla.models.generate` and the transformers wrapper's cache
(hyla.models.hf.HylaCache) both decode through `DecodingState.step`, so they run the same
code on the same numbers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from hyla.kernels import GroupedTokens, flash_attention
from hyla.models.mixers.common import LayerState, decode_op, skip_padding, tokens_per_row
from hyla.models.sequence import CausalFn

if TYPE_CHECKING:
    from hyla.models.hybrid import HybridLM


class DecodingContext:
    """One layer's view of a decoding step (the `SequenceContext` interface): the rows' new
    tokens input_ids [B, T] continue, in this process, the sequence that `state` (the
    layer's LayerState, updated in place) holds so far. A layer makes at most one request of
    each kind per step: its recurrence (state["recurrent"]), its short convolution (the last
    inputs, state["conv"]) or its attention (the K/V cache, state["k"] and state["v"]).

    valid [B, T] bool: False at left padding, which changes no state and no token's output
    (`DecodingState` checks that padding is on the left)."""

    def __init__(self, input_ids: Tensor, state: LayerState, valid: Tensor | None = None) -> None:
        self.state, self.valid = state, valid
        self.batch, self.steps = input_ids.shape
        self.device = input_ids.device

    @functools.cached_property
    def _rotary(self) -> tuple[Tensor, Tensor | None]:
        """(positions, document ids of the cached and new keys), from the cache as it is
        before this step's keys join it."""
        return decoding_positions(self.state, self.batch, self.steps, self.device, self.valid)

    @property
    def positions(self) -> Tensor:
        return self._rotary[0]

    def recurrence(self, op: Callable, q: Tensor, k: Tensor, v: Tensor, *gates) -> Tensor:
        return self._recurrent_step(op, None, self.valid, q, k, v, *gates)

    def grouped_recurrence(
        self, op: Callable, tokens: GroupedTokens, q: Tensor, k: Tensor, v: Tensor, *gates
    ) -> Tensor:
        valid = None if self.valid is None else self.valid[tokens.row, tokens.time][None]
        return self._recurrent_step(op, tokens, valid, q, k, v, *gates)

    def _recurrent_step(
        self,
        op: Callable,
        tokens: GroupedTokens | None,
        valid: Tensor | None,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *gates: Tensor | None,
    ) -> Tensor:
        """The chunk op `op` (or its fused recurrent form: `decode_op`) from and into
        state["recurrent"]; tokens: the inputs are packed grouped tokens [1, N, ...]; valid
        (q's leading dims): False at padding, which leaves the state as it was."""
        if valid is not None:
            k = skip_padding(k, valid)
            gates = tuple(g if g is None else skip_padding(g, valid) for g in gates)
        initial_state = self.state.get("recurrent")
        steps = q.shape[1] if tokens is None else tokens_per_row(tokens)
        step_op = decode_op(op, steps, q, k, v, *gates, initial_state)
        o, self.state["recurrent"] = step_op(
            q,
            k,
            v,
            *gates,
            initial_state=initial_state,
            output_final_state=True,
            cu_seqlens=None if tokens is None else tokens.cu_seqlens(),
        )
        return o

    def causal(self, fn: CausalFn, x: Tensor, width: int) -> Tensor:
        """fn over x preceded by the layer's last `width` inputs (zeros at the start)."""
        if self.valid is not None:
            # Padding comes only before a row's first token: as zeros, it reads exactly as
            # the zeros before a sequence's start, so the tail never holds a pad.
            x = x.masked_fill(~self.valid[..., None], 0)
        history = self.state.get("conv", x.new_zeros(x.shape[0], width, x.shape[2]))
        padded = torch.cat([history.to(x.dtype), x], dim=1)
        self.state["conv"] = padded[:, padded.shape[1] - width :]
        return fn(padded, None)

    def attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The new queries, after the cached positions, over the cached and new keys, which
        join the cache; no token sees a padded key."""
        docs = self._rotary[1]
        offset = cached_length(self.state)
        if "k" in self.state:
            k, v = torch.cat([self.state["k"], k], 1), torch.cat([self.state["v"], v], 1)
        self.state["k"], self.state["v"] = k, v
        q_doc, k_doc = (None, None) if docs is None else (docs[:, offset:], docs)
        return flash_attention(q, k, v, causal=True, q_offset=offset, q_doc=q_doc, k_doc=k_doc)

    def total(self, x: Tensor) -> Tensor:
        return x.detach()  # the whole sequence is in this process


def decoding_positions(
    state: LayerState, batch: int, steps: int, device: torch.device, valid: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """The rotary positions of a decoding step's `steps` tokens in each of `batch` rows, and
    the document ids of the cached and new keys that keep padding out of attention (None
    without padding).

    Without padding so far, positions continue the cache's: [T]. Once a row has had padding,
    state["pads"] [B] counts its padded tokens, all before its first token (the decoding
    state refuses any other padding), so its tokens' positions [B, T] are their indices less
    that count, and the ids are 1 at tokens, 0 at padding: a token sees tokens only, a
    padded query padding only (so never nothing)."""
    offset = cached_length(state)
    index = torch.arange(offset, offset + steps, device=device)
    if valid is None and "pads" not in state:
        return index, None
    pads = state.get("pads", torch.zeros(batch, dtype=torch.long, device=device))
    if valid is not None:
        pads = pads + (~valid).sum(1)
    state["pads"] = pads
    docs = (torch.arange(offset + steps, device=device) >= pads[:, None]).long()
    return (index - pads[:, None]).clamp_min(0), docs


def cached_length(state: LayerState) -> int:
    """Keys in a decoding state's cache (padding included)."""
    return state["k"].shape[1] if "k" in state else 0


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
