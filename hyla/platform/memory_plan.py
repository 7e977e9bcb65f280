"""The memory model: per-rank training memory of a config, and the longest context that fits.

The model, per rank of a (dp, sp) mesh holding n = batch_size * T / sp tokens of each
sequence:

- static: fp32 parameters (4 B each), their gradients (4 B) and AdamW's two fp32 moments
  (8 B). hyla's bf16 is autocast over fp32 parameters, so the fp32 parameters are the
  master copy and autocast adds a bf16 copy of every weight (2 B) that backward keeps.
- activations: what each block saves for backward, per token. It is *counted from the
  model's layers* (`hyla.platform.block_profiler`): one real block of each mixer letter runs
  forward on CPU under `saved_tensors_hooks` at two short lengths, and the bytes of the
  distinct storages it saves (parameters and the block input excluded) give bytes per
  token. The block input, the fp32 residual stream, is d_model * 4 B per token per layer.
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

from dataclasses import dataclass

from hyla.kernels.chunking import CHUNK
from hyla.models.config import ModelConfig
from hyla.parallel import LAYOUTS
from hyla.platform.block_profiler import profile_blocks

FP32 = 4
LINEAR_LETTERS = ("L", "G", "D", "M")
# Bytes per logit of one loss chunk in backward: the recomputed logits, their fp32 copy, the
# log-softmax and the logits' gradient (12.5-13 B measured on CPU in fp32 and bf16; rounded up).
LOSS_BYTES_PER_LOGIT = 16


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
    activations: float  # bytes; the blocks' saved bytes per token are fractional
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
