"""Every training policy, applied to a model from outside in one fixed order, as torchtitan's
parallelize does: the model keeps its code, and `parallelize` changes how it sees its
sequence, what it keeps for backward, whether its blocks are compiled, and how its gradients
meet across ranks."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.futures import Future
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import create_selective_checkpoint_contexts

from hyla.kernels import KEEP_UNDER_CHECKPOINT
from hyla.parallel.comm import TRACKER, CommRecord
from hyla.parallel.context import SequenceParallel, ShardedSequence
from hyla.parallel.support import check_model

if TYPE_CHECKING:
    from hyla.models import HybridLM

DATA_PARALLEL = ("ddp", "fsdp")


@dataclass(frozen=True)
class TrainingPolicy:
    """What `parallelize` applies besides activation checkpointing (which the model's config
    switches: `ModelConfig.activation_checkpointing`, read only here).

    sequence: this rank's share of every sequence; None: each rank holds whole sequences.
    data_parallel: how gradients meet over every rank of the mesh: "ddp" (replicated
    parameters) or "fsdp" (FSDP2: parameters, gradients and optimizer state sharded).
    compile: torch.compile each block, with `compile_backend` ("inductor", or "aot_eager"
    to trace without generating code).
    """

    sequence: SequenceParallel | None = None
    data_parallel: str = "ddp"
    compile: bool = False
    compile_backend: str = "inductor"

    def __post_init__(self) -> None:
        if self.data_parallel not in DATA_PARALLEL:
            raise ValueError(
                f"data_parallel must be one of {DATA_PARALLEL}, got {self.data_parallel!r}"
            )
        backends = torch.compiler.list_backends(exclude_tags=())
        if self.compile_backend not in backends:
            raise ValueError(
                f"compile_backend must be a torch.compile backend, one of {backends}, got "
                f"{self.compile_backend!r}"
            )


def parallelize(model: HybridLM, mesh: DeviceMesh | None, policy: TrainingPolicy) -> nn.Module:
    """Prepare `model` (in place) for training on its rank of `mesh`, a (dp, sp) mesh
    (`ParallelDims.build_mesh`; None: one process, nothing to exchange). Returns the module to
    train: DistributedDataParallel around the model, or the model itself.

    Gradients come out summed over sp (each rank's loss is its part of the sequence's loss)
    and averaged over dp, so the caller scales its loss by nothing but its accumulation.
    """
    if policy.sequence is not None:
        # 1. First, because it changes what the blocks compute: every later step wraps blocks
        # that already run on this rank's part of the sequence, and the comm-scope hooks sit
        # on the bare blocks, so a recompute in backward is attributed to its block too.
        apply_sequence_parallel(model, policy.sequence)
    if model.cfg.activation_checkpointing:
        # 2. Inside the data-parallel units: FSDP gathers a unit's parameters around the
        # whole checkpointed block, so its recompute in backward finds them gathered.
        apply_activation_checkpointing(model)
    if policy.compile:
        # 3. Around each block as the steps above left it (its recompute in backward is
        # traced too), inside the data-parallel units, whose hooks stay eager.
        apply_compile(model, policy.compile_backend)
    if mesh is None or mesh.size() == 1:
        return model
    # 4. Last: FSDP units and DDP's reducer take the blocks as the steps above left them;
    # DDP outermost, as its hooks must see every parameter of the finished module.
    if policy.data_parallel == "fsdp":
        apply_fsdp(model, mesh)
        return model
    return apply_ddp(model, mesh)


def apply_sequence_parallel(model: HybridLM, sp: SequenceParallel) -> None:
    """Swap the model's sequence strategy for the sharded one, and attribute each block's
    collectives to it in the accounting. What the model's layers ask of the method is
    checked here, once (the layers' calls check nothing again)."""
    check_model(sp.method, model.cfg, sp.layout.world)
    model.sequence = ShardedSequence(sp)
    apply_comm_scopes(model)


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


def apply_activation_checkpointing(model: HybridLM) -> None:
    """Each block recomputes its activations in backward instead of storing them, except
    that attention blocks keep their kernel's outputs (selective checkpointing: the policy's
    dispatch mode intercepts every op, so other blocks go without it, and without naming
    torch's no-op context either: torch.compile refuses that one passed explicitly). The
    wrappers keep parameter names for state dicts and distributed checkpoints."""
    for i, letter in enumerate(model.cfg.pattern):
        block = model.blocks[i]
        if letter == "A":
            model.blocks[i] = checkpoint_wrapper(block, context_fn=_keep_attention)
        else:
            model.blocks[i] = checkpoint_wrapper(block)


def _keep_attention():
    return create_selective_checkpoint_contexts(list(KEEP_UNDER_CHECKPOINT))


def apply_compile(model: HybridLM, backend: str) -> None:
    """torch.compile each block in place, as torchtitan does: blocks of one kind share their
    compiled code (parameters are graph inputs), and parameter names stay the model's.
    Sequence parallelism's requests run eagerly between the compiled regions (see
    `hyla.parallel.context`); the kernels are custom ops, opaque to the compiler."""
    for block in model.blocks:
        block.compile(backend=backend)


def apply_fsdp(model: HybridLM, mesh: DeviceMesh) -> None:
    """FSDP2 over every rank of the mesh: each block is its own unit (gathered just before it
    runs), the root holds the embedding and final norm."""
    flat, dp = _flatten(mesh), mesh["dp"].size()
    for block in model.blocks:
        fully_shard(block, mesh=flat)
    fully_shard(model, mesh=flat)
    for module in model.modules():
        if isinstance(module, FSDPModule):  # every unit: sum over sp, mean over dp
            module.set_gradient_divide_factor(float(dp))
            module.set_force_sum_reduction_for_comms(True)  # no averaging op: the sum


def apply_ddp(model: HybridLM, mesh: DeviceMesh) -> DistributedDataParallel:
    """Replicas on every rank of the mesh; gradient buckets reduced by `_mean_over_dp`."""
    group = _flatten(mesh).get_group()
    ddp = DistributedDataParallel(model, process_group=group)
    ddp.register_comm_hook(_Reduction(group, mesh["dp"].size()), _mean_over_dp)
    return ddp


def _flatten(mesh: DeviceMesh) -> DeviceMesh:
    """The (dp, sp) mesh as one dimension over all its ranks, which gradients meet over."""
    return mesh._flatten("dp_sp")


@dataclass(frozen=True)
class _Reduction:
    group: dist.ProcessGroup
    dp: int


def _mean_over_dp(state, bucket):  # unannotated: DDP rejects annotations it reads as text
    """DDP's bucket all-reduce (state: a _Reduction, bucket: a dist.GradBucket): the sum over
    every rank divided by dp (the sp ranks' parts add up to each sample's gradient), recorded
    in the communication accounting as "grads"."""
    buffer = bucket.buffer().div_(state.dp)
    world = dist.get_world_size(state.group)
    sent = 2 * buffer.numel() * buffer.element_size() * (world - 1) // world
    start = time.perf_counter()
    future = dist.all_reduce(buffer, group=state.group, async_op=True).get_future()

    def record(done: Future) -> Tensor:
        TRACKER.records.append(CommRecord("all_reduce", "grads", sent, time.perf_counter() - start))
        return done.value()[0]

    return future.then(record)
