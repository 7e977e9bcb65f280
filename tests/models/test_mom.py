"""Mixture-of-Memories routing."""

from __future__ import annotations

import torch

from hyla.models import ModelConfig
from hyla.models.decoding import DecodingContext
from hyla.models.mixers.mom import MixtureOfMemories, Routing
from tests.kernels.cases import assert_close


def test_every_token_reaches_top_k_plus_shared_with_weights_summing_to_one():
    logits = torch.randn(3, 50, 4, generator=torch.Generator().manual_seed(0))
    routing = Routing(logits, top_k=2, shared=True)
    tokens = routing.tokens
    visits = torch.zeros(3, 50, dtype=torch.long)
    visits.index_put_((tokens.row, tokens.time), torch.ones_like(tokens.row), accumulate=True)
    assert (visits == 3).all()  # two routed memories + the shared one
    shared = tokens.group == 4
    assert shared.sum() == 150
    assert_close("routed weights", routing.weights[..., :4].sum(-1), torch.ones(3, 50), tol=1e-6)
    assert (routing.weights[..., 4] == 1).all()
    # Each token goes to its two most probable memories.
    top2 = logits.topk(2, -1).indices.sort(-1).values
    chosen = routing.selected.nonzero()[:, 2].view(3, 50, 2)
    assert torch.equal(chosen, top2)
    # Packed in (memory, batch row) order, time order inside each sequence.
    cu_seqlens = tokens.cu_seqlens()
    counts = cu_seqlens.diff().view(5, 3)
    assert torch.equal(counts[:4], routing.selected.sum(1).T) and (counts[4] == 50).all()
    for s, e in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True):
        assert (tokens.time[s:e].diff() > 0).all()
        assert (
            tokens.group[s:e] * 3 + tokens.row[s:e] == tokens.group[s] * 3 + tokens.row[s]
        ).all()


def test_aux_loss_on_hand_built_routing():
    """Two tokens, two memories, top-1: both pick memory 0 (probabilities .8/.2 and .6/.4),
    so the shares are (1, 0), the mean probabilities (.7, .3) and the loss 2 * .7 = 1.4."""
    probs = torch.tensor([[[0.8, 0.2], [0.6, 0.4]]])
    routing = Routing(probs.log(), top_k=1, shared=False)
    assert_close("aux", routing.aux_loss(), torch.tensor(1.4), tol=1e-6)
    balanced = Routing(torch.tensor([[[0.9, 0.1], [0.1, 0.9]]]).log(), top_k=1, shared=False)
    assert_close("balanced aux", balanced.aux_loss(), torch.tensor(1.0), tol=1e-6)


def test_memory_with_no_tokens_keeps_its_state():
    """A memory no token is routed to passes its recurrent state through unchanged."""
    cfg = ModelConfig(layers="M", d_model=16, n_heads=2, mom_memories=3, mom_top_k=1)
    mom = MixtureOfMemories(cfg)
    with torch.no_grad():
        mom.router.weight.zero_()
        mom.router.weight[0] = 1.0  # everything goes to memory 0 for positive inputs
        x = torch.rand(1, 9, 16) + 0.1
        state = {"recurrent": torch.randn(4, 2, 8, 8)}
        before = state["recurrent"].clone()
        mom(x, DecodingContext(torch.zeros(1, 9, dtype=torch.long), state))
    assert torch.equal(state["recurrent"][1:3], before[1:3])  # memories 1, 2 of row 0
    assert not torch.allclose(state["recurrent"][0], before[0])
