"""Sequence-parallel linear-recurrent ops: this rank's contiguous shard in, its output
shard out, autograd-correct, for any group size and shard lengths >= 1.

`lasp2_*` are LASP-2 (`hyla.parallel.lasp2`); `lasp1_*` the LASP-1-style ring baseline
(`hyla.parallel.ring`), same interface. With `cu_seqlens` alone, packed sequence i of every
rank continues packed sequence i of the rank before (Mixture-of-Memories uses this);
`chains` (`hyla.parallel.chains.Chains`) says otherwise which packed sequences continue
which, as document masking needs.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

from hyla.kernels.checks import check_aux, check_common, check_log_gate
from hyla.kernels.linear_attn import token_gate
from hyla.kernels.varlen import PackedLayout
from hyla.parallel.chains import Chains
from hyla.parallel.lasp2 import Lasp2Function
from hyla.parallel.ring import RingFunction

FUNCTIONS = {"lasp2": Lasp2Function, "lasp1": RingFunction}


def _run(
    method: str,
    family: str,
    group: dist.ProcessGroup | None,
    scale: float,
    backend: str | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    per_token: tuple[Tensor | None, ...],
    cu_seqlens: Tensor | None,
    chains: Chains | None,
) -> Tensor:
    """Packs varlen input, then runs the method's autograd Function on the padded batch."""
    if group is None:
        raise ValueError("group must be the sequence-parallel process group, got None")
    if not dist.is_initialized():
        raise ValueError("torch.distributed must be initialised before a sequence-parallel op")
    if method not in FUNCTIONS:
        raise ValueError(f"method must be one of {tuple(FUNCTIONS)}, got {method!r}")
    layout = PackedLayout.from_cu_seqlens(cu_seqlens) if cu_seqlens is not None else None
    inputs = (q, k, v, *per_token)
    if layout is not None:
        inputs = tuple(None if x is None else layout.pad(x) for x in inputs)
    if chains is None:
        chains = Chains.one_per_segment(inputs[0].shape[0], q.device)
    o = FUNCTIONS[method].apply(family, group, scale, backend, chains, *inputs)
    return layout.unpad(o) if layout is not None else o


def _gla_gate(gk: Tensor, q: Tensor) -> Tensor:
    check_aux("gk", gk, tuple(q.shape), q)
    check_log_gate("gk", gk)
    return gk.float()


def _delta_gates(beta: Tensor, g: Tensor | None, q: Tensor) -> tuple[Tensor, Tensor | None]:
    check_aux("beta", beta, tuple(q.shape[:3]), q)
    if g is None:
        return beta, None
    check_aux("g", g, tuple(q.shape[:3]), q)
    check_log_gate("g", g)
    return beta, g.float()


def linear_attn_sp(
    method: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None = None,
    *,
    group: dist.ProcessGroup,
    scale: float | None = None,
    cu_seqlens: Tensor | None = None,
    chains: Chains | None = None,
    backend: str | None = None,
) -> Tensor:
    """`chunk_linear_attn` on a sequence split across `group` (g: None, [H] or
    [B, T_r, H])."""
    scale = check_common(q, k, v, scale, None, cu_seqlens)
    gate = token_gate(g, q)
    return _run(method, "linear_attn", group, scale, backend, q, k, v, (gate,), cu_seqlens, chains)


def gla_sp(
    method: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gk: Tensor,
    *,
    group: dist.ProcessGroup,
    scale: float | None = None,
    cu_seqlens: Tensor | None = None,
    chains: Chains | None = None,
    backend: str | None = None,
) -> Tensor:
    """`chunk_gla` on a sequence split across `group` (gk [B, T_r, H, K])."""
    scale = check_common(q, k, v, scale, None, cu_seqlens)
    gate = _gla_gate(gk, q)
    return _run(method, "gla", group, scale, backend, q, k, v, (gate,), cu_seqlens, chains)


def gated_delta_rule_sp(
    method: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None = None,
    *,
    group: dist.ProcessGroup,
    scale: float | None = None,
    cu_seqlens: Tensor | None = None,
    chains: Chains | None = None,
    backend: str | None = None,
) -> Tensor:
    """`chunk_gated_delta_rule` on a sequence split across `group`."""
    scale = check_common(q, k, v, scale, None, cu_seqlens)
    gates = _delta_gates(beta, g, q)
    return _run(
        method, "gated_delta_rule", group, scale, backend, q, k, v, gates, cu_seqlens, chains
    )


def lasp2_linear_attn(q, k, v, g=None, **kwargs) -> Tensor:
    """LASP-2 `chunk_linear_attn`: see `linear_attn_sp` for the arguments."""
    return linear_attn_sp("lasp2", q, k, v, g, **kwargs)


def lasp2_gla(q, k, v, gk, **kwargs) -> Tensor:
    """LASP-2 `chunk_gla`: see `gla_sp` for the arguments."""
    return gla_sp("lasp2", q, k, v, gk, **kwargs)


def lasp2_gated_delta_rule(q, k, v, beta, g=None, **kwargs) -> Tensor:
    """LASP-2 `chunk_gated_delta_rule`: see `gated_delta_rule_sp` for the arguments."""
    return gated_delta_rule_sp("lasp2", q, k, v, beta, g, **kwargs)


def lasp1_linear_attn(q, k, v, g=None, **kwargs) -> Tensor:
    """LASP-1 ring baseline of `lasp2_linear_attn`, same interface."""
    return linear_attn_sp("lasp1", q, k, v, g, **kwargs)


def lasp1_gla(q, k, v, gk, **kwargs) -> Tensor:
    """LASP-1 ring baseline of `lasp2_gla`, same interface."""
    return gla_sp("lasp1", q, k, v, gk, **kwargs)


def lasp1_gated_delta_rule(q, k, v, beta, g=None, **kwargs) -> Tensor:
    """LASP-1 ring baseline of `lasp2_gated_delta_rule`, same interface."""
    return gated_delta_rule_sp("lasp1", q, k, v, beta, g, **kwargs)
