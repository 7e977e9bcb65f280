"""Tiled (flash-style) softmax attention with GQA, a causal query offset and document masks.

Hybrid models interleave it with the linear layers; sequence parallelism (LASP-2H,
docs/design.md §5) calls it with the shard's queries at an offset into the gathered keys.
No T x T score or mask tensor is ever built: both backends walk query and key tiles, and
backward recomputes the scores from the saved row log-sum-exp.

An implementation (`hyla.kernels.attention.{torch,triton}_chunk`) provides

    forward(q, k, v, *, causal, q_offset, scale, q_doc, k_doc)
        -> (o [B, Tq, Hq, Dv], lse [B, Hq, Tq])
    backward(q, k, v, o, lse, do, *, causal, q_offset, scale, q_doc, k_doc) -> (dq, dk, dv)

with fp32 results, lse the natural-log log-sum-exp of each row of scaled scores. q_doc and
k_doc are None or contiguous int32 document ids [B, Tq] and [B, Tk]: query i sees key j only
if they are equal. A query that sees no key at all gets o = 0, lse = +inf and no gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hyla.kernels.backend import implementation, resolve_backend
from hyla.kernels.checks import check_finite, check_scale
from hyla.kernels.custom_ops import define_op

__all__ = ["KEEP_UNDER_CHECKPOINT", "flash_attention", "reference_attention"]


def _check_docs(q: Tensor, k: Tensor, q_doc: Tensor | None, k_doc: Tensor | None) -> None:
    """Document ids: both None, or integer [B, Tq] and [B, Tk] on q's device."""
    if (q_doc is None) != (k_doc is None):
        raise ValueError(
            f"q_doc and k_doc must be given together, got q_doc "
            f"{'None' if q_doc is None else 'a tensor'} and k_doc "
            f"{'None' if k_doc is None else 'a tensor'}"
        )
    if q_doc is None:
        return
    for name, ids, like in (("q_doc", q_doc, q), ("k_doc", k_doc, k)):
        expected = tuple(like.shape[:2])
        if not isinstance(ids, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"{name} must hold integer document ids, got dtype {ids.dtype}")
        if tuple(ids.shape) != expected:
            raise ValueError(f"{name} must have shape [B, T] = {expected}, got {tuple(ids.shape)}")
        if ids.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {ids.device}")


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, causal: bool, q_offset: int) -> None:
    """Shapes, dtypes, devices, GQA heads and the offset; ValueError naming the argument."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, T, H, D], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
        if min(t.shape) < 1:
            raise ValueError(f"{name} must have every dimension >= 1, got shape {tuple(t.shape)}")
    b, tq, hq, d = q.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(
            f"k must be [B, Tk, Hkv, D] with B = {b} and D = {d} as in q, got {tuple(k.shape)}"
        )
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"v must be [B, Tk, Hkv, Dv] with B, Tk, Hkv = {tuple(k.shape[:3])} as in k, "
            f"got {tuple(v.shape)}"
        )
    if hq % k.shape[2]:
        raise ValueError(
            f"the number of k/v heads must divide the {hq} query heads, got {k.shape[2]}"
        )
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {causal!r}")
    if isinstance(q_offset, bool) or not isinstance(q_offset, int) or q_offset < 0:
        raise ValueError(f"q_offset must be an int >= 0, got {q_offset!r}")
    if causal and q_offset + tq > k.shape[1]:
        raise ValueError(
            f"with causal=True the queries (positions q_offset .. q_offset + Tq - 1) must lie "
            f"within the {k.shape[1]} keys: q_offset + Tq <= Tk, got q_offset={q_offset}, "
            f"Tq={tq}"
        )


def _attention_forward(
    backend: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    q_offset: int,
    scale: float,
    q_doc: Tensor | None,
    k_doc: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """(o in q's dtype, fp32 row log-sum-exp) of the implementation on `backend`.

    The custom op hyla::attention_forward (not an autograd.Function), so that PyTorch sees
    one op: selective checkpointing keeps its outputs by name (KEEP_UNDER_CHECKPOINT) and
    torch.compile traces around it through its fake implementation."""
    impl = implementation("attention", backend)
    mask = {"causal": causal, "q_offset": q_offset, "q_doc": q_doc, "k_doc": k_doc}
    o, lse = impl.forward(q, k, v, scale=scale, **mask)
    # Contiguous results, whatever a backend's layout, as the fake implementation says.
    return o.to(q.dtype).contiguous(), lse.contiguous()


def _attention_forward_fake(backend, q, k, v, causal, q_offset, scale, q_doc, k_doc):
    b, tq, hq, _ = q.shape
    o = q.new_empty((b, tq, hq, v.shape[-1]))
    return o, q.new_empty((b, hq, tq), dtype=torch.float32)


def _attention_backward(
    backend: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    do: Tensor,
    causal: bool,
    q_offset: int,
    scale: float,
    q_doc: Tensor | None,
    k_doc: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) in the dtypes of q, k, v; scores are recomputed from lse tile by tile."""
    impl = implementation("attention", backend)
    mask = {"causal": causal, "q_offset": q_offset, "q_doc": q_doc, "k_doc": k_doc}
    dq, dk, dv = impl.backward(q, k, v, o, lse, do, scale=scale, **mask)
    # Contiguous, whatever the inputs' or a backend's layout, as the fake implementation says.
    return (
        dq.to(q.dtype).contiguous(),
        dk.to(k.dtype).contiguous(),
        dv.to(v.dtype).contiguous(),
    )


def _attention_backward_fake(backend, q, k, v, *rest):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


attention_forward = define_op("attention_forward", _attention_forward, fake=_attention_forward_fake)
attention_backward = define_op(
    "attention_backward", _attention_backward, fake=_attention_backward_fake
)


def _save_for_attention_backward(ctx, inputs, output) -> None:
    backend, q, k, v, causal, q_offset, scale, q_doc, k_doc = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.args = (backend, causal, q_offset, scale)
    ctx.save_for_backward(q, k, v, o, lse, q_doc, k_doc)


def _attention_grads(ctx, do: Tensor, _dlse: Tensor | None):
    q, k, v, o, lse, q_doc, k_doc = ctx.saved_tensors
    backend, causal, q_offset, scale = ctx.args
    dq, dk, dv = attention_backward(
        backend, q, k, v, o, lse, do, causal, q_offset, scale, q_doc, k_doc
    )
    return None, dq, dk, dv, None, None, None, None, None


attention_forward.register_autograd(_attention_grads, setup_context=_save_for_attention_backward)


def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    q_offset: int = 0,
    scale: float | None = None,
    backend: str | None = None,
    q_doc: Tensor | None = None,
    k_doc: Tensor | None = None,
) -> Tensor:
    """Softmax attention: q [B, Tq, Hq, D], k [B, Tk, Hkv, D], v [B, Tk, Hkv, Dv] -> o.

    o is [B, Tq, Hq, Dv] in q's dtype; v may have its own head dim Dv. GQA: Hkv divides Hq
    and query head h uses k/v head h // (Hq // Hkv). Causal: query i sits at position
    q_offset + i and sees keys j <= q_offset + i (q_offset = Tk - Tq aligns the mask to the
    lower right, as a sequence-parallel rank needs), so q_offset + Tq <= Tk is required;
    non-causal: every query sees every key and q_offset is ignored. scale defaults to
    D^-0.5. The kernels accumulate in fp32.
    q_doc [B, Tq], k_doc [B, Tk]: integer document ids (packed documents), given together;
    query i then also needs k_doc[j] == q_doc[i] to see key j. A query that sees no key at
    all (impossible when causal and q, k are one sequence's) gets o = 0 and no gradient.
    backend: "auto" (default, or HYLA_KERNEL_BACKEND), "torch" or "triton".
    """
    _check_inputs(q, k, v, causal, q_offset)
    _check_docs(q, k, q_doc, k_doc)
    check_scale(scale)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_finite(name, t)
    scale = float(scale) if scale is not None else q.shape[-1] ** -0.5
    chosen = resolve_backend(backend, q.device)
    if q_doc is not None and k_doc is not None:  # _check_docs: given together
        q_doc, k_doc = q_doc.to(torch.int32).contiguous(), k_doc.to(torch.int32).contiguous()
    o, _ = attention_forward(chosen, q, k, v, causal, q_offset, scale, q_doc, k_doc)
    return o


