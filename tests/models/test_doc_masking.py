"""Document masking: a packed batch with doc_start equals running every document alone.

The reference cuts each row at its row start and document starts, runs each piece through
the model as its own sequence (rotary positions from 0: relative rotary makes that equal to
the packed run's row positions) and concatenates. Logits, the loss (cross-entropy plus the
MoM balance loss, whose statistics are sums over tokens, so the reference collects the
router logits of every piece) and every parameter gradient must agree.

Tolerance: both sides run the same fp32 kernels on the same per-document chunk grid, so
they differ only by summation order (tiles, padding, conv taps as einsum vs conv1d, loss
sums over <= 450 tokens): round-off near 1e-6 of the largest entry. The default 2e-4
leaves margin, while a leak across one document boundary moves results by 1e-2 or more:
the test checks that running the same batch unmasked misses the reference by far more.
"""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F

from hyla.models import HybridLM, ModelConfig
from hyla.models.mixers.mom import MixtureOfMemories, Routing
from hyla.parallel import TrainingPolicy, parallelize
from tests.kernels.cases import TOLERANCE, assert_close

T = 150  # > 2 chunks of 64: a document spans the chunk boundary at 64
# Row 0: a document at position 0, 1-token documents (5, 6, 7), one from 10 to 99 across a
# chunk boundary, a 1-token document at the very end. Row 1: no start at all (the row
# begins mid-document). Row 2: mid-document start, then documents at 1, 70 (1 token), 71.
STARTS = [[0, 5, 6, 7, 10, 100, 149], [], [1, 70, 71, 140]]
CONFIGS = {
    "every-mixer": dict(layers="LGDMA", linear_decay="scalar_gate"),
    "constant-decay": dict(layers="LDA", linear_decay="constant"),
    "plain-mom": dict(layers="LM", linear_decay="none", mom_shared_memory=False),
}


def _model(name: str, **overrides) -> HybridLM:
    base = dict(d_model=32, n_heads=2, attn_kv_heads=1, vocab_size=50, init_std=0.2)
    return HybridLM(ModelConfig(**{**base, **CONFIGS[name], **overrides}))


def packed_batch(
    starts: list[list[int]], t: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ids over a vocabulary of 50, next-token labels (some ignored), and doc_start
    True at `starts` of each row."""
    ids = torch.randint(0, 50, (len(starts), t), generator=torch.Generator().manual_seed(0))
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    labels[1, 20:30] = -100
    doc_start = torch.zeros(len(starts), t, dtype=torch.bool)
    for row, row_starts in enumerate(starts):
        doc_start[row, row_starts] = True
    return ids, labels, doc_start


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return packed_batch(STARTS, T)


def _pieces(starts: list[int]) -> list[tuple[int, int]]:
    bounds = sorted({0, *starts, T})
    return list(pairwise(bounds))


def _reference(model: HybridLM, ids: torch.Tensor, labels: torch.Tensor):
    """(logits [B, T, V], loss) from every document run alone."""
    routers: dict[int, list[torch.Tensor]] = {}
    hooks = [
        block.mixer.router.register_forward_hook(
            lambda _m, _i, out, key=i: routers.setdefault(key, []).append(out)
        )
        for i, block in enumerate(model.blocks)
        if isinstance(block.mixer, MixtureOfMemories)
    ]
    rows = []
    for row, starts in enumerate(STARTS):
        pieces = [
            model.logits(model.hidden_states(ids[row : row + 1, s:e])[0])
            for s, e in _pieces(starts)
        ]
        rows.append(torch.cat(pieces, dim=1))
    for hook in hooks:
        hook.remove()
    logits = torch.cat(rows)
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    aux = sum(
        (
            model.cfg.mom_aux_weight
            * Routing(
                torch.cat([x.flatten(0, 1) for x in parts])[None],
                model.cfg.mom_top_k,
                model.cfg.mom_shared_memory,
            ).aux_loss()
            for parts in routers.values()
        ),
        torch.zeros(()),
    )
    return logits, ce / (labels != -100).sum() + aux


def _grads(model: HybridLM) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return grads


@pytest.mark.parametrize("name", list(CONFIGS))
def test_packed_documents_equal_separate_runs(name: str):
    ids, labels, doc_start = _batch()
    model = _model(name)
    want_logits, want_loss = _reference(model, ids, labels)
    want_loss.backward()
    want_grads = _grads(model)

    out = model(ids, labels, doc_start=doc_start)
    out.loss.backward()
    got_grads = _grads(model)
    with torch.no_grad():
        got_logits = model.logits(model.hidden_states(ids, doc_start=doc_start)[0])
        unmasked = model.logits(model.hidden_states(ids)[0])
    assert_close(f"{name} logits", got_logits, want_logits.detach())
    assert_close(f"{name} loss", out.loss.detach(), want_loss.detach())
    for pname, want in want_grads.items():
        assert_close(f"{name} d{pname}", got_grads[pname], want)
    # The check has teeth: without the mask, tokens after a document start see the previous
    # document, far beyond the tolerance.
    leak = (unmasked - want_logits).abs().max() / want_logits.abs().max()
    assert leak > 100 * TOLERANCE, f"unmasked run within {leak:.2g} of the reference"


def test_no_document_start_changes_nothing_and_checkpointing_agrees():
    """All-False doc_start is the unmasked model (rows are sequences either way), and
    activation checkpointing recomputes the masked blocks exactly."""
    ids, labels, doc_start = _batch()
    model = _model("every-mixer")
    plain = model(ids, labels)
    plain.loss.backward()
    want = _grads(model)
    none_start = model(ids, labels, doc_start=torch.zeros_like(doc_start))
    none_start.loss.backward()
    got = _grads(model)
    # Each side runs other kernels (the masked convolution's einsum against conv1d, packed
    # against plain recurrences): fp32 round-off, which in gradients summed over every token
    # (the gates' A_log) reaches about 1e-5 of their largest entry. A leak is 1e-2 or more.
    assert_close("loss", none_start.loss.detach(), plain.loss.detach(), tol=1e-5)
    for pname, g in want.items():
        assert_close(f"d{pname}", got[pname], g, tol=5e-5)

    masked = model(ids, labels, doc_start=doc_start)
    masked.loss.backward()
    want = _grads(model)
    ckpt = _model("every-mixer", activation_checkpointing=True).train()
    ckpt = parallelize(ckpt, None, TrainingPolicy())
    again = ckpt(ids, labels, doc_start=doc_start)
    again.loss.backward()
    # Recomputation runs the same kernels, but autograd sums a parameter's gradient pieces in
    # another order: the same round-off margin as above.
    assert_close("checkpointed loss", again.loss.detach(), masked.loss.detach(), tol=1e-5)
    for (pname, g), p in zip(want.items(), ckpt.parameters(), strict=True):
        assert_close(f"checkpointed d{pname}", p.grad, g, tol=5e-5)


def test_bad_doc_start():
    ids, labels, doc_start = _batch()
    model = _model("every-mixer")
    with pytest.raises(ValueError, match="doc_start must be a bool tensor"):
        model(ids, labels, doc_start=doc_start.long())
    with pytest.raises(ValueError, match=r"doc_start must have input_ids' shape \(3, 150\)"):
        model(ids, labels, doc_start=doc_start[:, :10])
    with pytest.raises(ValueError, match="cannot be combined with decoding"):
        model.hidden_states(ids, model.new_states(), doc_start=doc_start)
