"""Capacity planning: per-rank training memory of a config, and the longest context that fits.

The model, per rank of a (dp, sp) mesh holding n = batch_size * T / sp tokens of each
sequence:

- static: fp32 parameters (4 B each), their gradients (4 B) and AdamW's two fp32 moments
  (8 B). hyla's bf16 is autocast over fp32 parameters, so the fp32 parameters are the
  master copy and autocast adds a bf16 copy of every weight (2 B) that backward keeps.
- activations: what each block saves for backward, per token. It is *counted from the
  model's layers*: one real block of each mixer letter runs forward on CPU under
  `saved_tensors_hooks` at two short lengths, and the bytes of the distinct storages it
  saves (parameters and the block input excluded) give bytes per token. The block input,
  the fp32 residual stream, is d_model * 4 B per token per layer.
  Without activation checkpointing every block's saved tensors live until backward; with
  it, only the block inputs do, and backward recomputes one block at a time (`recompute`).
- LASP-2 (sp > 1, linear layers): each layer also keeps qhat (fp32, per token), and for each
  of the rank's pieces (1 contiguous, 2 zigzag) an initial state and its own transition
  (constant in T and in sp: the other ranks' transitions arrive with the backward
  all-gather, whose buffer of sp pieces' states and transitions is a transient of backward).
- LASP-2H (sp > 1, attention layers): every rank keeps the whole sequence's gathered K/V
  for each attention layer (for one layer at a time under checkpointing); its backward
  needs two more copies of that size (dK/dV of the whole sequence, then the reduce-scatter
  buffer).
- transients: the backward of one block (gradients of its activations, about its saved
  size, plus the chunk kernels' recomputed states) and one loss chunk (loss_chunk_size x
  vocab logits in fp32 with their softmax and gradient).

It is an upper bound in one way: gradients are counted whole while activations are counted
whole too, though backward frees activations as gradients fill in. CUDA context, NCCL
buffers and allocator fragmentation are not modelled: `fits` keeps `headroom` of the GPU
free for them.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from hyla.kernels.chunking import CHUNK
from hyla.models import WholeSequence
from hyla.models.config import ModelConfig
from hyla.parallel import LAYOUTS
from hyla.platform.config import PRECISIONS

FP32 = 4
LINEAR_LETTERS = ("L", "G", "D", "M")
# Bytes per logit of one loss chunk in backward: the recomputed logits, their fp32 copy, the
# log-softmax and the logits' gradient (12.5-13 B measured on CPU in fp32 and bf16; rounded up).
LOSS_BYTES_PER_LOGIT = 16
# Probe lengths for counting saved bytes per token: chunk multiples, so no padding.
PROBE_LENGTHS = (CHUNK, 2 * CHUNK)
UNITS = {
    **{"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12},
    **{"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40},
    **{"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40},
}


def parse_bytes(text: str, name: str = "--gpu-mem") -> int:
    """Sizes: "80GB" -> 80e9, "80GiB" / "80G" -> 80 * 2**30, "1024" -> 1024 bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in UNITS or float(match.group(1)) <= 0:
        raise ValueError(
            f"{name} must be a positive size such as 80GB, 80GiB or 81920MiB, got {text!r}"
        )
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


@dataclass(frozen=True)
class LayerShape:
    """A linear mixer's recurrent state: heads x K x V, and how many packed rows each token
    of the sequence turns into (Mixture-of-Memories pads every memory's row to the shared
    memory's full length)."""

    heads: int
    key: int
    value: int
    rows: int
    transition: int  # fp32 numbers of one head's AA under LASP-2: 1, K or K * K


def layer_shape(cfg: ModelConfig, letter: str) -> LayerShape:
    h, hd = cfg.n_heads, cfg.head_dim
    if letter == "L":
        return LayerShape(h, hd, hd, 1, 1)
    if letter == "G":
        return LayerShape(h, cfg.gla_key_dim, hd, 1, cfg.gla_key_dim)
    if letter == "D":
        return LayerShape(h, hd, hd, 1, hd * hd)
    if letter == "M":
        rows = cfg.mom_memories + int(cfg.mom_shared_memory)
        return LayerShape(h, hd, hd, rows, hd * hd)
    raise ValueError(f"letter must be one of {LINEAR_LETTERS}, got {letter!r}")


@dataclass(frozen=True)
class BlockProfile:
    """Per mixer letter, bytes per token of one block: what it saves for backward (its input
    excluded) and the peak of everything alive during its forward and backward."""

    saved: dict[str, float]
    peak: dict[str, float]


