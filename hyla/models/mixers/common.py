"""What every linear mixer does around its kernel call: carry the recurrent state."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

from hyla.kernels import chunk_gated_delta_rule, chunk_gla, chunk_linear_attn
from hyla.models.documents import Documents
from hyla.parallel.chains import Chains
from hyla.parallel.context import SequenceParallel
from hyla.parallel.ops import gated_delta_rule_sp, gla_sp, linear_attn_sp
from hyla.parallel.ulysses import ulysses

# A layer's decoding state: whatever the mixer needs to continue a sequence (recurrent
# state, convolution history, KV cache). An empty dict means "start of the sequence".
LayerState = dict[str, Tensor]


SEQUENCE_PARALLEL_OPS = {
    chunk_linear_attn: linear_attn_sp,
    chunk_gla: gla_sp,
    chunk_gated_delta_rule: gated_delta_rule_sp,
}


def run_recurrent(
    op: Callable,
    state: LayerState | None,
    *args: Tensor | None,
    sp: SequenceParallel | None = None,
    docs: Documents | None = None,
    chains: Chains | None = None,
    **kwargs,
) -> Tensor:
    """Call a chunk op on the whole sequence, or its LASP-2 version on this rank's shard;
    when decoding, start from and update state["recurrent"].

    docs: restart the recurrence at every document start (the [B, T] rows are flattened
    and cut into their document pieces). chains: how packed sequences (cu_seqlens in
    kwargs) continue across ranks, under sequence parallelism."""
    if docs is not None:
        if state is not None:
            raise ValueError("document masking (doc_start) is not supported when decoding")
        b, t = args[0].shape[:2]
        flat = tuple(x if x is None or x.dim() == 1 else x.flatten(0, 1)[None] for x in args)
        o = run_recurrent(
            op, None, *flat, sp=sp, chains=docs.chains, cu_seqlens=docs.cu_seqlens, **kwargs
        )
        return o[0].unflatten(0, (b, t))
    if sp is not None:
        if state is not None:
            raise ValueError("decoding (a layer state) is not supported under sequence parallelism")
        if sp.method == "ulysses":
            return run_ulysses(lambda *whole: op(*whole, **kwargs)[0], args, sp)
        return SEQUENCE_PARALLEL_OPS[op](sp.method, *args, group=sp.group, chains=chains, **kwargs)
    initial = None if state is None else state.get("recurrent")
    o, final = op(*args, initial_state=initial, output_final_state=state is not None, **kwargs)
    if state is not None:
        state["recurrent"] = final
    return o


def heads(x: Tensor, n_heads: int) -> Tensor:
    """[B, T, H * D] -> [B, T, H, D]."""
    return x.unflatten(-1, (n_heads, -1))


def l2norm(x: Tensor) -> Tensor:
    return F.normalize(x.float(), dim=-1).to(x.dtype)


def run_ulysses(fn: Callable, args: tuple[Tensor | None, ...], sp: SequenceParallel) -> Tensor:
    """Ulysses baseline: fn on whole-sequence head groups. A per-head constant ([H]) is
    expanded to every token first so that it is split by heads like the rest."""
    q = args[0]
    per_head = tuple(
        x.expand(q.shape[0], q.shape[1], -1) if x is not None and x.dim() == 1 else x for x in args
    )
    return ulysses(fn, per_head, group=sp.group, lengths=list(sp.shard_lengths))
