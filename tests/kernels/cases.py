"""Every chunk op variant under test, how to build its inputs, and how to compare results.

The ground truth is the token-by-token recurrence run in fp64 on the same inputs; the chunk
ops run in fp32. Comparisons are relative to the largest reference entry: fp32 round-off
over dot products of <= 200 terms stays near 1e-6 of that, so a tolerance of 2e-4 leaves
ample margin while any real error in a chunk boundary, mask or gate shows up as O(1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from hyla.kernels import (
    chunk_gated_delta_rule,
    chunk_gla,
    chunk_linear_attn,
    recurrent_gated_delta_rule,
    recurrent_gla,
    recurrent_linear_attn,
)

TOLERANCE = 2e-4


def assert_close(name: str, actual: Tensor | None, expected: Tensor | None, tol: float = TOLERANCE):
    assert (actual is None) == (expected is None), f"{name}: one of the results is None"
    if expected is None:
        return
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = (actual.double() - expected.double()).abs().max().item()
    ref = max(expected.double().abs().max().item(), 1e-6)
    assert err <= tol * ref, f"{name}: max abs error {err:.3g} > {tol} * max |reference| {ref:.3g}"


def log_gate(shape: tuple[int, ...], strength: str, gen: torch.Generator) -> Tensor:
    """Log-gates from logsigmoid of scaled normals: 'weak' stays near 0 (slow decay),
    'strong' reaches about -15 per token, so a 64-token chunk decays by e^-500 or more."""
    x = torch.randn(shape, generator=gen)
    return F.logsigmoid(x + 4.0) if strength == "weak" else F.logsigmoid(4.0 * x)


@dataclass(frozen=True)
class Case:
    """One op variant: its chunk and reference functions and the per-token inputs it takes."""

    name: str
    chunk: Callable
    recurrent: Callable
    extras: Callable[[int, int, int, int, torch.Generator], tuple[Tensor | None, ...]]
    normalize_keys: bool = False

    def inputs(self, b: int, t: int, h: int, kd: int, vd: int, seed: int = 0):
        """(q, k, v, *extras) as leaf fp32 tensors."""
        gen = torch.Generator().manual_seed(seed)
        q = torch.randn(b, t, h, kd, generator=gen)
        k = torch.randn(b, t, h, kd, generator=gen)
        if self.normalize_keys:
            k = F.normalize(k, dim=-1)
        v = torch.randn(b, t, h, vd, generator=gen)
        return (q, k, v, *self.extras(b, t, h, kd, gen))


def _const_decay(b, t, h, kd, gen):
    return (torch.log1p(-(2.0 ** (-5.0 - torch.arange(h, dtype=torch.float32)))),)


def _token_gate(strength):
    return lambda b, t, h, kd, gen: (log_gate((b, t, h), strength, gen),)


def _channel_gate(strength):
    return lambda b, t, h, kd, gen: (log_gate((b, t, h, kd), strength, gen),)


def _beta_gate(strength):
    def make(b, t, h, kd, gen):
        beta = torch.sigmoid(torch.randn(b, t, h, generator=gen))
        return (beta, None if strength is None else log_gate((b, t, h), strength, gen))

    return make


CASES = [
    Case("linear", chunk_linear_attn, recurrent_linear_attn, lambda *a: (None,)),
    Case("linear-const", chunk_linear_attn, recurrent_linear_attn, _const_decay),
    Case("linear-weak", chunk_linear_attn, recurrent_linear_attn, _token_gate("weak")),
    Case("linear-strong", chunk_linear_attn, recurrent_linear_attn, _token_gate("strong")),
    Case("gla-weak", chunk_gla, recurrent_gla, _channel_gate("weak")),
    Case("gla-strong", chunk_gla, recurrent_gla, _channel_gate("strong")),
    Case("deltanet", chunk_gated_delta_rule, recurrent_gated_delta_rule, _beta_gate(None), True),
    Case("gdn-weak", chunk_gated_delta_rule, recurrent_gated_delta_rule, _beta_gate("weak"), True),
    Case(
        "gdn-strong", chunk_gated_delta_rule, recurrent_gated_delta_rule, _beta_gate("strong"), True
    ),
]
CASE_IDS = [c.name for c in CASES]


def run_with_grads(
    fn: Callable,
    inputs: tuple[Tensor | None, ...],
    initial_state: Tensor | None,
    dtype: torch.dtype,
    loss_on: str = "both",
    **kwargs,
) -> dict[str, Tensor | None]:
    """Run `fn` on copies of `inputs` cast to `dtype`; a random linear loss on the outputs
    (`loss_on`: "o", "state" or "both"); returns o, final state and every input gradient."""
    leaves = [None if x is None else x.detach().to(dtype).requires_grad_() for x in inputs]
    s0 = None if initial_state is None else initial_state.detach().to(dtype).requires_grad_()
    o, final = fn(*leaves, initial_state=s0, output_final_state=loss_on != "o", **kwargs)
    gen = torch.Generator().manual_seed(1234)
    loss = o.sum() * 0
    if loss_on in ("o", "both"):
        loss = loss + (o * torch.randn(o.shape, generator=gen).to(o)).sum()
    if loss_on in ("state", "both"):
        loss = loss + (final * torch.randn(final.shape, generator=gen).to(final)).sum()
    loss.backward()
    names = ["q", "k", "v", *[f"arg{i}" for i in range(3, len(leaves))]]
    out = {"o": o.detach(), "final_state": None if final is None else final.detach()}
    for name, leaf in zip(names, leaves, strict=True):
        out[f"d{name}"] = None if leaf is None else leaf.grad
    out["dinitial_state"] = None if s0 is None else s0.grad
    return out
