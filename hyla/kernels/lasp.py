"""What a run of tokens does to the recurrent state: the summary LASP-2 exchanges
(docs/design.md §4), owned by the kernels so that sequence parallelism needs no knowledge
of any family.

Every family acts on the state affinely over a run of tokens, S(end) = AA S(start) + BB,
and its outputs are o = o_intra + qhat S(start): AA is the product of the run's transitions
(fp32, per row and head a scalar [N, H], a diagonal [N, H, K] or a matrix [N, H, K, K]), BB
the run's final state from zero [N, H, K, V], o_intra its output from zero and qhat
[N, L, H, K] the map from its initial state to its output. Each family computes its own
(`ChunkCall.summary`); the functions here apply one, in fp32 with autocast off whatever the
caller runs under.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from hyla.kernels.autograd import ChunkKernel, Inputs
from hyla.kernels.custom_ops import without_autocast


@dataclass(frozen=True)
class StateSummary:
    """AA, BB and qhat of a run (module docstring), and its zero-state output on demand:
    where AA and BB come in closed form the kernel runs only when `intra_output` is called,
    so a caller may start sending them first."""

    aa: Tensor
    bb: Tensor
    qhat: Tensor
    _intra_output: Callable[[], Tensor]

    def intra_output(self) -> Tensor:
        """o_intra [N, L, H, V], in q's dtype: the run's output from a zero state."""
        return self._intra_output()


@without_autocast
def apply_transition(aa: Tensor, s: Tensor) -> Tensor:
    """AA S for AA of shape [N, H] (scalar), [N, H, K] (diagonal) or [N, H, K, K]."""
    if aa.dim() == 2:
        return aa[..., None, None] * s
    if aa.dim() == 3:
        return aa[..., None] * s
    return aa @ s


@without_autocast
def apply_transition_transposed(aa: Tensor, g: Tensor) -> Tensor:
    """AA^T G: the backward counterpart of `apply_transition`."""
    return aa.transpose(-1, -2) @ g if aa.dim() == 4 else apply_transition(aa, g)


@without_autocast
def output_from(o_intra: Tensor, qhat: Tensor, state: Tensor) -> Tensor:
    """o = o_intra + qhat S(start), fp32 [N, L, H, V], for initial states [N, H, K, V]."""
    return o_intra.float() + torch.einsum("bthk,bhkv->bthv", qhat.float(), state.float())


@without_autocast
def initial_state_grad(qhat: Tensor, do: Tensor) -> Tensor:
    """dL/dS(start) = qhat^T dO through the run's own outputs, fp32 [N, H, K, V]."""
    return torch.einsum("bthk,bthv->bhkv", qhat.float(), do.float())


def decay_summary(kernel: ChunkKernel, inputs: Inputs) -> StateSummary:
    """Linear attention and GLA, (q, k, v, log_decay) with log_decay None, [N, L, H] (a
    scalar gate) or [N, L, H, K] (per key): AA = e^(sum of log-decays), BB and qhat in
    closed form; the kernel's zero-state run is left for `intra_output`."""
    q, k, v, log_decay = inputs
    assert q is not None and k is not None and v is not None  # only gates may be None
    qf, kf = q.float(), k.float()
    if log_decay is None:
        aa = q.new_ones((q.shape[0], q.shape[2]), dtype=torch.float32)
        k_to_end, qhat = kf, kernel.scale * qf
    else:
        cum = log_decay.float().cumsum(1)
        total = cum[:, -1]
        aa = torch.exp(total)
        per_key = (lambda x: x[..., None]) if log_decay.dim() == 3 else (lambda x: x)
        k_to_end = kf * per_key(torch.exp(total[:, None] - cum))
        qhat = kernel.scale * qf * per_key(torch.exp(cum))
    bb = torch.einsum("bthk,bthv->bhkv", k_to_end, v.float())
    return StateSummary(aa, bb, qhat, lambda: kernel.forward(inputs, None)[0])


def delta_summary(kernel: ChunkKernel, inputs: Inputs) -> StateSummary:
    """The gated delta rule, (q, k, v, beta, g): the state's columns evolve independently,
    so one kernel run with values [0 | v] from the initial state [I | 0] yields [AA | BB] as
    its final state and [qhat | o_intra] as its output."""
    q, k, v, beta, g = inputs
    assert q is not None and k is not None and v is not None  # only gates may be None
    n, t, h, kd = k.shape
    eye = torch.eye(kd, device=k.device, dtype=torch.float32).expand(n, h, kd, kd)
    start = torch.cat([eye, eye.new_zeros(n, h, kd, v.shape[-1])], dim=-1)
    values = torch.cat([v.new_zeros(n, t, h, kd), v], dim=-1)
    out, final = kernel.forward((q, k, values, beta, g), start)
    o_intra = out[..., kd:]
    return StateSummary(final[..., :kd], final[..., kd:], out[..., :kd], lambda: o_intra)