class _LiveBytes(TorchDispatchMode):
    """Records, after every op, which storages that ops created are still alive."""

    def __init__(self) -> None:
        super().__init__()
        self.alive: dict[int, tuple[StorageWeakRef, int]] = {}  # storage key -> (ref, uid)
        self.sizes: list[int] = []  # bytes of each storage, by uid
        self.timeline: list[list[int]] = []  # uids alive after each op

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.alive = {k: v for k, v in self.alive.items() if not v[0].expired()}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in self.alive:
                storage = t.untyped_storage()
                self.alive[storage._cdata] = (StorageWeakRef(storage), len(self.sizes))
                self.sizes.append(storage.nbytes())
        self.timeline.append([uid for _, uid in self.alive.values()])
        return out

    def peak(self, exclude: list[torch.Tensor]) -> int:
        """The most bytes alive at once, leaving out the storages of `exclude` (tensors
        still alive now)."""
        keys = {t.untyped_storage()._cdata for t in exclude}
        skip = {uid for key, (_, uid) in self.alive.items() if key in keys}
        return max(sum(self.sizes[u] for u in uids if u not in skip) for uids in self.timeline)


def _measure_block(
    block: torch.nn.Module, d_model: int, length: int, bf16: bool
) -> tuple[int, int]:
    """(bytes of the distinct storages one forward saves for backward, peak bytes alive
    during forward + backward); parameters, their gradients and the block input excluded
    (they do not grow with the length, and parameter gradients fill in while backward
    runs, so at short probe lengths they would decide when the peak falls)."""
    skip = {p.untyped_storage().data_ptr() for p in block.parameters()}
    x = torch.randn(1, length, d_model, requires_grad=True)
    skip.add(x.untyped_storage().data_ptr())
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    grad = torch.randn(1, length, d_model)
    with _LiveBytes() as live:
        with (
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
            torch.autocast("cpu", torch.bfloat16, enabled=bf16),
        ):
            out, _ = block(x, WholeSequence().context(x.new_zeros(1, length).long(), None))
        out.backward(grad)
    peak = live.peak([p.grad for p in block.parameters() if p.grad is not None])
    block.zero_grad(set_to_none=True)
    return sum(storages.values()), peak


_PROFILES: dict[tuple, BlockProfile] = {}


# fields that do not change what one block stores
_NOT_IN_BLOCKS = ("name", "seed", "activation_checkpointing", "loss_chunk_size", "vocab_size")


def _config_key(cfg: ModelConfig) -> tuple:
    fields = dataclasses.asdict(cfg)
    return tuple(
        (k, tuple(v) if isinstance(v, list) else v)
        for k, v in fields.items()
        if k not in _NOT_IN_BLOCKS
    )


def profile_blocks(cfg: ModelConfig, precision: str) -> BlockProfile:
    """Count each letter's bytes per token by running one real block on CPU at two short
    lengths (the slope between them; what does not grow with T, such as parameter gradients
    and autocast's weight copies, cancels). Cached per config and precision.

    Peaks are those of the PyTorch chunkwise kernels; the Triton kernels keep fewer
    intermediates, so on a GPU the prediction errs high. Routers are zeroed so that
    Mixture-of-Memories routes deterministically (ties pick the first memories): the padded
    layout is the same as with any routing, as the shared memory's row spans the sequence."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    key = (_config_key(cfg), precision)
    if key not in _PROFILES:
        from hyla.models.hybrid import Block

        saved, peak = {}, {}
        short, long = PROBE_LENGTHS
        for letter in dict.fromkeys(cfg.pattern):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                block = Block(cfg, letter)
            with torch.no_grad():
                for name, module in block.named_modules():
                    if name.endswith("router"):
                        module.weight.zero_()
            bf16 = precision == "bf16"
            (s0, p0), (s1, p1) = (
                _measure_block(block, cfg.d_model, t, bf16) for t in (short, long)
            )
            saved[letter], peak[letter] = (s1 - s0) / (long - short), (p1 - p0) / (long - short)
        _PROFILES[key] = BlockProfile(saved, peak)
    return _PROFILES[key]


@dataclass
class MemoryPlan:
    """Per-rank bytes of one training step; `total` is the predicted peak."""

    seq_len: int
    sp: int
    tokens_per_rank: int
    parameters: int
    weight_copies: int
    gradients: int
    optimizer: int
    activations: int  # kept from forward to backward (block inputs only, with checkpointing)
    recompute: int  # one block's saved tensors recomputed in backward (checkpointing only)
    lasp_states: int  # LASP-2 states and transitions kept for backward (sp > 1)
    gathered_kv: int  # LASP-2H: the whole sequence's K/V kept for backward (sp > 1)
    backward: int  # transient: one block's backward (activation grads, kernel states, dK/dV)
    loss_chunk: int  # transient: one chunk of logits, softmax and gradient

    TERMS = (
        "parameters",
        "weight_copies",
        "gradients",
        "optimizer",
        "activations",
        "recompute",
        "lasp_states",
        "gathered_kv",
        "backward",
        "loss_chunk",
    )

    @property
    def total(self) -> int:
        return sum(getattr(self, name) for name in self.TERMS)

    def breakdown(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in (*self.TERMS, "total")}


def _lasp2_per_token(cfg: ModelConfig, letter: str) -> float:
    """qhat, kept for backward: fp32 [rows, H, K] (the delta rule's keeps its whole
    [qhat | o] kernel output alive, K + V wide)."""
    s = layer_shape(cfg, letter)
    width = s.key + s.value if letter in ("D", "M") else s.key
    return s.rows * s.heads * width * FP32


def _lasp2_constant(cfg: ModelConfig, letter: str, batch: int, pieces: int) -> int:
    """Per piece of the rank: the initial states [rows*B, H, K, V] and own transitions
    [rows*B, H, AA]."""
    s = layer_shape(cfg, letter)
    rows = s.rows * batch * pieces
    return rows * s.heads * (s.key * s.value + s.transition) * FP32


def _lasp2_backward_gather(cfg: ModelConfig, letter: str, batch: int, sp: int, pieces: int) -> int:
    """LASP-2's backward all-gather: every rank's pieces' transitions and state gradients."""
    return sp * _lasp2_constant(cfg, letter, batch, pieces)


