"""Hyla's kernels as `torch.library` custom ops (namespace `hyla`), and what runs inside each.

PyTorch sees a custom op as one call with a schema and a fake (meta) implementation:
selective activation checkpointing can keep its outputs by name and torch.compile traces
around it. The flip side is that a `TorchDispatchMode` sees none of the op's own
temporaries; `python_implementation` gives a tool that must see them (the memory profiler)
the function to run under its mode instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.library import CustomOpDef

_IMPLEMENTATIONS: dict[Any, Callable] = {}


def define_op(name: str, fn: Callable, *, fake: Callable, schema: str | None = None) -> CustomOpDef:
    """`fn` as the custom op hyla::<name> (schema inferred from its annotations unless
    given), with the fake implementation `fake`. Its outputs must not alias its inputs."""
    op = torch.library.custom_op(f"hyla::{name}", fn, mutates_args=(), schema=schema)
    op.register_fake(fake)
    _IMPLEMENTATIONS[getattr(torch.ops.hyla, name).default] = fn
    return op


def python_implementation(func: Any) -> Callable | None:
    """The Python function behind one of hyla's custom ops (an OpOverload, as a dispatch
    mode receives it), or None for any other op."""
    return _IMPLEMENTATIONS.get(func)
