"""Whole-sequence transitions M with S_end = M S_start + S_end(from zero), as LASP-2 uses them.

Each is checked against the affine identity on the fp64 recurrence, which is independent of
how the transition is computed, and the delta rule's also against an explicit product of the
A_t, gradients included.
"""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from hyla.kernels import (
    gated_delta_rule_transition,
    gla_transition,
    linear_attn_transition,
    recurrent_gated_delta_rule,
    recurrent_gla,
    recurrent_linear_attn,
)
from tests.devices import BACKENDS
from tests.kernels.cases import assert_close, log_gate

B, T, H, K, V = 2, 70, 2, 12, 5
CU = torch.tensor([0, 20, 20, 70])  # the middle sequence is empty: its transition is I


def _affine_pair(recurrent, args, apply, initial_state, **kwargs):
    """(S_end from S0, M S0 + S_end from zero) under the recurrence `recurrent`."""
    _, from_s0 = recurrent(*args, initial_state=initial_state, output_final_state=True, **kwargs)
    _, from_zero = recurrent(*args, output_final_state=True, **kwargs)
    return from_s0, apply(initial_state) + from_zero


def _qkv(gen, b=B, t=T):
    q = torch.randn(b, t, H, K, generator=gen, dtype=torch.float64)
    k = torch.nn.functional.normalize(
        torch.randn(b, t, H, K, generator=gen, dtype=torch.float64), dim=-1
    )
    return q, k, torch.randn(b, t, H, V, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("gate", ["none", "const", "token"])
@pytest.mark.parametrize("packed", [False, True])
def test_linear_attn(gate: str, packed: bool):
    gen = torch.Generator().manual_seed(0)
    b = 1 if packed else B
    q, k, v = _qkv(gen, b)
    g = {
        "none": None,
        "const": torch.tensor([-0.1, -0.01], dtype=torch.float64),
        "token": log_gate((b, T, H), "strong", gen).double(),
    }[gate]
    kwargs = {"cu_seqlens": CU} if packed else {}
    a = linear_attn_transition(k, g, **kwargs)
    n = CU.numel() - 1 if packed else B
    assert a.shape == (n, H) and a.dtype == torch.float32
    s0 = torch.randn(n, H, K, V, dtype=torch.float64)
    got, want = _affine_pair(
        recurrent_linear_attn, (q, k, v, g), lambda s: a.double()[..., None, None] * s, s0, **kwargs
    )
    assert_close("linear transition", got, want, tol=1e-6)


@pytest.mark.parametrize("packed", [False, True])
def test_gla(packed: bool):
    gen = torch.Generator().manual_seed(1)
    b = 1 if packed else B
    q, k, v = _qkv(gen, b)
    gk = log_gate((b, T, H, K), "weak", gen).double()
    kwargs = {"cu_seqlens": CU} if packed else {}
    a = gla_transition(gk, **kwargs)
    n = CU.numel() - 1 if packed else B
    assert a.shape == (n, H, K) and a.dtype == torch.float32
    s0 = torch.randn(n, H, K, V, dtype=torch.float64)
    got, want = _affine_pair(
        recurrent_gla, (q, k, v, gk), lambda s: a.double()[..., None] * s, s0, **kwargs
    )
    assert_close("gla transition", got, want, tol=1e-6)


def _explicit_product(k, beta, g):
    """A_T ... A_1 with A_t = exp(g_t) (I - beta_t k_t k_t^T), per batch row and head."""
    b, t, h, kd = k.shape
    m = torch.eye(kd, dtype=k.dtype).expand(b, h, kd, kd)
    for i in range(t):
        kk = torch.einsum("bhi,bhj->bhij", k[:, i], k[:, i])
        a_t = torch.eye(kd, dtype=k.dtype) - beta[:, i, :, None, None] * kk
        if g is not None:
            a_t = a_t * torch.exp(g[:, i])[..., None, None]
        m = a_t @ m
    return m


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gated", [False, True])
def test_gated_delta_rule(gated: bool, backend: str):
    gen = torch.Generator().manual_seed(2)
    q, k, v = _qkv(gen)
    beta = torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    g = log_gate((B, T, H), "weak", gen).double() if gated else None

    leaves = [x.float().requires_grad_() for x in (k, beta)]
    g32 = None if g is None else g.float().requires_grad_()
    m = gated_delta_rule_transition(*leaves, g32, backend=backend)
    ref_leaves = [x.clone().requires_grad_() for x in (k, beta)]
    g64 = None if g is None else g.clone().requires_grad_()
    ref = _explicit_product(*ref_leaves, g64)
    assert m.shape == (B, H, K, K) and m.dtype == torch.float32
    assert_close("delta transition", m, ref)

    weight = torch.randn(B, H, K, K, generator=gen, dtype=torch.float64)
    (m * weight.float()).sum().backward()
    (ref * weight).sum().backward()
    for name, got, want in zip(("dk", "dbeta"), leaves, ref_leaves, strict=True):
        assert_close(f"delta transition {name}", got.grad, want.grad)
    if gated:
        assert_close("delta transition dg", g32.grad, g64.grad)

    s0 = torch.randn(B, H, K, V, dtype=torch.float64)
    got, want = _affine_pair(recurrent_gated_delta_rule, (q, k, v, beta, g), lambda s: ref @ s, s0)
    assert_close("delta affine identity", got, want.detach(), tol=1e-6)


def test_gated_delta_rule_packed():
    gen = torch.Generator().manual_seed(3)
    _, k, _ = _qkv(gen, 1)
    beta = torch.rand(1, T, H, generator=gen, dtype=torch.float64)
    g = log_gate((1, T, H), "strong", gen).double()
    m = gated_delta_rule_transition(k.float(), beta.float(), g.float(), cu_seqlens=CU)
    bounds = CU.tolist()
    for i, (s, e) in enumerate(pairwise(bounds)):
        ref = _explicit_product(k[:, s:e], beta[:, s:e], g[:, s:e])
        assert_close(f"packed delta transition {i}", m[i : i + 1], ref)
