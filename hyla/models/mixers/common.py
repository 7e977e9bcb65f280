"""What every linear mixer does around its kernel call: run it through the sequence context,
or, when decoding, carry the recurrent state from step to step."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from hyla.kernels import FUSED_RECURRENT_OPS, GroupedTokens
from hyla.kernels.chunking import CHUNK
from hyla.models.sequence import SequenceContext

# A layer's decoding state: whatever the mixer needs to continue a sequence (recurrent
# state, convolution history, KV cache). An empty dict means "start of the sequence".
LayerState = dict[str, Tensor]

# The longest decoding input, in tokens per sequence, that takes the fused recurrent op, by
# device type; longer ones take the chunk op. A chunk op pads to whole CHUNK-token chunks, so
# for a few tokens it does a full chunk's work, while the token loop's cost grows with T.
# CPU (PyTorch): measured (`benchmarks/decode.py --sweep`, docs/results.md), the token loop
# wins up to about 16 tokens, its per-token op overhead losing beyond. CUDA (Triton): one
# launch for every token, as flash-linear-attention's layers do up to 64 tokens; not yet
# measured here. benchmarks/decode.py sets them to 0 to measure the chunk path.
FUSED_MAX_TOKENS = {"cpu": 16, "cuda": CHUNK}


def decode_op(op: Callable, steps: int, q: Tensor, *inputs: Tensor | None) -> Callable:
    """The op a decoding step of `steps` tokens per sequence runs: the chunk op `op`, or its
    fused recurrent form for short inputs, unless a gradient must flow (it has no backward)."""
    limit = FUSED_MAX_TOKENS.get(q.device.type, FUSED_MAX_TOKENS["cpu"])
    grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, *inputs))
    return op if grad or steps > limit else FUSED_RECURRENT_OPS[op]


def tokens_per_row(tokens: GroupedTokens) -> int:
    """The most tokens any packed sequence of grouped tokens can hold: the rows' length."""
    return int(tokens.time.max()) + 1 if tokens.time.numel() else 0


def run_recurrence(
    op: Callable,
    seq: SequenceContext | None,
    state: LayerState | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *gates: Tensor | None,
    tokens: GroupedTokens | None = None,
    valid: Tensor | None = None,
) -> Tensor:
    """The chunk op `op` over a whole pass (`seq`), or a decoding step that starts from and
    updates state["recurrent"] (through `decode_op`). tokens: the inputs are packed grouped
    tokens [1, N, ...]. valid (decoding only; q's leading dims, bool): False at padding,
    which leaves the state as it was (see `skip_padding`)."""
    if state is None:
        assert seq is not None  # HybridLM gives a context whenever it gives no state
        if tokens is None:
            return seq.recurrence(op, q, k, v, *gates)
        return seq.grouped_recurrence(op, tokens, q, k, v, *gates)
    if valid is not None:
        k = skip_padding(k, valid)
        gates = tuple(g if g is None else skip_padding(g, valid) for g in gates)
    initial_state = state.get("recurrent")
    steps = q.shape[1] if tokens is None else tokens_per_row(tokens)
    step_op = decode_op(op, steps, q, k, v, *gates, initial_state)
    o, state["recurrent"] = step_op(
        q,
        k,
        v,
        *gates,
        initial_state=initial_state,
        output_final_state=True,
        cu_seqlens=None if tokens is None else tokens.cu_seqlens(),
    )
    return o


def skip_padding(x: Tensor, valid: Tensor) -> Tensor:
    """A recurrence's key or gate input (k, a log-decay, beta) with every padded token's entry
    zeroed: a zero key writes nothing, a zero log-decay keeps the state undecayed, a zero beta
    corrects nothing, so a padded token passes the state through unchanged in every family.
    valid [B, T] bool; a constant per-head log-decay [H] becomes per-token [B, T, H]."""
    if x.dim() == 1:
        x = x.expand(*valid.shape, -1)
    return x.masked_fill(~valid.view(*valid.shape, *[1] * (x.dim() - 2)), 0)


def heads(x: Tensor, n_heads: int) -> Tensor:
    """[B, T, H * D] -> [B, T, H, D]."""
    return x.unflatten(-1, (n_heads, -1))


def l2norm(x: Tensor) -> Tensor:
    return F.normalize(x.float(), dim=-1).to(x.dtype)
