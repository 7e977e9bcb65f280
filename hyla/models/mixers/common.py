"""What every linear mixer does around its kernel call: carry the recurrent state."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

# A layer's decoding state: whatever the mixer needs to continue a sequence (recurrent
# state, convolution history, KV cache). An empty dict means "start of the sequence".
LayerState = dict[str, Tensor]


def run_recurrent(op: Callable, state: LayerState | None, *args: Tensor | None, **kwargs) -> Tensor:
    """Call a chunk op, starting from and updating state["recurrent"] when decoding."""
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
