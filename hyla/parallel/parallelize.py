"""Sequence parallelism applied to a model from outside, as torchtitan's parallelize does:
the model keeps its code, and these functions, applied in a fixed order, change how it sees
its sequence."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from hyla.parallel.comm import TRACKER
from hyla.parallel.context import SequenceParallel, ShardedSequence

if TYPE_CHECKING:
    from hyla.models import HybridLM


def parallelize(model: HybridLM, sp: SequenceParallel) -> HybridLM:
    """Make `model` run on this rank's part of every sequence (in place; returned).

    1. apply_sequence_parallel: every forward builds its sequence context from `sp`.
    2. apply_comm_scopes: each block's collectives are attributed to it in the accounting.

    Apply it before wrapping the model in DDP or FSDP, which then see an ordinary module.
    """
    apply_sequence_parallel(model, sp)
    apply_comm_scopes(model)
    return model


def apply_sequence_parallel(model: HybridLM, sp: SequenceParallel) -> None:
    """Swap the model's sequence strategy for the sharded one."""
    model.sequence = ShardedSequence(sp)


def apply_comm_scopes(model: HybridLM) -> None:
    """Hooks that name block i's collectives "layer{i}.{letter}" (backward ones too: the
    autograd Functions remember the scope their forward ran in)."""
    for i, (block, letter) in enumerate(zip(model.blocks, model.cfg.pattern, strict=True)):
        if getattr(block, "_hyla_comm_scope", None) is None:
            _scope_block(block, f"layer{i}.{letter}")


def _scope_block(block: nn.Module, name: str) -> None:
    previous: list[str] = []

    def enter(module, args):
        previous.append(TRACKER.scope)
        TRACKER.scope = name

    def leave(module, args, output):
        TRACKER.scope = previous.pop()

    block.register_forward_pre_hook(enter)
    block.register_forward_hook(leave, always_call=True)
    # nn.Module.__setattr__ is annotated for tensors and modules only; any value is allowed
    block._hyla_comm_scope = name  # type: ignore[assignment]
