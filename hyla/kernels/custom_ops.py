"""Hyla's kernels as `torch.library` custom ops (namespace `hyla`), and what runs inside each.

PyTorch sees a custom op as one call with a schema and a fake (meta) implementation:
selective activation checkpointing can keep its outputs by name and torch.compile traces
around it. The flip side is that a `TorchDispatchMode` sees none of the op's own
temporaries; `python_implementation` gives a tool that must see them (the memory profiler)
the function to run under its mode instead.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch.library import CustomOpDef

_IMPLEMENTATIONS: dict[Any, Callable] = {}


def without_autocast(fn: Callable) -> Callable:
    """`fn` run with autocast off on the device of its first tensor argument.

    The kernels choose their own precisions (fp32 accumulation and states whatever the
    inputs' dtype), but a custom op's body still runs under the caller's autocast, which
    would recast their matmuls, and only on the calling thread: autocast state does not
    follow work onto worker threads."""

    @functools.wraps(fn)
    def run(*args: Any) -> Any:
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        with torch.autocast(device.type, enabled=False):
            return fn(*args)

    return run


def define_op(name: str, fn: Callable, *, fake: Callable, schema: str | None = None) -> CustomOpDef:
    """`fn` as the custom op hyla::<name> (schema inferred from its annotations unless
    given), run without autocast, with the fake implementation `fake`. Its outputs must not
    alias its inputs."""
    schema = schema or torch.library.infer_schema(fn, mutates_args=())
    body = without_autocast(fn)
    op = torch.library.custom_op(f"hyla::{name}", body, mutates_args=(), schema=schema)
    op.register_fake(fake)
    _IMPLEMENTATIONS[getattr(torch.ops.hyla, name).default] = body
    return op


def python_implementation(func: Any) -> Callable | None:
    """The Python function behind one of hyla's custom ops (an OpOverload, as a dispatch
    mode receives it), or None for any other op."""
    return _IMPLEMENTATIONS.get(func)
