"""Long sequences run through a chunk implementation a span at a time.

The PyTorch chunkwise paths batch each call's per-chunk work over all chunks at once, so
their temporaries ([chunks, CHUNK, CHUNK] score, decay and WY matrices, per-chunk states)
grow as O(T * CHUNK) floats: gigabytes for a few hundred thousand tokens. Each recurrence
acts on its state alone, so a call may instead run span by span with the state
carried between them (docs/design.md §1): the same math, with temporaries bounded by the
span. Backward re-derives the states entering each span with a forward pass over
the spans (with the implementation's `final_state` where it has one, which skips the
outputs), then runs them in reverse, each span's initial-state gradient becoming the
previous span's final-state gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import torch
from torch import Tensor

SPAN_TOKENS = 8192  # a multiple of every chunk size (64 tokens, GLA's 16-token sub-chunks)


def _tokens(per_token: Sequence[Tensor | None]) -> int:
    """T of per-token inputs [B, T, H, ...]: the first, q, is always given."""
    q = per_token[0]
    assert q is not None
    return q.shape[1]


def _span(inputs: Sequence[Tensor | None], start: int, stop: int) -> list[Tensor | None]:
    """Tokens [start, stop) of per-token inputs [B, T, H, ...] (None stays None)."""
    return [None if x is None else x[:, start:stop] for x in inputs]


def _cat_tokens(parts: list[Tensor | None]) -> Tensor | None:
    """One input's gradient from its spans': None for every span or for none."""
    return None if parts[0] is None else torch.cat([p for p in parts if p is not None], dim=1)


class Spanned:
    """A chunk implementation's forward/backward contract (hyla.kernels.autograd) over
    spans of at most SPAN_TOKENS tokens; shorter inputs pass straight through."""

    def __init__(self, impl: ModuleType) -> None:
        self.impl = impl
        self.__name__ = impl.__name__

    def _bounds(self, t: int) -> list[tuple[int, int]]:
        return [(a, min(a + SPAN_TOKENS, t)) for a in range(0, t, SPAN_TOKENS)]

    def forward(self, *inputs: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
        *per_token, state = inputs
        bounds = self._bounds(_tokens(per_token))
        if len(bounds) == 1:
            return self.impl.forward(*inputs, scale=scale)
        outputs = []
        for start, stop in bounds:
            o, state = self.impl.forward(*_span(per_token, start, stop), state, scale=scale)
            outputs.append(o)
        assert state is not None  # each span returned its final state
        return torch.cat(outputs, dim=1), state

    def _final_state(self, *inputs: Tensor | None, scale: float) -> Tensor:
        """The state after a span: `impl.final_state` if it has one, else its forward's."""
        if hasattr(self.impl, "final_state"):
            return self.impl.final_state(*inputs, scale=scale)
        return self.impl.forward(*inputs, scale=scale)[1]

    def backward(self, *inputs: Tensor | None, scale: float) -> tuple[Tensor | None, ...]:
        *per_token, initial_state, do, dfinal = inputs
        assert do is not None  # do and dfinal are always given
        bounds = self._bounds(_tokens(per_token))
        if len(bounds) == 1:
            return self.impl.backward(*inputs, scale=scale)
        entering, state = [], initial_state
        for start, stop in bounds[:-1]:
            entering.append(state)
            state = self._final_state(*_span(per_token, start, stop), state, scale=scale)
        entering.append(state)
        grads: list[list[Tensor | None]] = []
        d_state = dfinal
        for (start, stop), state in zip(reversed(bounds), reversed(entering), strict=True):
            *span_grads, d_state = self.impl.backward(
                *_span(per_token, start, stop),
                state,
                do[:, start:stop],
                d_state,
                scale=scale,
            )
            grads.append(span_grads)
        grads.reverse()
        return (*(_cat_tokens(list(parts)) for parts in zip(*grads, strict=True)), d_state)
