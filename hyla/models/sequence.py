"""How a model sees its sequence: the interface between the models and whatever splits the
sequence across processes.

Mixers never touch the sequence's layout. A forward pass builds one `SequenceContext` from
the model's `SequenceStrategy` (`HybridLM.sequence`) and asks it for the few things that
depend on where the local tokens sit in the whole sequence:

- `positions`: each local token's position in its row (rotary embeddings);
- `recurrence` / `grouped_recurrence`: run a chunk op over the rows (or over groups of
  their tokens, as Mixture-of-Memories' memories), carrying state across the sequence;
- `causal`: apply a function that reads `width` tokens back (short convolutions);
- `attention`: causal softmax attention over the whole sequence;
- `total`: a count summed over the whole sequence (loss normaliser, MoM balance).

`WholeSequence` (here) holds every token in one process. `hyla.parallel` implements the
same interface for a sequence split across ranks and installs it with its `parallelize`.
Decoding goes through it too: `hyla.models.decoding.DecodingContext` is one layer's view of
a decoding step, which continues the sequence that layer's state holds. So every mixer has
one path for training, whole passes and step-by-step decoding. Document masking
(`doc_start`) is part of the context: no token sees another document.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from hyla.kernels import GroupedTokens, Segmentation, flash_attention

# fn(padded [B, width + n, C], reach [B, n] or None) -> [B, n, C'], for `causal`
CausalFn = Callable[[Tensor, Tensor | None], Tensor]


class SequenceContext(Protocol):
    """One forward pass's view of its sequence (a layer's, when decoding); tensors are the
    local tokens [B, T, ...]."""

    @property
    def positions(self) -> Tensor:
        """[T] each local token's position in its row ([B, T] when rows differ: decoding
        left-padded rows)."""
        ...

    def recurrence(self, op: Callable, q: Tensor, k: Tensor, v: Tensor, *gates) -> Tensor:
        """`op` (a hyla.kernels chunk op) over the rows, from a zero state at each row's
        (and document's) start: its output o for the local tokens."""
        ...

    def grouped_recurrence(
        self, op: Callable, tokens: GroupedTokens, q: Tensor, k: Tensor, v: Tensor, *gates
    ) -> Tensor:
        """`op` over packed tokens [1, N, ...] in `tokens`' order: one recurrence per
        (group, row), over that group's tokens of the row in time order."""
        ...

    def causal(self, fn: CausalFn, x: Tensor, width: int) -> Tensor:
        """fn applied to the local tokens x [B, T, C] preceded by the `width` tokens before
        them in the row (zeros before the row's start). fn also receives how far back each
        token may read (the tokens since its document began, capped at `width`), or None
        without document masking."""
        ...

    def attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Causal softmax attention of the local queries over the row's keys."""
        ...

    def total(self, x: Tensor) -> Tensor:
        """x summed over the whole sequence (not differentiable)."""
        ...


class SequenceStrategy(Protocol):
    def context(self, input_ids: Tensor, doc_start: Tensor | None) -> SequenceContext:
        """The context of one forward over input_ids [B, T] (the local tokens), with
        doc_start [B, T] bool (True at each document's first token) or None."""
        ...


def check_doc_start(doc_start: Tensor | None, input_ids: Tensor) -> None:
    if doc_start is None:
        return
    if not isinstance(doc_start, Tensor) or doc_start.dtype != torch.bool:
        raise ValueError(
            f"doc_start must be a bool tensor [B, T], got "
            f"{getattr(doc_start, 'dtype', type(doc_start).__name__)}"
        )
    if doc_start.shape != input_ids.shape or doc_start.device != input_ids.device:
        raise ValueError(
            f"doc_start must have input_ids' shape {tuple(input_ids.shape)} and device "
            f"{input_ids.device}, got {tuple(doc_start.shape)} on {doc_start.device}"
        )


def conv_reach(flags: Tensor, width: int) -> Tensor:
    """flags [B, width + n] bool (document starts, the first `width` before the tokens) ->
    [B, n] int64: how far back each of the n tokens may read, min(width, tokens since its
    document started)."""
    n = flags.shape[1] - width
    reach = torch.full((flags.shape[0], n), width, dtype=torch.long, device=flags.device)
    for back in range(width, -1, -1):  # the nearest start wins
        reach = reach.masked_fill(flags[:, width - back : width - back + n], back)
    return reach


def run_segments(
    op: Callable, segmentation: Segmentation, tokens: GroupedTokens, q, k, v, *gates
) -> Tensor:
    """`op` on packed tokens [1, N, ...], every segment from a zero state."""
    cu_seqlens, _, _ = segmentation.pack(tokens)
    return op(q, k, v, *gates, cu_seqlens=cu_seqlens)[0]


class WholeSequenceContext:
    """Every token of the rows is local: plain calls of the ops."""

    def __init__(self, input_ids: Tensor, doc_start: Tensor | None) -> None:
        check_doc_start(doc_start, input_ids)
        b, t = input_ids.shape
        self.positions = torch.arange(t, device=input_ids.device)
        self.doc_start = doc_start
        self.segmentation = (
            None if doc_start is None else Segmentation.build([t], doc_start, b, input_ids.device)
        )

    def recurrence(self, op, q, k, v, *gates) -> Tensor:
        if self.segmentation is None:
            return op(q, k, v, *gates)[0]
        b, t = q.shape[:2]
        tokens = GroupedTokens.every_token(b, t, q.device)
        flat = tuple(
            x if x is None or x.dim() == 1 else x.flatten(0, 1)[None] for x in (q, k, v, *gates)
        )
        return run_segments(op, self.segmentation, tokens, *flat)[0].unflatten(0, (b, t))

    def grouped_recurrence(self, op, tokens: GroupedTokens, q, k, v, *gates) -> Tensor:
        if self.segmentation is None:
            return op(q, k, v, *gates, cu_seqlens=tokens.cu_seqlens())[0]
        return run_segments(op, self.segmentation, tokens, q, k, v, *gates)

    def causal(self, fn: CausalFn, x: Tensor, width: int) -> Tensor:
        reach = None
        if self.doc_start is not None:
            reach = conv_reach(F.pad(self.doc_start, (width, 0)), width)
        return fn(F.pad(x, (0, 0, width, 0)), reach)

    def attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        doc = None if self.doc_start is None else self.doc_start.long().cumsum(1)
        return flash_attention(q, k, v, causal=True, q_doc=doc, k_doc=doc)

    def total(self, x: Tensor) -> Tensor:
        return x.detach()


class WholeSequence:
    """The default strategy: the whole sequence in this process."""

    def context(self, input_ids: Tensor, doc_start: Tensor | None) -> WholeSequenceContext:
        return WholeSequenceContext(input_ids, doc_start)
