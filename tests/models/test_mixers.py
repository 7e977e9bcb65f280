"""Each mixer on its own: chunked == token by token, causality, decoding states."""

from __future__ import annotations

import pytest
import torch

from hyla.models import ModelConfig
from hyla.models.decoding import DecodingContext
from hyla.models.mixers import MIXERS
from hyla.models.sequence import WholeSequence
from tests.kernels.cases import assert_close

LETTERS = ["L", "G", "D", "M", "A"]
VARIANTS = [("L", {"linear_decay": "none"}), ("L", {"linear_decay": "scalar_gate"})] + [
    (x, {}) for x in LETTERS
]
IDS = [f"{x}-{o.get('linear_decay', 'default')}" for x, o in VARIANTS]


def _mixer(letter: str, **overrides) -> torch.nn.Module:
    cfg = ModelConfig(layers=letter, d_model=32, n_heads=2, attn_kv_heads=1, **overrides)
    torch.manual_seed(0)
    mixer = MIXERS[letter](cfg)
    with torch.no_grad():  # larger random weights than init so that every path matters
        for p in mixer.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    return mixer


def _whole(mixer: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole-sequence pass of the mixer over x [B, T, d]."""
    return mixer(x, WholeSequence().context(x.new_zeros(x.shape[:2], dtype=torch.long), None))


def _step(
    mixer: torch.nn.Module, x: torch.Tensor, state: dict
) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoding step of the mixer over x [B, T, d], continuing its layer's state."""
    return mixer(x, DecodingContext(x.new_zeros(x.shape[:2], dtype=torch.long), state))


def _grads(mixer: torch.nn.Module, y: torch.Tensor, weight: torch.Tensor) -> dict:
    mixer.zero_grad()
    (y * weight).sum().backward()
    return {n: p.grad.clone() for n, p in mixer.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("letter,overrides", VARIANTS, ids=IDS)
def test_chunked_equals_token_by_token(letter: str, overrides: dict):
    """The whole sequence at once == one token at a time through the decoding state, for the
    outputs and every parameter gradient (gradients flow through the carried states)."""
    mixer = _mixer(letter, **overrides)
    x = torch.randn(2, 70, 32)
    weight = torch.randn(2, 70, 32)
    full, _ = _whole(mixer, x)
    full_grads = _grads(mixer, full, weight)
    state: dict = {}
    steps = torch.cat([_step(mixer, x[:, t : t + 1], state)[0] for t in range(x.shape[1])], dim=1)
    step_grads = _grads(mixer, steps, weight)
    assert_close(f"{letter} output", steps, full, tol=1e-4)
    assert full_grads.keys() == step_grads.keys()
    for name, g in full_grads.items():
        assert_close(f"{letter} d{name}", step_grads[name], g, tol=1e-4)


@pytest.mark.parametrize("letter,overrides", VARIANTS, ids=IDS)
def test_prefill_then_continue(letter: str, overrides: dict):
    """A prefix, then the rest through the state, equals the whole sequence."""
    mixer = _mixer(letter, **overrides)
    x = torch.randn(1, 90, 32)
    with torch.no_grad():
        full, _ = _whole(mixer, x)
        state: dict = {}
        head, _ = _step(mixer, x[:, :67], state)
        tail, _ = _step(mixer, x[:, 67:], state)
    assert_close(f"{letter} prefill", torch.cat([head, tail], 1), full, tol=1e-4)


@pytest.mark.parametrize("letter,overrides", VARIANTS, ids=IDS)
def test_causal(letter: str, overrides: dict):
    mixer = _mixer(letter, **overrides)
    x = torch.randn(1, 80, 32)
    perturbed = x.clone()
    perturbed[:, 50] += 1.0
    with torch.no_grad():
        a, _ = _whole(mixer, x)
        b, _ = _whole(mixer, perturbed)
    # Bitwise equality is not promised (packed lengths change with MoM routing); a leak from
    # a unit change at token 50 would be far above 1e-6 of the output scale.
    assert_close(f"{letter} outputs before the change", b[:, :50], a[:, :50], tol=1e-6)
    assert not torch.allclose(a[:, 50:], b[:, 50:]), "a change at token 50 changed nothing"
