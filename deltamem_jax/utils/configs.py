"""Typed settings ↔ ``ml_collections`` configs: the schema is a frozen dataclass.

Entry points (train.py, eval.py, tools) take a ConfigDict from a config file and
the command line, resolve it **once** with :func:`from_config` into a frozen
dataclass tree, and pass only that on. The ConfigDict a config file starts from
is generated from the same dataclasses (:func:`to_config`), so every default has
exactly one home.

Resolution is strict: a field the schema does not know, or a value of the wrong
type, fails before any work with :class:`ConfigError` naming the dotted field.
No JAX here.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

import ml_collections
from ml_collections import config_dict

__all__ = ["ConfigError", "to_config", "from_config", "plain"]


class ConfigError(ValueError):
    """A config value that cannot work, named by its dotted field."""


def fail(field: str, message: str):
    raise ConfigError(f"config.{field}: {message}")


def plain(value: Any) -> Any:
    """A ConfigDict (or anything inside one) as plain dicts, lists and tuples."""
    if isinstance(value, (ml_collections.ConfigDict, Mapping)):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    return value


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _optional_inner(tp):
    """``X`` for ``X | None`` / ``Optional[X]``, else None."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def _placeholder_type(tp):
    inner = _optional_inner(tp) or tp
    origin = typing.get_origin(inner) or inner
    return {tuple: tuple, list: tuple, dict: dict}.get(origin, origin)


def to_config(obj: Any) -> ml_collections.ConfigDict:
    """A ConfigDict holding every field of the dataclass instance ``obj`` (recursively).

    ``None`` fields become typed placeholders, so the command line can still set them.
    """
    out = ml_collections.ConfigDict()
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        if not f.init:
            continue
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = to_config(value)
        elif value is None:
            out[f.name] = config_dict.placeholder(_placeholder_type(hints[f.name]))
        elif isinstance(value, list):
            out[f.name] = tuple(value)
        else:
            out[f.name] = value
    return out


def _check_type(value: Any, tp: Any, field: str) -> Any:
    """``value`` converted to ``tp`` where that is lossless, else a ConfigError."""
    inner = _optional_inner(tp)
    if inner is not None:
        return None if value is None else _check_type(value, inner, field)
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            fail(field, f"must be a section (a mapping), got {value!r}")
        return _build(tp, value, field)
    if origin in (tuple, list) or tp in (tuple, list):
        if isinstance(value, str) or not isinstance(value, (tuple, list)):
            fail(field, f"must be a sequence, got {type(value).__name__} {value!r}")
        args = typing.get_args(tp)
        if args and args[-1] is Ellipsis:
            return tuple(_check_type(v, args[0], f"{field}[{i}]") for i, v in enumerate(value))
        if args:
            if len(args) != len(value):
                fail(field, f"must have {len(args)} entries, got {len(value)}: {value!r}")
            return tuple(_check_type(v, a, f"{field}[{i}]") for i, (a, v) in
                         enumerate(zip(args, value)))
        return tuple(value)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _check_type(value, option, field)
            except ConfigError:
                continue
        fail(field, f"{value!r} is none of {tp}")
    if tp is bool:
        if not isinstance(value, bool):
            fail(field, f"must be a bool, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail(field, f"must be an int, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(field, f"must be a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            fail(field, f"must be a string, got {type(value).__name__} {value!r}")
        return value
    return value


def _init_values(obj) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}


def _build(cls, values: Mapping, prefix: str):
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    values = plain(values)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        fail(f"{where}{unknown[0]}", f"unknown field (known: {sorted(fields)})")
    kwargs = {}
    for name, value in values.items():
        default = fields[name].default
        if dataclasses.is_dataclass(default) and isinstance(value, Mapping):
            # a partial section keeps the parent's default for the fields it does not set
            value = {**_init_values(default), **value}
        kwargs[name] = _check_type(value, hints[name], f"{prefix}.{name}" if prefix else name)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        fail(prefix or cls.__name__, str(e))


def from_config(cls, config: Mapping | ml_collections.ConfigDict, prefix: str = ""):
    """Resolve ``config`` into the frozen dataclass ``cls`` (nested sections included).

    Missing fields take the dataclass defaults; unknown or ill-typed ones raise
    :class:`ConfigError` naming ``config.<prefix>.<field>``.
    """
    return _build(cls, config, prefix)
