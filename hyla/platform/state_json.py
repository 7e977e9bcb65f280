"""Plain state as JSON: the codec of checkpoints' `shared` and `per_rank` state.

`to_jsonable` turns None, bool, int, float, str, lists, tuples, dicts and dense tensors into
plain JSON values, and `from_jsonable` inverts it exactly, so that loading state never
unpickles anything; `dumps_state` and `loads_state` do the same for a whole state dict as
JSON text.
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import torch

_TENSOR, _TUPLE, _DICT = "__tensor__", "__tuple__", "__dict__"
_TAGS = {_TENSOR, _TUPLE, _DICT}
_ALLOWED = "None, bool, int, float, str, list, tuple, dict and dense torch.Tensor"


def to_jsonable(obj: Any, where: str = "value") -> Any:
    """`obj` as plain JSON values; `from_jsonable` inverts it exactly.

    Tensors become {"__tensor__": {dtype, shape, data (base64 of the raw bytes)}}, tuples
    {"__tuple__": [...]}, and dicts whose keys are not all strings (or that use one of these
    tags as a key) {"__dict__": [[key, value], ...]}. Tensors come back contiguous, on the CPU.
    `where` names `obj` in errors.
    """
    if obj is None or type(obj) in (bool, int, float, str):
        return obj
    if isinstance(obj, torch.Tensor):
        return {_TENSOR: _tensor_fields(obj, where)}
    if type(obj) is tuple:
        return {_TUPLE: [to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if type(obj) is list:
        return [to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(type(k) is str for k in obj) and not _TAGS & obj.keys():
            return {k: to_jsonable(v, f"{where}[{k!r}]") for k, v in obj.items()}
        return {
            _DICT: [
                [to_jsonable(k, f"{where} key {k!r}"), to_jsonable(v, f"{where}[{k!r}]")]
                for k, v in obj.items()
            ]
        }
    raise ValueError(f"{where} has type {type(obj).__name__}; allowed: {_ALLOWED}")


def from_jsonable(obj: Any) -> Any:
    """The inverse of `to_jsonable`."""
    if isinstance(obj, list):
        return [from_jsonable(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1 and obj.keys() <= _TAGS:
        (tag, body), *_ = obj.items()
        if tag == _TENSOR:
            return _tensor_from_fields(body)
        if tag == _TUPLE:
            return tuple(from_jsonable(v) for v in body)
        return {from_jsonable(k): from_jsonable(v) for k, v in body}
    return {k: from_jsonable(v) for k, v in obj.items()}


def _tensor_fields(t: torch.Tensor, where: str) -> dict[str, Any]:
    if t.layout != torch.strided or t.is_quantized:
        raise ValueError(f"{where} is a {t.layout} tensor; allowed: dense (strided) tensors")
    flat = t.detach().cpu().contiguous().reshape(-1)
    data = flat.view(torch.uint8).numpy().tobytes()
    return {
        "dtype": str(t.dtype).removeprefix("torch."),
        "shape": list(t.shape),
        "data": base64.b64encode(data).decode("ascii"),
    }


def _tensor_from_fields(fields: dict[str, Any]) -> torch.Tensor:
    dtype = getattr(torch, fields["dtype"], None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown tensor dtype {fields['dtype']!r} in checkpoint JSON")
    shape = [int(n) for n in fields["shape"]]
    raw = base64.b64decode(fields["data"])
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(raw) != math.prod(shape) * itemsize:
        raise ValueError(
            f"tensor of shape {shape} and dtype {dtype} needs {math.prod(shape) * itemsize} "
            f"bytes, the checkpoint JSON holds {len(raw)}"
        )
    if not raw:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)


def dumps_state(obj: dict, where: str) -> str:
    """A state dict as JSON text (see `to_jsonable`); `where` names it in errors."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where} must be a dict, got {type(obj).__name__}")
    return json.dumps(to_jsonable(obj, where))


def loads_state(text: bytes | str) -> dict:
    """The inverse of `dumps_state`."""
    return from_jsonable(json.loads(text))
