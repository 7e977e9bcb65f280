"""HybridLM: embedding, pre-norm blocks (mixer + SwiGLU), final norm, LM head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from hyla.models.config import ModelConfig
from hyla.models.decoding import DecodingContext
from hyla.models.layers import RMSNorm, SwiGLU
from hyla.models.mixers import MIXERS
from hyla.models.mixers.common import LayerState
from hyla.models.sequence import SequenceContext, SequenceStrategy, WholeSequence

IGNORE_INDEX = -100


@dataclass
class LMOutput:
    """When the sequence is split across processes (`HybridLM.sequence`), every field is this
    process's part of the whole sequence's."""

    loss: Tensor  # mean cross-entropy + auxiliary losses: what the optimizer minimises
    ce_sum: Tensor  # summed cross-entropy over the counted tokens
    n_tokens: Tensor  # tokens whose label is not IGNORE_INDEX
    aux_loss: Tensor  # summed MoM load-balancing losses (0 without MoM layers)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, letter: str) -> None:
        super().__init__()
        self.mixer_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = MIXERS[letter](cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_width)

    def forward(self, x: Tensor, seq: SequenceContext) -> tuple[Tensor, Tensor]:
        mixed, aux = self.mixer(self.mixer_norm(x), seq)
        x = x + mixed
        x = x + self.mlp(self.mlp_norm(x))
        return x, (aux if aux is not None else x.new_zeros((), dtype=torch.float32))


class HybridLM(nn.Module):
    """`sequence` decides how a forward pass sees its sequence: the whole of it in this
    process (the default), or this rank's part of it once `hyla.parallel.parallelize` has
    installed a sequence-parallel strategy. The model itself never knows which; nor does it
    apply training policies (activation checkpointing, data parallelism): `parallelize`
    wraps its blocks from outside."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.sequence: SequenceStrategy = WholeSequence()
        with torch.random.fork_rng(devices=[]):  # construction's default inits are overwritten
            self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
            self.blocks = nn.ModuleList(Block(cfg, letter) for letter in cfg.pattern)
            self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.head = (
                None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
            )
        if self.embed.weight.device.type != "meta":
            self.init_weights()

    @classmethod
    def from_pretrained(cls, folder: str, device: str | torch.device = "cpu") -> HybridLM:
        """A model exported by `save_pretrained` / `hyla export` (see hyla.models.pretrained)."""
        from hyla.models.pretrained import from_pretrained

        return from_pretrained(folder, device)

    def save_pretrained(self, folder: str, extra: dict | None = None) -> None:
        from hyla.models.pretrained import save_pretrained

        save_pretrained(self, folder, extra)

    @property
    def head_weight(self) -> Tensor:
        return self.embed.weight if self.head is None else self.head.weight

    def init_weights(self) -> None:
        """Deterministic from cfg.seed, leaving the global RNG untouched: normal(0, init_std)
        for embeddings and projections, output projections scaled by 1/sqrt(2 * layers)."""
        std, out_std = self.cfg.init_std, self.cfg.init_std / (2 * len(self.blocks)) ** 0.5
        devices = [self.embed.weight.device] if self.embed.weight.is_cuda else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.cfg.seed)
            for name, module in self.named_modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    is_output = name.endswith(("o_proj", "mlp.down"))
                    nn.init.normal_(module.weight, 0.0, out_std if is_output else std)
                    if isinstance(module, nn.Linear) and module.bias is not None:
                        nn.init.zeros_(module.bias)
                elif hasattr(module, "reset_parameters") and module is not self:
                    module.reset_parameters()

    def new_states(self) -> list[LayerState]:
        """Empty decoding states, one per layer."""
        return [{} for _ in self.blocks]

    def hidden_states(
        self,
        input_ids: Tensor,
        states: list[LayerState] | None = None,
        doc_start: Tensor | None = None,
        valid: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """[B, T] token ids -> (final-normed hidden [B, T, d], summed auxiliary loss).

        doc_start [B, T] bool (True at each document's first token) turns on document
        masking: no token sees another document. `states` (from `new_states`) decodes:
        each layer continues from and updates its state, in one process, whatever sequence
        strategy the model has (a `DecodingContext` per layer). valid [B, T] bool (decoding
        only) is False at left padding, which changes no state and no token's output;
        hyla.models.decoding.DecodingState checks that padding is on the left."""
        if states is None:
            if valid is not None:
                raise ValueError(
                    "valid (padding) needs decoding states: a whole pass has no padding; "
                    "pass states=model.new_states()"
                )
            seq = self.sequence.context(input_ids, doc_start)
            return self._run(input_ids, [seq] * len(self.blocks))
        if doc_start is not None:
            raise ValueError(
                "doc_start (document masking) cannot be combined with decoding states; "
                "decode one document at a time instead"
            )
        if len(states) != len(self.blocks):
            raise ValueError(
                f"states must hold one LayerState per layer ({len(self.blocks)}), got "
                f"{len(states)}: start from model.new_states()"
            )
        return self._run(input_ids, [DecodingContext(input_ids, s, valid) for s in states])

    def _run(self, input_ids: Tensor, contexts: list[SequenceContext]) -> tuple[Tensor, Tensor]:
        """The blocks over input_ids, block i seeing its sequence through contexts[i]."""
        x = self.embed(input_ids)
        aux = x.new_zeros((), dtype=torch.float32)
        for block, seq in zip(self.blocks, contexts, strict=True):
            x, block_aux = block(x, seq)
            aux = aux + block_aux
        return self.norm(x), aux

    def logits(self, hidden: Tensor) -> Tensor:
        return F.linear(hidden, self.head_weight).float()

    def loss_terms(self, hidden: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(summed cross-entropy, counted tokens), computed loss_chunk_size tokens at a time;
        each chunk's logits are recomputed in backward instead of stored."""
        flat_h, flat_y = hidden.flatten(0, 1), labels.flatten()
        total = hidden.new_zeros((), dtype=torch.float32)
        for h_chunk, y_chunk in zip(
            flat_h.split(self.cfg.loss_chunk_size),
            flat_y.split(self.cfg.loss_chunk_size),
            strict=True,
        ):
            total = total + checkpoint(
                _chunk_ce, h_chunk, y_chunk, self.head_weight, use_reentrant=False
            )
        return total, (flat_y != IGNORE_INDEX).sum()

    def forward(
        self, input_ids: Tensor, labels: Tensor, doc_start: Tensor | None = None
    ) -> LMOutput:
        """Training forward: labels [B, T] are the next-token targets aligned with input_ids
        (IGNORE_INDEX where no loss is wanted); doc_start: see `hidden_states`.

        When the sequence is split across processes, all three are this process's part of
        the rows, and so is the loss: the cross-entropy summed over the local tokens divided
        by the whole sequence's token count. Summed over the processes, the parts and their
        gradients are the whole sequence's."""
        if labels.shape != input_ids.shape:
            raise ValueError(
                f"labels must have input_ids' shape {tuple(input_ids.shape)}, "
                f"got {tuple(labels.shape)}"
            )
        seq = self.sequence.context(input_ids, doc_start)
        hidden, aux = self._run(input_ids, [seq] * len(self.blocks))
        ce_sum, n_tokens = self.loss_terms(hidden, labels)
        loss = ce_sum / seq.total(n_tokens).clamp_min(1) + aux
        return LMOutput(loss=loss, ce_sum=ce_sum, n_tokens=n_tokens, aux_loss=aux)


def _chunk_ce(hidden: Tensor, labels: Tensor, weight: Tensor) -> Tensor:
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
