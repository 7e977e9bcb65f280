"""flash_attention on both backends against the materialised softmax in fp64.

The kernels run in fp32 and are compared, output and input gradients alike, relative to the
largest reference entry. Softmax rows are convex combinations, so fp32 round-off in scores
over dot products of <= 48 terms and sums of <= 130 probabilities stays near 1e-6 of that;
a tolerance of 2e-4 leaves ample margin while a wrong mask, offset, tile edge or head
mapping shows up as O(1). The Triton cases run through its interpreter on CPU, so they
stay small.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from hyla.kernels.attention import flash_attention, reference_attention, torch_chunk
from tests.devices import BACKENDS, INTERPRETED
from tests.kernels.cases import TOLERANCE, assert_close


@dataclass(frozen=True)
class Shape:
    """One attention problem: sizes, mask and scale."""

    name: str
    tq: int
    tk: int
    hq: int = 2
    hkv: int = 2
    d: int = 48
    dv: int = 48
    causal: bool = True
    q_offset: int = 0
    scale: float | None = None
    batch: int = 2

    def inputs(self, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        q = torch.randn(self.batch, self.tq, self.hq, self.d, generator=gen)
        k = torch.randn(self.batch, self.tk, self.hkv, self.d, generator=gen)
        v = torch.randn(self.batch, self.tk, self.hkv, self.dv, generator=gen)
        return q, k, v


SHAPES = [
    Shape("t1", 1, 1),
    Shape("t63", 63, 63),
    Shape("t130", 130, 130, batch=1),
    Shape("t63-full", 63, 63, causal=False),
    Shape("offset", 37, 87, q_offset=50),
    Shape("offset-inner", 20, 87, q_offset=10),
    Shape("offset-full", 37, 87, causal=False),
    Shape("gqa2", 70, 70, hq=4, hkv=2, d=16, dv=16),
    Shape("gqa1-offset", 37, 87, hq=4, hkv=1, d=16, dv=16, q_offset=50),
    Shape("dv", 65, 65, d=16, dv=48, scale=0.3),
    Shape("d5", 33, 33, hq=3, hkv=1, d=5, dv=3),
    Shape("sharp", 63, 63, scale=3.0),  # logits up to ~87: e^87 is near the fp32 limit
]


def _run(fn, inputs, dtype: torch.dtype, shape: Shape, **kwargs) -> dict[str, torch.Tensor]:
    """o and the gradients of a random linear loss on it w.r.t. q, k, v."""
    leaves = [x.detach().to(dtype).requires_grad_() for x in inputs]
    o = fn(*leaves, causal=shape.causal, q_offset=shape.q_offset, scale=shape.scale, **kwargs)
    gen = torch.Generator().manual_seed(1234)
    (o * torch.randn(o.shape, generator=gen).to(o)).sum().backward()
    grads = {f"d{n}": leaf.grad for n, leaf in zip("qkv", leaves, strict=True)}
    return {"o": o.detach(), **grads}


def _compare(shape: Shape, backend: str, seed: int = 0) -> None:
    inputs = shape.inputs(seed)
    got = _run(flash_attention, inputs, torch.float32, shape, backend=backend)
    want = _run(reference_attention, inputs, torch.float64, shape)
    for name, expected in want.items():
        assert got[name].dtype == torch.float32, f"{name}: dtype {got[name].dtype}"
        if not expected.any():
            # One visible key (Tq = Tk = 1, causal): dq and dk are exactly zero in theory and
            # fp32 round-off of O(1) terms in practice; the inputs are O(1), so bound it so.
            err = got[name].abs().max().item()
            assert err <= TOLERANCE, f"{shape.name}/{backend}/{name}: {err:.3g} != 0"
            continue
        assert_close(f"{shape.name}/{backend}/{name}", got[name], expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=[s.name for s in SHAPES])
def test_matches_reference(shape: Shape, backend: str):
    _compare(shape, backend)


@pytest.mark.parametrize(
    "shape",
    [
        Shape("tiles", 150, 150, hq=4, hkv=2, d=16, dv=8),
        Shape("tiles-offset", 90, 200, hq=4, hkv=1, d=16, dv=8, q_offset=97),
        Shape("tiles-full", 90, 200, d=16, dv=8, causal=False),
    ],
    ids=lambda s: s.name,
)
def test_torch_many_tiles(shape: Shape, monkeypatch: pytest.MonkeyPatch):
    """The tiled loop (which document ids select; here all tokens are one document) with
    small query tiles, so that tile edges meet the diagonal at every phase."""
    monkeypatch.setattr(torch_chunk, "QUERY_TILE", 16)
    q_doc, k_doc = _one_document(shape)
    inputs = shape.inputs()
    got = _run(flash_attention, inputs, torch.float32, shape, backend="torch", q_doc=q_doc,
               k_doc=k_doc)  # fmt: skip
    want = _run(reference_attention, inputs, torch.float64, shape)
    for name, expected in want.items():
        assert_close(f"{shape.name}/tiled/{name}", got[name], expected)


def _one_document(shape: Shape) -> tuple[torch.Tensor, torch.Tensor]:
    """Document ids that put every query and key in one document: no mask beyond causal."""
    return (torch.zeros(shape.batch, n, dtype=torch.int32) for n in (shape.tq, shape.tk))


def test_torch_scores_stay_tiled(monkeypatch: pytest.MonkeyPatch):
    """No matmul in the tiled loop produces more than one query tile's scores (no T x T)."""
    largest = 0
    matmul = torch.matmul

    def spy(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        nonlocal largest
        out = matmul(a, b)
        largest = max(largest, out.numel())
        return out

    monkeypatch.setattr(torch, "matmul", spy)
    b, t, h, d = 1, 1024, 2, 16
    q, k, v = (torch.randn(b, t, h, d, requires_grad=True) for _ in range(3))
    doc = torch.zeros(b, t, dtype=torch.int32)
    flash_attention(q, k, v, backend="torch", q_doc=doc, k_doc=doc).sum().backward()
    assert 0 < largest <= b * h * torch_chunk.QUERY_TILE * t < b * h * t * t


@pytest.mark.parametrize(
    ("backend", "dtype"),
    [
        ("torch", torch.bfloat16),
        ("torch", torch.float64),
        pytest.param("triton", torch.float64, marks=INTERPRETED),
    ],
)
def test_other_dtypes(backend: str, dtype: torch.dtype):
    """Results come back in the input dtype; the kernels compute in fp32 either way (the
    interpreter cannot run 16-bit dots, so bf16 is checked on the torch path only here)."""
    shape = Shape("dtype", 37, 87, hq=4, hkv=2, d=16, dv=16, q_offset=50)
    inputs = [x.to(dtype).double() for x in shape.inputs()]
    got = _run(flash_attention, inputs, dtype, shape, backend=backend)
    want = _run(reference_attention, inputs, torch.float64, shape)
    tol = 3e-2 if dtype == torch.bfloat16 else TOLERANCE
    for name, expected in want.items():
        assert got[name].dtype == dtype
        assert_close(f"{backend}/{dtype}/{name}", got[name], expected, tol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend: str):
    """q, k, v as transposed views of [B, H, T, D] tensors (not contiguous in [B, T, H, D])."""
    shape = Shape("strided", 37, 87, hq=4, hkv=2, d=16, dv=8, q_offset=50)
    inputs = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in shape.inputs()]
    assert not inputs[0].is_contiguous()
    got = flash_attention(*inputs, q_offset=50, backend=backend)
    assert_close("strided", got, reference_attention(*inputs, q_offset=50))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_on_gpu(dtype: torch.dtype):
    """Compiled kernels at a realistic size; 16-bit inputs are rounded first so that the
    reference sees what the kernel sees, and they keep 8-11 bits of mantissa: 3e-2."""
    shape = Shape("gpu", 700, 1000, hq=8, hkv=2, d=64, dv=64, q_offset=300)
    inputs = [x.to(dtype).double().cuda() for x in shape.inputs()]
    got = _run(flash_attention, inputs, dtype, shape, backend="triton")
    want = _run(reference_attention, inputs, torch.float64, shape)
    tol = 2e-4 if dtype == torch.float32 else 3e-2
    for name, expected in want.items():
        assert got[name].dtype == dtype
        assert_close(f"gpu/{dtype}/{name}", got[name], expected, tol=tol)