def plan_memory(
    cfg: ModelConfig,
    *,
    seq_len: int,
    batch_size: int = 1,
    sp: int = 1,
    precision: str = "bf16",
    n_params: int | None = None,
    layout: str = "contiguous",
) -> MemoryPlan:
    """Predicted per-rank peak memory of one training step (see the module docstring).
    layout: the sequence-parallel layout, contiguous or zigzag (pieces per rank: 1 or 2)."""
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("sp", sp)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    pieces = 2 if layout == "zigzag" else 1
    if seq_len % sp:
        raise ValueError(f"seq_len must be divisible by sp = {sp}, got {seq_len}")
    if n_params is None:
        from hyla.models.presets import count_parameters

        n_params = count_parameters(cfg)
    profile = profile_blocks(cfg, precision)
    act_bytes = 2 if precision == "bf16" else FP32
    n = batch_size * seq_len // sp
    d = cfg.d_model
    residual = d * FP32  # the residual stream stays fp32 under autocast
    final = 3 * d * FP32 + 16  # last block output, final norm's saved and output, ids, labels

    def block_tokens(letter: str) -> float:
        extra = _lasp2_per_token(cfg, letter) if sp > 1 and letter in LINEAR_LETTERS else 0
        return profile.saved[letter] + extra

    kv_one = batch_size * seq_len * cfg.kv_heads * cfg.head_dim * 2 * act_bytes if sp > 1 else 0
    lasp_one = {
        letter: _lasp2_constant(cfg, letter, batch_size, pieces) if sp > 1 else 0
        for letter in LINEAR_LETTERS
    }
    lasp_gather = {
        letter: _lasp2_backward_gather(cfg, letter, batch_size, sp, pieces) if sp > 1 else 0
        for letter in LINEAR_LETTERS
    }
    letters = cfg.pattern
    n_attn = letters.count("A")
    lasp_all = sum(lasp_one[x] for x in letters if x != "A")
    lasp_max = max((lasp_one[x] for x in letters if x != "A"), default=0)
    heaviest = max(block_tokens(x) for x in letters)
    # beyond a block's saved tensors: its activation gradients and kernel workspaces
    backward = max(
        n * (profile.peak[x] - profile.saved[x]) + (2 * kv_one if x == "A" else lasp_gather[x])
        for x in letters
    )
    loss_chunk = min(cfg.loss_chunk_size, n) * cfg.vocab_size * LOSS_BYTES_PER_LOGIT
    if cfg.activation_checkpointing:
        activations = n * (len(letters) * residual + final)
        recompute = int(n * heaviest)
        lasp_states, gathered_kv = lasp_max, kv_one if n_attn else 0
    else:
        activations = n * (sum(residual + block_tokens(x) for x in letters) + final)
        recompute = 0
        lasp_states, gathered_kv = lasp_all, n_attn * kv_one
    return MemoryPlan(
        seq_len=seq_len,
        sp=sp,
        tokens_per_rank=n,
        parameters=FP32 * n_params,
        weight_copies=2 * n_params if precision == "bf16" else 0,
        gradients=FP32 * n_params,
        optimizer=2 * FP32 * n_params,
        activations=int(activations),
        recompute=recompute,
        lasp_states=int(lasp_states),
        gathered_kv=int(gathered_kv),
        backward=int(backward),
        loss_chunk=int(loss_chunk),
    )


def longest_context(
    cfg: ModelConfig,
    *,
    memory: int,
    batch_size: int = 1,
    sp: int = 1,
    precision: str = "bf16",
    headroom: float = 0.1,
    granule: int = CHUNK,
    layout: str = "contiguous",
) -> int:
    """The longest seq_len (a multiple of sp * granule tokens) whose plan fits in
    memory * (1 - headroom) bytes per rank; 0 when not even one granule fits."""
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom must be in [0, 1), got {headroom!r}")
    from hyla.models.presets import count_parameters

    n_params = count_parameters(cfg)
    budget = memory * (1 - headroom)
    step = sp * granule

    def fits(m: int) -> bool:
        plan = plan_memory(
            cfg,
            seq_len=m * step,
            batch_size=batch_size,
            sp=sp,
            precision=precision,
            n_params=n_params,
            layout=layout,
        )
        return plan.total <= budget

    if not fits(1):
        return 0
    low, high = 1, 2
    while fits(high):
        low, high = high, 2 * high
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low * step
