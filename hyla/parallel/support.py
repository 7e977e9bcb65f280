"""Which sequence-parallel method supports what, and hyla.parallel's argument errors: the one
place such checks live.

They run once, where an argument enters hyla.parallel: `SequenceParallel` checks its method,
group and layout when it is built, `parallelize` checks the model once, a forward its
document starts, and the public ops (`lasp2_*`, `lasp2h_attention`) their own arguments. The
layers' calls inside a forward check nothing again. LASP-2 supports everything; the LASP-1
ring and Ulysses are baselines.

Errors name hyla.parallel's own arguments (`method`, `layout`, `sp`, ...): an `ArgumentError`
keeps them as fields of its message, so that a caller who knows them by other names (the
platform's config keys) re-raises the same error in its own terms (`ArgumentError.renamed`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from string import Formatter
from typing import TYPE_CHECKING

import torch.distributed as dist

from hyla.models import ModelConfig

if TYPE_CHECKING:
    from hyla.parallel.layout import SequenceLayout

SP_METHODS = ("lasp2", "lasp1", "ulysses")
FEATURES = ("zigzag", "mom", "documents")


class ArgumentError(ValueError):
    """A bad argument, in hyla.parallel's terms. `template` is a `str.format` string whose
    fields are argument names, except those given in `values` (what was received, what is
    allowed), e.g. ArgumentError("{method} must be one of {allowed}, got {got!r}",
    allowed=SP_METHODS, got="ring")."""

    def __init__(self, template: str, /, **values: object) -> None:
        self.template, self.values = template, values
        super().__init__(self._render({}))

    def renamed(self, names: Mapping[str, str]) -> ValueError:
        """The same error with the arguments called by `names` (argument -> its name there;
        arguments not in it keep their own)."""
        return ValueError(self._render(names))

    def _render(self, names: Mapping[str, str]) -> str:
        fields = {f for _, f, _, _ in Formatter().parse(self.template) if f is not None}
        arguments = {f: names.get(f, f) for f in fields - self.values.keys()}
        return self.template.format(**arguments, **self.values)

    def __reduce__(self):  # pickled across processes (Ray) as itself, not as its message
        return functools.partial(type(self), self.template, **self.values), ()


UNSUPPORTED = {  # method -> feature -> why, and what to do instead
    "lasp1": {
        "zigzag": "a zigzag layout (the ring passes states in rank order); use "
        "{layout}='contiguous' or {method}='lasp2'",
    },
    "ulysses": {
        "zigzag": "a zigzag layout (it gathers whole sequences in rank order); use "
        "{layout}='contiguous' or {method}='lasp2'",
        "mom": "MoM layers (each memory's routed tokens differ per rank); use {method}='lasp2' "
        "or 'lasp1'",
        "documents": "document masking (doc_start); use {method}='lasp2' or 'lasp1'",
    },
}


def check_method(method: str) -> None:
    if method not in SP_METHODS:
        raise ArgumentError(
            "{method} must be one of {allowed}, got {got!r}", allowed=SP_METHODS, got=method
        )


def check_supports(method: str, feature: str) -> None:
    """ArgumentError if sequence-parallel `method` (already checked) cannot run `feature`
    (one of FEATURES)."""
    if feature not in FEATURES:
        raise ArgumentError(
            "{feature} must be one of {allowed}, got {got!r}", allowed=FEATURES, got=feature
        )
    why = UNSUPPORTED.get(method, {}).get(feature)
    if why is not None:
        raise ArgumentError("{method}={got!r} does not support " + why, got=method)


def check_heads(method: str, head_counts: list[int], sp: int) -> None:
    """Ulysses splits heads over the ranks: every head count must divide by sp."""
    if method == "ulysses" and any(h % sp for h in head_counts):
        raise ArgumentError(
            "{method}='ulysses' needs every head count to divide by the sequence-parallel "
            "degree {sp} = {degree}, got head counts {counts}",
            degree=sp,
            counts=head_counts,
        )


def check_model(method: str, model: ModelConfig, sp: int) -> None:
    """What a model's layers ask of the method over sp ranks: MoM layers, and head counts
    (the attention layers' key-value heads too) that Ulysses can split."""
    if "M" in model.pattern:
        check_supports(method, "mom")
    check_heads(method, [model.n_heads, *([model.kv_heads] if "A" in model.pattern else [])], sp)


def check_group(group: dist.ProcessGroup | None) -> int:
    """The number of ranks in `group`, which must be a process group of an initialised
    torch.distributed."""
    if not dist.is_initialized():
        raise ArgumentError("{group} needs torch.distributed to be initialised first")
    if group is None:
        raise ArgumentError("{group} must be the sequence-parallel process group, got None")
    return dist.get_world_size(group)


def check_layout(layout: SequenceLayout, world: int) -> None:
    """`layout` must place its pieces on the `world` ranks of the group."""
    if layout.world != world:
        raise ArgumentError(
            "{layout} must be over the {size} ranks of {group}, got one over {got}",
            size=world,
            got=layout.world,
        )


def check_split(method: str, group: dist.ProcessGroup | None, layout: SequenceLayout | None) -> int:
    """Everything a sequence split across `group` by `layout` (None: one piece per rank, in
    rank order) under `method` needs; returns the group's size."""
    check_method(method)
    world = check_group(group)
    if layout is not None:
        check_layout(layout, world)
        if layout.kind != "contiguous":
            check_supports(method, "zigzag")
    return world
