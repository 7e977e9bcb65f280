"""Config values against the schema's type annotations, before any dataclass is built.

hydra hands over whatever the command line said: `data.shuffle=maybe` arrives as the string
"maybe", `model.vocab_size=300.5` as a float. Each value must match its field's annotation:
booleans are only true or false, integers are not floats (nor booleans), every float is a
finite number, and lists hold values of their element type.
"""

from __future__ import annotations

import math
import types
import typing
from typing import Any


def _describe(tp: Any) -> str:
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a finite number"
    if tp is str:
        return "a string"
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        return f"a list of {_describe(item).removeprefix('a ').removeprefix('an ')}s"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(tp))
    raise TypeError(f"no config check for the annotation {tp!r}")


def matches(value: Any, tp: Any) -> bool:
    """Whether `value` is a valid config value of the annotation `tp`."""
    if tp is bool:
        return type(value) is bool
    if tp is int:
        return type(value) is int
    if tp is float:
        return type(value) in (int, float) and math.isfinite(value)
    if tp is str:
        return type(value) is str
    if tp is type(None):
        return value is None
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, (list, tuple)) and all(matches(v, item) for v in value)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, arg) for arg in typing.get_args(tp))
    raise TypeError(f"no config check for the annotation {tp!r}")


def check_types(section: str, cls: type, values: dict[str, Any]) -> None:
    """ValueError naming `section.key`, the value and the type allowed, for the first value
    of `values` that does not match its field of the dataclass `cls`."""
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        if name in hints and not matches(value, hints[name]):
            raise ValueError(f"{section}.{name} must be {_describe(hints[name])}, got {value!r}")