def _doc_ids(shape: Shape, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Document ids of the keys (a new document at each random start, about one token in
    eight, so that 1-token documents and documents across tile edges occur) and of the
    queries: the keys' at the queries' positions when causal. Non-causal cases draw
    unordered query ids, some in no key's document: those rows see nothing."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.rand(shape.batch, shape.tk, generator=gen) < 0.125
    k_doc = starts.cumsum(1)
    if shape.causal:
        return k_doc[:, shape.q_offset : shape.q_offset + shape.tq], k_doc
    return torch.randint(0, int(k_doc.max()) + 3, (shape.batch, shape.tq), generator=gen), k_doc


DOC_SHAPES = [
    Shape("docs", 150, 150, hq=4, hkv=2, d=16, dv=8),
    Shape("docs-offset", 37, 87, hq=4, hkv=1, d=16, dv=16, q_offset=50),
    Shape("docs-full", 63, 90, d=16, dv=8, causal=False),
]


@pytest.mark.parametrize("tile", [None, 16])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", DOC_SHAPES, ids=[s.name for s in DOC_SHAPES])
def test_document_mask(shape: Shape, backend: str, tile: int | None, monkeypatch):
    """q_doc / k_doc against the reference with the explicit mask q_doc[i] == k_doc[j];
    without the mask the output differs by O(1), so the check can fail."""
    if tile is not None:
        if backend == "triton":
            pytest.skip("the tile size is a torch-path setting")
        monkeypatch.setattr(torch_chunk, "QUERY_TILE", tile)
    inputs = shape.inputs(seed=3)
    q_doc, k_doc = _doc_ids(shape)
    mask = q_doc[:, :, None] == k_doc[:, None, :]
    got = _run(flash_attention, inputs, torch.float32, shape, q_doc=q_doc, k_doc=k_doc,
               backend=backend)  # fmt: skip
    want = _run(reference_attention, inputs, torch.float64, shape, mask=mask)
    for name, expected in want.items():
        assert_close(f"{shape.name}/{backend}/{name}", got[name], expected)
    unmasked = _run(reference_attention, inputs, torch.float64, shape)["o"]
    assert (unmasked - want["o"]).abs().max() > 0.1
    if not shape.causal:  # queries whose document has no key: output 0, no gradient
        unseen = ~mask.any(-1)
        assert unseen.any() and (got["o"][unseen] == 0).all() and (got["dq"][unseen] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_document_mask_on_gpu(dtype: torch.dtype):
    """The compiled document-masked kernels at a realistic size (tolerances as above)."""
    shape = Shape("gpu-docs", 700, 1000, hq=8, hkv=2, d=64, dv=64, q_offset=300)
    inputs = [x.to(dtype).double().cuda() for x in shape.inputs()]
    q_doc, k_doc = (x.cuda() for x in _doc_ids(shape))
    mask = q_doc[:, :, None] == k_doc[:, None, :]
    got = _run(flash_attention, inputs, dtype, shape, q_doc=q_doc, k_doc=k_doc,
               backend="triton")  # fmt: skip
    want = _run(reference_attention, inputs, torch.float64, shape, mask=mask)
    tol = 2e-4 if dtype == torch.float32 else 3e-2
    for name, expected in want.items():
        assert_close(f"gpu-docs/{dtype}/{name}", got[name], expected, tol=tol)


def _bad(**changes):
    """Valid inputs with some replaced: q [1, 4, 4, 8], k/v [1, 6, 2, 8]."""
    args = {
        "q": torch.randn(1, 4, 4, 8),
        "k": torch.randn(1, 6, 2, 8),
        "v": torch.randn(1, 6, 2, 8),
        "causal": True,
        "q_offset": 2,
        "scale": None,
    }
    args.update(changes)
    return args


BAD = {
    "q-not-tensor": (_bad(q=[1.0]), "q must be a torch.Tensor"),
    "q-3d": (_bad(q=torch.randn(4, 4, 8)), "q must be 4-D"),
    "k-int": (_bad(k=torch.ones(1, 6, 2, 8, dtype=torch.int64)), "k must be a floating"),
    "v-dtype": (_bad(v=torch.randn(1, 6, 2, 8).double()), "v must have q's dtype"),
    "k-head-dim": (_bad(k=torch.randn(1, 6, 2, 5)), "k must be"),
    "k-batch": (_bad(k=torch.randn(2, 6, 2, 8)), "k must be"),
    "v-length": (_bad(v=torch.randn(1, 5, 2, 8)), "v must be"),
    "v-heads": (_bad(v=torch.randn(1, 6, 1, 8)), "v must be"),
    "heads": (_bad(k=torch.randn(1, 6, 3, 8), v=torch.randn(1, 6, 3, 8)), "must divide"),
    "empty": (_bad(q=torch.randn(1, 0, 4, 8)), "q must have every dimension"),
    "offset-negative": (_bad(q_offset=-1), "q_offset must be an int >= 0"),
    "offset-float": (_bad(q_offset=1.0), "q_offset must be an int >= 0"),
    "offset-too-far": (_bad(q_offset=3), "q_offset \\+ Tq <= Tk"),
    "causal-not-bool": (_bad(causal=1), "causal must be a bool"),
    "scale": (_bad(scale=-1.0), "scale must be a finite positive"),
}
BAD_DOCS = {
    "k-doc-missing": (_bad(q_doc=torch.zeros(1, 4, dtype=torch.long)), "given together"),
    "doc-float": (
        _bad(q_doc=torch.zeros(1, 4), k_doc=torch.zeros(1, 6)),
        "q_doc must hold integer",
    ),
    "doc-shape": (
        _bad(q_doc=torch.zeros(1, 4, dtype=torch.long), k_doc=torch.zeros(1, 4, dtype=torch.long)),
        r"k_doc must have shape \[B, T\] = \(1, 6\)",
    ),
}


@pytest.mark.parametrize("case", BAD_DOCS.values(), ids=list(BAD_DOCS))
def test_bad_document_ids(case):
    kwargs, message = case
    with pytest.raises(ValueError, match=message):
        flash_attention(**kwargs)


@pytest.mark.parametrize("fn", [flash_attention, reference_attention], ids=["flash", "ref"])
@pytest.mark.parametrize("case", BAD.values(), ids=list(BAD))
def test_bad_input(case, fn):
    kwargs, message = case
    with pytest.raises(ValueError, match=message):
        fn(**kwargs)


def test_bad_backend():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="backend must be one of"):
        flash_attention(q, q, q, backend="cuda")


def test_offset_non_causal_is_unchecked():
    """Without the causal mask the offset has no meaning, so any Tq is fine."""
    q, k = torch.randn(1, 9, 2, 8), torch.randn(1, 4, 2, 8)
    o = flash_attention(q, k, k, causal=False, q_offset=7, backend="torch")
    assert_close("non-causal", o, reference_attention(q, k, k, causal=False))
