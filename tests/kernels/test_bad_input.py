"""Bad input gets a ValueError naming the argument and what was received and expected."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from hyla.kernels import (
    chunk_gated_delta_rule,
    chunk_gla,
    chunk_linear_attn,
    recurrent_gated_delta_rule,
    recurrent_gla,
    recurrent_linear_attn,
)
from hyla.kernels.attention import flash_attention

B, T, H, K, V = 1, 10, 2, 8, 4


def _inputs():
    q, k = torch.randn(B, T, H, K), torch.randn(B, T, H, K)
    return q, k, torch.randn(B, T, H, V)


def _linear(fn):
    return lambda q, k, v, **kw: fn(q, k, v, None, **kw)


def _gla(fn):
    return lambda q, k, v, **kw: fn(q, k, v, -torch.rand(q.shape), **kw)


def _delta(fn):
    return lambda q, k, v, **kw: fn(q, k, v, torch.rand(q.shape[:3]), None, **kw)


OPS = {
    "chunk_linear_attn": _linear(chunk_linear_attn),
    "recurrent_linear_attn": _linear(recurrent_linear_attn),
    "chunk_gla": _gla(chunk_gla),
    "recurrent_gla": _gla(recurrent_gla),
    "chunk_gated_delta_rule": _delta(chunk_gated_delta_rule),
    "recurrent_gated_delta_rule": _delta(recurrent_gated_delta_rule),
}


def _raises(match: str, fn, *args, **kwargs):
    with pytest.raises(ValueError, match=match):
        fn(*args, **kwargs)


@pytest.mark.parametrize("op", OPS.values(), ids=OPS.keys())
def test_shapes_dtypes_devices(op):
    q, k, v = _inputs()
    _raises(r"k must have q's shape \(1, 10, 2, 8\).*got \(1, 10, 2, 7\)", op, q, k[..., :7], v)
    _raises(r"v must be \[B, T, H, V\].*got \(1, 9, 2, 4\)", op, q, k, v[:, :9])
    _raises(r"q must be 4-D.*got shape \(10, 2, 8\)", op, q[0], k[0], v[0])
    _raises(r"k must have q's dtype torch.float32, got torch.float64", op, q, k.double(), v)
    _raises(r"q must be a floating-point tensor, got dtype torch.int64", op, q.long(), k, v)
    _raises(r"scale must be a finite positive number or None, got -1.0", op, q, k, v, scale=-1.0)
    _raises(r"scale must be a finite positive number or None, got inf", op, q, k, v, scale=1e400)
    if torch.cuda.is_available():
        _raises(r"v must be on q's device", op, q, k, v.cuda())


@pytest.mark.parametrize("op", OPS.values(), ids=OPS.keys())
def test_non_finite_inputs_are_refused_unless_switched_off(op, monkeypatch):
    q, k, v = _inputs()
    nan_q = q.clone()
    nan_q[0, 3, 1, 2] = float("nan")
    _raises(r"q must be finite, got 1 NaN or infinite entries", op, nan_q, k, v)
    state = torch.zeros(B, H, K, V)
    state[0, 0, 0, 0] = float("inf")
    _raises(r"initial_state must be finite, got 1 NaN", op, q, k, v, initial_state=state)
    monkeypatch.setenv("HYLA_CHECK_FINITE", "0")  # for speed: NaN in, NaN out
    o, _ = op(nan_q, k, v)
    assert torch.isnan(o).any()


def test_finite_values_whose_sum_overflows_are_accepted():
    """The finiteness check's one-pass sum overflows here; the exact test then clears it,
    and still finds a single infinity among such values."""
    q, k, v = _inputs()
    state = torch.full((B, H, K, V), 3e38)
    _, final = chunk_linear_attn(q, k, v, initial_state=state, output_final_state=True)
    assert final is not None and torch.isinf(state.sum())
    state[0, 1, 2, 3] = float("inf")
    _raises(
        r"initial_state must be finite, got 1 NaN or infinite",
        chunk_linear_attn,
        q,
        k,
        v,
        initial_state=state,
    )


@pytest.mark.parametrize("op", [chunk_gated_delta_rule, recurrent_gated_delta_rule])
def test_non_finite_beta_is_refused(op):
    q, k, v = _inputs()
    beta = torch.rand(q.shape[:3])
    beta[0, 0, 0] = float("nan")
    _raises(r"beta must be finite, got 1 NaN", op, q, k, v, beta)


def test_attention_refuses_non_finite_inputs_and_scale():
    q, k, v = _inputs()
    k = k.clone()
    k[0, 1, 0, 0] = float("-inf")
    _raises(r"k must be finite", flash_attention, q, k, v)
    _raises(r"scale must be a finite positive number", flash_attention, q, q, v, scale=float("nan"))


@pytest.mark.parametrize("op", OPS.values(), ids=OPS.keys())
def test_initial_state_shape(op):
    q, k, v = _inputs()
    bad = torch.zeros(B, H, V, K)
    _raises(
        r"initial_state must have shape \[B, H, K, V\] = \(1, 2, 8, 4\), got \(1, 2, 4, 8\)",
        op,
        q,
        k,
        v,
        initial_state=bad,
    )
    cu = torch.tensor([0, 4, 10])
    _raises(
        r"initial_state must have shape \[N .*\] = \(2, 2, 8, 4\), got \(1, 2, 8, 4\)",
        op,
        q,
        k,
        v,
        initial_state=torch.zeros(1, H, K, V),
        cu_seqlens=cu,
    )


@pytest.mark.parametrize("op", OPS.values(), ids=OPS.keys())
def test_cu_seqlens(op):
    q, k, v = _inputs()
    _raises(r"cu_seqlens must start at 0, got 1", op, q, k, v, cu_seqlens=torch.tensor([1, 10]))
    _raises(r"cu_seqlens must end at T = 10.*got 9", op, q, k, v, cu_seqlens=torch.tensor([0, 9]))
    _raises(r"non-decreasing, got 6 then 3", op, q, k, v, cu_seqlens=torch.tensor([0, 6, 3, 10]))
    _raises(
        r"dtype int32 or int64, got torch.float32",
        op,
        q,
        k,
        v,
        cu_seqlens=torch.tensor([0.0, 10.0]),
    )
    _raises(r"1-D integer tensor", op, q, k, v, cu_seqlens=torch.tensor([[0, 10]]))
    q2, k2, v2 = (torch.cat([x, x]) for x in (q, k, v))
    _raises(
        r"batch size \(dim 0 of q\) must be 1, got 2",
        op,
        q2,
        k2,
        v2,
        cu_seqlens=torch.tensor([0, 10]),
    )


@pytest.mark.parametrize("fn", [chunk_linear_attn, recurrent_linear_attn])
def test_linear_attn_gate(fn):
    q, k, v = _inputs()
    _raises(
        r"g holds log-gates and must be <= 0 everywhere, got max 0.5",
        fn,
        q,
        k,
        v,
        torch.full((B, T, H), 0.5),
    )
    _raises(r"g holds log-gates .* got max 0.1", fn, q, k, v, torch.tensor([-0.1, 0.1]))
    _raises(
        r"g must be None, a \[H\] = \(2,\) .* got torch.Size\(\[1, 10\]\)",
        fn,
        q,
        k,
        v,
        torch.zeros(B, T),
    )
    _raises(r"g must have shape \(2,\), got \(3,\)", fn, q, k, v, -torch.ones(3))
    _raises(r"g must be finite", fn, q, k, v, torch.full((B, T, H), float("nan")))


@pytest.mark.parametrize("fn", [chunk_gla, recurrent_gla])
def test_gla_gate(fn):
    q, k, v = _inputs()
    _raises(r"gk holds log-gates .* got max 1", fn, q, k, v, torch.ones(q.shape))
    _raises(
        r"gk must have shape \(1, 10, 2, 8\), got \(1, 10, 2\)", fn, q, k, v, -torch.ones(B, T, H)
    )


@pytest.mark.parametrize("fn", [chunk_gated_delta_rule, recurrent_gated_delta_rule])
def test_delta_rule_beta_and_gate(fn):
    q, k, v = _inputs()
    beta = torch.rand(B, T, H)
    _raises(r"beta must have shape \(1, 10, 2\), got \(1, 10\)", fn, q, k, v, beta[..., 0])
    _raises(r"g holds log-gates .* got max 2", fn, q, k, v, beta, torch.full((B, T, H), 2.0))
    _raises(
        r"g must have shape \(1, 10, 2\), got \(1, 10, 2, 8\)",
        fn,
        q,
        k,
        v,
        beta,
        -torch.ones(q.shape),
    )


def test_backend_choice():
    q, k, v = _inputs()
    _raises(
        r"backend must be one of \('auto', 'torch', 'triton'\), got 'cuda'",
        chunk_linear_attn,
        q,
        k,
        v,
        backend="cuda",
    )


def test_backend_env_var(monkeypatch):
    q, k, v = _inputs()
    monkeypatch.setenv("HYLA_KERNEL_BACKEND", "fast")
    _raises(r"HYLA_KERNEL_BACKEND must be one of .* got 'fast'", chunk_linear_attn, q, k, v)


def test_triton_on_cpu_needs_interpreter():
    """In a fresh process: switching the interpreter off in this one would leave Triton's
    library compiled for a GPU for every later test."""
    code = (
        "import torch; from hyla.kernels import chunk_linear_attn\n"
        "x = torch.randn(1, 4, 1, 4)\n"
        "try:\n    chunk_linear_attn(x, x, x, backend='triton')\n"
        "except ValueError as e:\n    print(e)\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert "needs TRITON_INTERPRET=1" in out.stdout, out.stdout + out.stderr
