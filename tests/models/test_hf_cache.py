"""The transformers wrapper's cache and padded batches: cached generate() equals a full
recompute and hyla.models.generate, the cache is returned and continues, and a left-padded
batch gives each row what it gives alone.

Tolerance: cached and recomputed logits come from different kernels on the same fp32 math
(the fused token loop against the chunked form, attention over a growing K/V against one
pass, padded rows' per-token gates against a constant decay), which sum the same terms in
other orders. On these tiny models (logits of order 1) that moves logits by about 1e-5, so
1e-4 is tight enough to catch any real difference (a wrong state or a visible pad token
moves them by order 0.1) and loose enough for summation order. Greedy tokens must be
equal."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hyla.models import HybridLM, ModelConfig, generate

transformers = pytest.importorskip("transformers")

from hyla.models.hf import HylaCache, HylaConfig, HylaForCausalLM  # noqa: E402

TOL = 1e-4
CFG = ModelConfig(layers="LGDMA", d_model=32, n_heads=2, vocab_size=64, init_std=0.2)


@pytest.fixture(scope="module")
def hf() -> HylaForCausalLM:
    model = HybridLM(CFG).eval()
    return HylaForCausalLM(HylaConfig(hyla_model=dataclasses.asdict(CFG)), model).eval()


def _ids(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    return torch.randint(1, CFG.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def _greedy(hf: HylaForCausalLM, ids: torch.Tensor, new: int, **kwargs):
    return hf.generate(
        ids,
        max_new_tokens=new,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
        **kwargs,
    )


def _assert_same(got, expected, rows: slice = slice(None)) -> None:
    """Equal greedy tokens (the new ones) and logits within TOL at every step."""
    assert torch.equal(
        got.sequences[:, -len(got.logits) :], expected.sequences[rows, -len(expected.logits) :]
    )
    for step, (a, b) in enumerate(zip(got.logits, expected.logits, strict=True)):
        torch.testing.assert_close(a, b[rows], atol=TOL, rtol=0, msg=f"logits of step {step}")


def test_cached_generate_equals_recompute_and_hyla_generate(hf: HylaForCausalLM):
    prompt = _ids((2, 20))  # longer than the fused ops' limit on CPU: a chunked prefill
    cached = _greedy(hf, prompt, 8)
    assert isinstance(cached.cache, HylaCache)
    _assert_same(cached, _greedy(hf, prompt, 8, use_cache=False))
    assert torch.equal(cached.sequences, generate(hf.model, prompt, 8))
    beams = dict(max_new_tokens=5, num_beams=3, do_sample=False)
    assert torch.equal(hf.generate(prompt, **beams), hf.generate(prompt, use_cache=False, **beams))


def test_the_returned_cache_continues(hf: HylaForCausalLM):
    ids = _ids((2, 12), seed=1)
    with torch.no_grad():
        whole = hf(ids, use_cache=False).logits
        head = hf(ids[:, :7])
        assert head.past_key_values.get_seq_length() == 7
        tail = hf(ids[:, 7:], past_key_values=head.past_key_values).logits
    torch.testing.assert_close(torch.cat([head.logits, tail], 1), whole, atol=TOL, rtol=0)

    once = _greedy(hf, ids[:, :5], 8)
    first = _greedy(hf, ids[:, :5], 3)
    second = _greedy(hf, first.sequences, 5, cache=first.cache)
    assert torch.equal(second.sequences, once.sequences)
    torch.testing.assert_close(torch.stack(second.logits), torch.stack(once.logits[3:]))


def _left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :], mask[i, width - len(row) :] = row, 1
    return ids, mask


@pytest.mark.parametrize("use_cache", [True, False])
def test_a_left_padded_batch_gives_each_row_what_it_gives_alone(
    hf: HylaForCausalLM, use_cache: bool
):
    """Rows of 20, 3 and 9 tokens: padding longer than a short-convolution tail, the
    chunked and the fused prefill, through the cache and through a recompute."""
    rows = [_ids((1, n), seed=n)[0] for n in (20, 3, 9)]
    ids, mask = _left_padded(rows)
    batch = _greedy(hf, ids, 6, attention_mask=mask, use_cache=use_cache)
    for i, row in enumerate(rows):
        _assert_same(_greedy(hf, row[None], 6), batch, slice(i, i + 1))

    # continued after a first call, the mask extended as generate extends it
    first = _greedy(hf, ids, 2, attention_mask=mask)
    grown = torch.cat([mask, torch.ones(len(rows), 2, dtype=mask.dtype)], 1)
    second = _greedy(hf, first.sequences, 4, attention_mask=grown, cache=first.cache)
    assert torch.equal(second.sequences, batch.sequences)


def test_bad_padding_and_caches_are_refused(hf: HylaForCausalLM):
    ids = _ids((2, 6))
    right_padded = torch.ones_like(ids)
    right_padded[1, 4:] = 0
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"row 1 has padding .* left padding"):
            hf(ids, attention_mask=right_padded)
        with pytest.raises(ValueError, match=r"attention_mask must cover .* got \[2, 5\]"):
            hf(ids, attention_mask=right_padded[:, :5])
        with pytest.raises(ValueError, match=r"0 \(padding\) and 1"):
            hf(ids, attention_mask=right_padded * 2)
        with pytest.raises(TypeError, match="DynamicCache"):
            hf(ids, past_key_values=transformers.DynamicCache())
        cache = hf(ids).past_key_values
        with pytest.raises(ValueError, match="holds 2"):
            hf(_ids((3, 1)), past_key_values=cache)
        with pytest.raises(ValueError, match="cannot crop"):
            cache.crop(-1)
