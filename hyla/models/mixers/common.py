"""What every linear mixer does around its kernel call: carry the recurrent state."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

from hyla.kernels import chunk_gated_delta_rule, chunk_gla, chunk_linear_attn
from hyla.parallel import lasp2_gated_delta_rule, lasp2_gla, lasp2_linear_attn
from hyla.parallel.context import SequenceParallel

# A layer's decoding state: whatever the mixer needs to continue a sequence (recurrent
# state, convolution history, KV cache). An empty dict means "start of the sequence".
LayerState = dict[str, Tensor]


LASP2 = {
    chunk_linear_attn: lasp2_linear_attn,
    chunk_gla: lasp2_gla,
    chunk_gated_delta_rule: lasp2_gated_delta_rule,
}


def run_recurrent(
    op: Callable,
    state: LayerState | None,
    *args: Tensor | None,
    sp: SequenceParallel | None = None,
    **kwargs,
) -> Tensor:
    """Call a chunk op on the whole sequence, or its LASP-2 version on this rank's shard;
    when decoding, start from and update state["recurrent"]."""
    if sp is not None:
        if state is not None:
            raise ValueError("decoding (a layer state) is not supported under sequence parallelism")
        return LASP2[op](*args, group=sp.group, **kwargs)
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
