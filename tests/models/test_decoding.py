"""DecodingState: left padding leaves every layer's state as the row alone leaves it, and
selecting rows (beam search) keeps each row's state, MoM's group-major rows included."""

from __future__ import annotations

import pytest
import torch

from hyla.models import HybridLM, ModelConfig
from hyla.models.decoding import DecodingState

CFG = ModelConfig(layers="LGDMA", d_model=32, n_heads=2, vocab_size=64, init_std=0.2)
TOL = 1e-5  # the same fp32 math summed in other orders (padded rows take per-token gates)


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(1, 64, (1, n), generator=torch.Generator().manual_seed(seed))


def _row(value: torch.Tensor, row: int, rows: int) -> torch.Tensor:
    """One row's part of a group-major state tensor (group g of row b at g * B + b)."""
    return value.unflatten(0, (-1, rows))[:, row]


@torch.no_grad()
def test_left_padding_leaves_each_layers_state_as_the_row_alone():
    model = HybridLM(CFG).eval()
    short, long = _ids(5, 0), _ids(11, 1)
    pads = long.shape[1] - short.shape[1]
    batch = DecodingState(model)
    mask = torch.ones(2, long.shape[1], dtype=torch.long)
    mask[0, :pads] = 0
    batch.step(model, torch.cat([torch.cat([torch.zeros(1, pads).long(), short], 1), long]), mask)
    alone = DecodingState(model)
    alone.step(model, short)
    for letter, padded, single in zip(CFG.layers, batch.layers, alone.layers, strict=True):
        for key, value in single.items():
            got = _row(padded[key], 0, 2)
            if key in ("k", "v"):  # the cache keeps the padded keys; attention masks them
                got = got[:, pads:]
            torch.testing.assert_close(got, _row(value, 0, 1), atol=TOL, rtol=0, msg=letter + key)


@torch.no_grad()
def test_selected_rows_keep_their_state():
    model = HybridLM(CFG).eval()
    ids = torch.cat([_ids(6, 2), _ids(6, 3)])
    state, swapped = DecodingState(model), DecodingState(model)
    state.step(model, ids)
    swapped.step(model, ids.flip(0))
    state.select(torch.tensor([1, 0, 0]))
    nxt = torch.tensor([[7], [8], [8]])
    got = state.step(model, nxt)
    expected = swapped.step(model, nxt[:2])
    torch.testing.assert_close(got[:2], expected, atol=TOL, rtol=0)
    torch.testing.assert_close(got[2], got[1], atol=0, rtol=0)


def test_states_must_hold_one_per_layer():
    model = HybridLM(CFG)
    message = r"^states must hold one LayerState per layer \(5\), got 4:"
    with pytest.raises(ValueError, match=message):
        model.hidden_states(_ids(3, 0), model.new_states()[:4])
