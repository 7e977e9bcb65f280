"""Input validation shared by every kernel entry point.

Every check raises ValueError naming the argument, what was received and what is
allowed: a kernel must never silently compute on inputs it does not understand.

Non-finite values: log-gates are always checked (a NaN or infinite gate breaks the chunkwise
form); q, k, v, beta and initial states are checked at each public entry unless
HYLA_CHECK_FINITE=0, which saves one pass over the inputs (and, on a GPU, a sync) per call.
Code that torch.compile traces skips the checks on values (finiteness, gates <= 0): each
reads a tensor's data back into Python, which would break the graph at every kernel call.
The checks on shapes, dtypes and devices still run, once, while it traces.
"""

from __future__ import annotations

import math
import os
from itertools import pairwise

import torch
from torch import Tensor

FINITE_ENV_VAR = "HYLA_CHECK_FINITE"


def check_finite_enabled() -> bool:
    return os.environ.get(FINITE_ENV_VAR, "1") != "0"


def _values_checked() -> bool:
    """False while torch.compile traces (module docstring)."""
    return not torch.compiler.is_compiling()


def check_finite(name: str, t: Tensor | None) -> None:
    """NaN or infinite entries in an input: a clear error instead of NaN outputs."""
    if t is None or not check_finite_enabled() or not _values_checked():
        return
    # A NaN or infinite entry makes the sum NaN or infinite, so a finite sum clears the
    # tensor in one pass with no temporaries (a decoding step's whole state, each step); only
    # a non-finite sum, which may be a finite overflow, takes the exact element-wise test.
    if bool(torch.isfinite(t.detach().sum())):
        return
    if not bool(torch.isfinite(t.detach()).all()):
        bad = int((~torch.isfinite(t.detach())).sum())
        raise ValueError(
            f"{name} must be finite, got {bad} NaN or infinite entries (set "
            f"{FINITE_ENV_VAR}=0 to skip this check)"
        )


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    """q, k: [B, T, H, K]; v: [B, T, H, V]; one floating dtype and one device."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, T, H, D], got shape {_shape(t)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {_shape(q)} [B, T, H, K], got {_shape(k)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"v must be [B, T, H, V] with B, T, H = {tuple(q.shape[:3])} as in q, got {_shape(v)}"
        )
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    if q.shape[1] < 1:
        raise ValueError(f"the sequence length (dim 1 of q) must be >= 1, got {q.shape[1]}")
    if min(q.shape[0], q.shape[2], q.shape[3], v.shape[3]) < 1:
        raise ValueError(f"q and v must have non-empty B, H and D, got {_shape(q)}, {_shape(v)}")


def check_scale(scale: float | None) -> None:
    ok = isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0
    if scale is not None and not (ok and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite positive number or None, got {scale!r}")


def check_aux(name: str, t: Tensor, expected: tuple[int, ...], like: Tensor) -> None:
    """A per-token tensor (gate, beta) of an exact shape, on q's device, floating point."""
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if _shape(t) != expected:
        raise ValueError(f"{name} must have shape {expected}, got {_shape(t)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"{name} must be on q's device {like.device}, got {t.device}")


def check_log_gate(name: str, g: Tensor) -> None:
    """Gates are log-decays: a positive value would make the state grow without bound."""
    if not _values_checked():
        return
    if not bool(torch.isfinite(g.detach()).all()):
        raise ValueError(f"{name} must be finite log-gates (<= 0), got non-finite values")
    top = float(g.detach().max()) if g.numel() else 0.0
    if top > 0:
        raise ValueError(f"{name} holds log-gates and must be <= 0 everywhere, got max {top:.6g}")


def check_cu_seqlens(cu_seqlens: Tensor | None, q: Tensor) -> int:
    """Validate packed-sequence offsets; returns the number of sequences N (B if unpacked).

    Offsets must start at 0, never decrease and end at T. Equal neighbours (an empty
    sequence) are allowed: that sequence's final state is its initial state.
    """
    batch, seq_len = q.shape[0], q.shape[1]
    if cu_seqlens is None:
        return batch
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1:
        raise ValueError(
            "cu_seqlens must be a 1-D integer tensor [N+1] of sequence offsets, got "
            f"{type(cu_seqlens).__name__} of shape {getattr(cu_seqlens, 'shape', None)}"
        )
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must have dtype int32 or int64, got {cu_seqlens.dtype}")
    if batch != 1:
        raise ValueError(f"with cu_seqlens the batch size (dim 0 of q) must be 1, got {batch}")
    if cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens needs at least 2 entries [0, ..., T], got {cu_seqlens.numel()}"
        )
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {offsets[0]}")
    if offsets[-1] != seq_len:
        raise ValueError(f"cu_seqlens must end at T = {seq_len} (dim 1 of q), got {offsets[-1]}")
    for i, (a, b) in enumerate(pairwise(offsets)):
        if b < a:
            raise ValueError(
                f"cu_seqlens must be non-decreasing, got {a} then {b} at positions {i}, {i + 1}"
            )
    return len(offsets) - 1


def check_initial_state(
    initial_state: Tensor | None, n: int, q: Tensor, v: Tensor, packed: bool
) -> None:
    """initial_state: [N, H, K, V] (N = B, or the number of packed sequences)."""
    if initial_state is None:
        return
    expected = (n, q.shape[2], q.shape[3], v.shape[3])
    rows = "N (number of sequences in cu_seqlens)" if packed else "B"
    if not isinstance(initial_state, Tensor):
        raise ValueError(
            f"initial_state must be a torch.Tensor, got {type(initial_state).__name__}"
        )
    if _shape(initial_state) != expected:
        raise ValueError(
            f"initial_state must have shape [{rows}, H, K, V] = {expected}, "
            f"got {_shape(initial_state)}"
        )
    if not initial_state.is_floating_point():
        raise ValueError(f"initial_state must be floating point, got dtype {initial_state.dtype}")
    if initial_state.device != q.device:
        raise ValueError(
            f"initial_state must be on q's device {q.device}, got {initial_state.device}"
        )


def check_common(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float | None,
    initial_state: Tensor | None,
    cu_seqlens: Tensor | None,
) -> float:
    """The checks every op shares; returns the scale to use (K^-0.5 by default)."""
    check_qkv(q, k, v)
    check_scale(scale)
    n = check_cu_seqlens(cu_seqlens, q)
    check_initial_state(initial_state, n, q, v, packed=cu_seqlens is not None)
    for name, t in (("q", q), ("k", k), ("v", v), ("initial_state", initial_state)):
        check_finite(name, t)
    return float(scale) if scale is not None else q.shape[-1] ** -0.5
