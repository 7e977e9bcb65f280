"""Sequence parallelism as the models see it: a `SequenceParallel` (the group, the layout,
the method) and the sequence context (`hyla.models.sequence`) that runs each of the model's
requests on this rank's part of the sequence."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from hyla.kernels import GroupedTokens, flash_attention
from hyla.models.sequence import CausalFn, check_doc_start, conv_reach
from hyla.parallel.comm import all_reduce, comm_scope
from hyla.parallel.halo import HaloExchange
from hyla.parallel.lasp2h import attention_over
from hyla.parallel.layout import SequenceLayout
from hyla.parallel.ops import RunCuts, recurrence_over
from hyla.parallel.support import ArgumentError, check_group, check_split, check_supports
from hyla.parallel.ulysses import ulysses


@dataclass(frozen=True)
class SequenceParallel:
    """This rank's share of every sequence: `layout` says which pieces each rank of `group`
    holds, `method` how the layers exchange what they need (lasp2; lasp1 and ulysses are
    baselines). All three are checked here, once: the layers' calls trust them."""

    group: dist.ProcessGroup
    layout: SequenceLayout
    method: str = "lasp2"

    def __post_init__(self) -> None:
        check_split(self.method, self.group, self.layout)

    @classmethod
    def even(
        cls,
        length: int,
        group: dist.ProcessGroup,
        method: str = "lasp2",
        layout: str = "contiguous",
    ) -> SequenceParallel:
        """`length`-token sequences split as evenly as the layout kind allows."""
        try:
            even = SequenceLayout.even(layout, length, check_group(group))
        except ArgumentError as err:  # the layout kind is this function's `layout`
            raise err.renamed({"kind": "layout", "world": "group"}) from None
        return cls(group, even, method)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    def shard(self, x: Tensor, dim: int = 1) -> Tensor:
        """This rank's local part of a whole sequence."""
        return self.layout.shard(x, self.rank, dim)


class ShardedContext:
    """One forward pass's view of this rank's part of the sequence (the interface is
    `hyla.models.sequence.SequenceContext`).

    Each request runs eagerly inside a compiled block (`torch.compiler.disable`): they hold
    the collectives, whose Python (async work handles, the accounting's timers, the
    layout's caches) torch.compile would otherwise trace, for 10x the compile time; the
    kernels inside them are custom ops, opaque to the compiler anyway."""

    def __init__(self, sp: SequenceParallel, input_ids: Tensor, doc_start: Tensor | None) -> None:
        check_doc_start(doc_start, input_ids)
        local = sp.layout.local_length(sp.rank)
        if input_ids.shape[1] != local:
            raise ValueError(
                f"input_ids must hold this rank's {local} tokens of the {sp.layout.length}-token "
                f"sequence (rank {sp.rank} of {sp.layout}), got shape {tuple(input_ids.shape)}"
            )
        if doc_start is not None:
            check_supports(sp.method, "documents")
        self.sp, self.doc_start = sp, doc_start
        self.positions = sp.layout.positions(sp.rank, input_ids.device)
        runs = sp.layout.run_lengths(sp.rank)
        self.cuts = None
        if doc_start is not None or len(runs) > 1:
            self.cuts = RunCuts.build(runs, doc_start, input_ids.shape[0], input_ids.device)
        self._grouped_cuts = self.cuts
        self._start_halos: dict[int, Tensor] = {}

    def _split(self, op: Callable, *args, tokens: GroupedTokens | None, cuts) -> Tensor:
        sp = self.sp
        order = sp.layout.order
        return recurrence_over(sp.method, sp.group, order, op, *args, cuts=cuts, tokens=tokens)

    @torch.compiler.disable
    def recurrence(self, op: Callable, q: Tensor, k: Tensor, v: Tensor, *gates) -> Tensor:
        if self.sp.method == "ulysses":
            return self._ulysses(lambda *whole: op(*whole)[0], q, k, v, *gates)
        return self._split(op, q, k, v, *gates, tokens=None, cuts=self.cuts)

    @torch.compiler.disable
    def grouped_recurrence(self, op: Callable, tokens: GroupedTokens, q, k, v, *gates) -> Tensor:
        if self._grouped_cuts is None:  # grouped tokens are always cut at this rank's runs
            runs = self.sp.layout.run_lengths(self.sp.rank)
            self._grouped_cuts = RunCuts.build(runs, None, tokens.batch, q.device)
        return self._split(op, q, k, v, *gates, tokens=tokens, cuts=self._grouped_cuts)

    @torch.compiler.disable
    def causal(self, fn: CausalFn, x: Tensor, width: int) -> Tensor:
        sp = self.sp
        lengths = sp.layout.run_lengths(sp.rank)
        halos = HaloExchange.apply(x, width, sp.layout, sp.group)  # [R, B, width, C]
        doc_start = self.doc_start
        start_halo = None if doc_start is None else self._start_halo(doc_start, width)
        outputs, first = [], 0
        for i, n in enumerate(lengths):
            padded = torch.cat([halos[i], x[:, first : first + n]], dim=1)
            reach = None
            if doc_start is not None and start_halo is not None:
                run_starts = doc_start[:, first : first + n]
                reach = conv_reach(torch.cat([start_halo[i], run_starts], dim=1), width)
            outputs.append(fn(padded, reach))
            first += n
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    def _start_halo(self, doc_start: Tensor, width: int) -> Tensor:
        """[R, B, width] bool: the document starts among the `width` tokens before each
        run; exchanged once per forward and width (scope "documents")."""
        if width not in self._start_halos:
            sp = self.sp
            with comm_scope("documents"), torch.no_grad():
                halo = HaloExchange.apply(doc_start[..., None].float(), width, sp.layout, sp.group)
            self._start_halos[width] = halo[..., 0] > 0.5
        return self._start_halos[width]

    @torch.compiler.disable
    def attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        sp = self.sp
        if sp.method == "ulysses":
            return self._ulysses(lambda *whole: flash_attention(*whole, causal=True), q, k, v)
        return attention_over(
            q, k, v, group=sp.group, layout=sp.layout, rank=sp.rank, doc_start=self.doc_start
        )

    @torch.compiler.disable
    def total(self, x: Tensor) -> Tensor:
        return all_reduce(x.detach().clone(), self.sp.group)

    def _ulysses(self, fn: Callable, q: Tensor, *rest: Tensor | None) -> Tensor:
        """Ulysses baseline: fn on whole-sequence head groups. A per-head constant ([H]) is
        expanded to every token first so that it is split by heads like the rest."""
        sp = self.sp
        per_head = tuple(
            x.expand(q.shape[0], q.shape[1], -1) if x is not None and x.dim() == 1 else x
            for x in (q, *rest)
        )
        lengths = [sp.layout.local_length(r) for r in range(sp.layout.world)]
        return ulysses(fn, per_head, group=sp.group, lengths=lengths)


class ShardedSequence:
    """The sequence strategy `hyla.parallel.parallelize` installs in a model."""

    def __init__(self, sp: SequenceParallel) -> None:
        self.sp = sp

    def context(self, input_ids: Tensor, doc_start: Tensor | None) -> ShardedContext:
        return ShardedContext(self.sp, input_ids, doc_start)
