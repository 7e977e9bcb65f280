"""Activation checkpointing keeps attention's outputs: backward does not rerun its forward.

The attention kernel is a custom op (`hyla::attention_forward`), so the selective
checkpointing policy sees it by name on every device and backend. The test counts calls of
the backend's own forward (the implementation module the op dispatches to), through the
public model path a GPU run takes; with the op left out of the policy the same count shows
the recompute, so the counter can tell the two apart.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from hyla.models import HybridLM, ModelConfig
from hyla.parallel import TrainingPolicy, parallelize
from tests.devices import BACKENDS
from tests.kernels.cases import assert_close

LAYERS = "LAGA"  # two attention blocks between linear ones


def _count_attention_forwards(monkeypatch: pytest.MonkeyPatch, backend: str) -> list[int]:
    module = importlib.import_module(f"hyla.kernels.attention.{backend}_chunk")
    calls = [0]
    original = module.forward

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "forward", counting)
    return calls


def _train_step(model: torch.nn.Module) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (2, 70), generator=gen)
    out = model(ids, torch.roll(ids, -1, 1))
    out.loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return grads


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpointed_attention_is_not_recomputed(backend: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HYLA_KERNEL_BACKEND", backend)
    cfg = dict(d_model=32, n_heads=2, attn_kv_heads=1, vocab_size=50, layers=LAYERS)
    torch.manual_seed(0)
    plain = HybridLM(ModelConfig(**cfg)).train()
    checkpointed = HybridLM(ModelConfig(**cfg, activation_checkpointing=True)).train()
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed = parallelize(checkpointed, None, TrainingPolicy())
    calls = _count_attention_forwards(monkeypatch, backend)
    n_attention = LAYERS.count("A")

    want = _train_step(plain)
    assert calls[0] == n_attention
    got = _train_step(checkpointed)
    assert calls[0] == 2 * n_attention, "backward ran the attention forward again"
    for (name, _), got_grad, grad in zip(plain.named_parameters(), got, want, strict=True):
        assert_close(name, got_grad, grad)

    # Without the op in the policy, the recompute shows in the same count.
    policies = importlib.import_module("hyla.parallel.parallelize")  # the module, not the function
    monkeypatch.setattr(policies, "KEEP_UNDER_CHECKPOINT", ())
    _train_step(checkpointed)
    assert calls[0] == 2 * n_attention + 2 * n_attention
