"""Choosing between the Triton kernels and the PyTorch chunkwise path.

Both implement the same contract (see `hyla.kernels.autograd`). `auto` takes Triton for
CUDA tensors and PyTorch otherwise; `triton` on CPU tensors needs Triton's interpreter
(TRITON_INTERPRET=1 set before the kernels are first imported), which tests use.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

from hyla.kernels.spans import Spanned

ENV_VAR = "HYLA_KERNEL_BACKEND"
CHOICES = ("auto", "torch", "triton")


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(requested: str | None, device: torch.device) -> str:
    """Return "torch" or "triton" for tensors on `device`.

    `requested` (the `backend` argument) wins over the HYLA_KERNEL_BACKEND variable.
    """
    source = "backend" if requested is not None else ENV_VAR
    choice = requested if requested is not None else os.environ.get(ENV_VAR, "auto") or "auto"
    if choice not in CHOICES:
        raise ValueError(f"{source} must be one of {CHOICES}, got {choice!r}")
    if choice == "auto":
        return "triton" if device.type == "cuda" and triton_importable() else "torch"
    if choice == "triton":
        if not triton_importable():
            raise ValueError(f"{source}='triton' but triton is not installed")
        if device.type == "cpu" and not interpreter_on():
            raise ValueError(
                f"{source}='triton' on CPU tensors needs TRITON_INTERPRET=1 in the environment "
                "before hyla's Triton kernels are imported; use 'torch' on CPU otherwise"
            )
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"{source}='triton' supports cuda and cpu tensors, got {device.type}")
    return choice


def implementation(family: str, backend: str) -> ModuleType:
    """The module `hyla.kernels.<family>.<backend>_chunk` with `forward` and `backward`."""
    return importlib.import_module(f"hyla.kernels.{family}.{backend}_chunk")


def chunk_implementation(family: str, backend: str) -> Spanned:
    """A chunk op family's implementation, run over bounded spans of long inputs."""
    return Spanned(implementation(family, backend))
