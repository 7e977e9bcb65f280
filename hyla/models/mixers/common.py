"""What every linear mixer does around its kernel call: run it through the sequence context,
or, when decoding, carry the recurrent state from step to step."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

from hyla.kernels import GroupedTokens
from hyla.models.sequence import SequenceContext

# A layer's decoding state: whatever the mixer needs to continue a sequence (recurrent
# state, convolution history, KV cache). An empty dict means "start of the sequence".
LayerState = dict[str, Tensor]


def run_recurrence(
    op: Callable,
    seq: SequenceContext | None,
    state: LayerState | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *gates: Tensor | None,
    tokens: GroupedTokens | None = None,
) -> Tensor:
    """The chunk op `op` over a whole pass (`seq`), or a decoding step that starts from and
    updates state["recurrent"]. tokens: the inputs are packed grouped tokens [1, N, ...]."""
    if state is None:
        assert seq is not None  # HybridLM gives a context whenever it gives no state
        if tokens is None:
            return seq.recurrence(op, q, k, v, *gates)
        return seq.grouped_recurrence(op, tokens, q, k, v, *gates)
    o, state["recurrent"] = op(
        q,
        k,
        v,
        *gates,
        initial_state=state.get("recurrent"),
        output_final_state=True,
        cu_seqlens=None if tokens is None else tokens.cu_seqlens(),
    )
    return o


def heads(x: Tensor, n_heads: int) -> Tensor:
    """[B, T, H * D] -> [B, T, H, D]."""
    return x.unflatten(-1, (n_heads, -1))


def l2norm(x: Tensor) -> Tensor:
    return F.normalize(x.float(), dim=-1).to(x.dtype)