# Ops whose outputs activation checkpointing should keep rather than recompute: attention's
# output and log-sum-exp are O(T) to store, while recomputing them costs O(T^2) work.
KEEP_UNDER_CHECKPOINT = (torch.ops.hyla.attention_forward.default,)


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    q_offset: int = 0,
    scale: float | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """The plain materialised softmax (O(Tq Tk) memory: small inputs only), for tests.

    Same arguments and semantics as `flash_attention`, with an explicit boolean `mask`
    [B, Tq, Tk] (True: visible, on top of the causal mask) in place of document ids; a
    query that sees no key gets o = 0. Computes in fp64 for fp64 inputs and fp32
    otherwise, returns q's dtype, and is differentiable by autograd.
    """
    _check_inputs(q, k, v, causal, q_offset)
    if mask is not None and (
        mask.dtype != torch.bool or tuple(mask.shape) != (q.shape[0], q.shape[1], k.shape[1])
    ):
        raise ValueError(
            f"mask must be a bool tensor [B, Tq, Tk] = {(q.shape[0], q.shape[1], k.shape[1])}, "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    check_scale(scale)
    scale = float(scale) if scale is not None else q.shape[-1] ** -0.5
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[2] // k.shape[2]
    kh = k.to(acc).repeat_interleave(group, dim=2)
    vh = v.to(acc).repeat_interleave(group, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q.to(acc), kh) * scale
    visible = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device)[None, None]
    if causal:
        rows = torch.arange(q.shape[1], device=q.device)[:, None] + q_offset
        cols = torch.arange(k.shape[1], device=q.device)[None, :]
        visible = visible & (cols <= rows)
    if mask is not None:
        visible = visible & mask[:, None]
    # Rows that see no key get finite scores (so softmax has no NaN) and are zeroed after.
    seen = visible.any(-1, keepdim=True)
    scores = scores.masked_fill(~visible & seen, float("-inf"))
    probs = torch.softmax(scores, dim=-1) * seen
    o = torch.einsum("bhij,bjhd->bihd", probs, vh)
    return o.to(q.dtype)
