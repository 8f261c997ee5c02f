"""Dataclass configs <-> plain dicts, YAML files and dotlist overrides.

A config is a tree of ``@dataclass(kw_only=True, slots=True)`` classes. ``build(cls, raw, path)``
turns a raw dict (from YAML, after overrides) into that tree, naming the dotted path of any unknown
key or wrong type; a class with its own ``from_dict`` (the data config) builds itself. Validation of
values lives in each dataclass's ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

import yaml

from data_pipeline.config import load_yaml_mapping
from data_pipeline.errors import ConfigError


load_yaml = load_yaml_mapping  # one YAML reader for run and data configs


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Applies ``a.b.c=value`` overrides in place; values parse as YAML scalars/lists (``3e-4``, ``[1,2]``)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: expected KEY.PATH=VALUE (for example optim.lr=3e-4)")
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError:
            value = text
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return raw


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}={value!r}: has the wrong type")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{path}={value!r}: must be one of {', '.join(map(repr, allowed))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        _, val_tp = typing.get_args(tp)
        return {str(k): _coerce(val_tp, v, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp is float and isinstance(value, str):
        try:
            value = float(value)  # YAML 1.1 reads "3e-4" as a string
        except ValueError:
            pass
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{path}={value!r}: expected {_type_name(tp)}")
    if tp is float and not math.isfinite(value):
        raise ConfigError(f"{path}={value!r}: must be a finite number")
    return value


def build(cls: type, raw: Any, path: str = "") -> Any:
    """Builds dataclass ``cls`` from ``raw``; errors name the dotted path of the offending key."""
    if hasattr(cls, "from_dict"):
        if raw is not None and not isinstance(raw, dict):
            raise ConfigError(f"{path or cls.__name__}: expected a mapping")
        return cls.from_dict(raw or {})
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(
            f"unknown config key {where}{unknown[0]} (known keys: {', '.join(sorted(fields))})"
        )
    required = [name for name, f in fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in raw]
    if missing:
        where = f"{path}." if path else ""
        raise ConfigError(f"missing required key{'s' if len(missing) > 1 else ''} "
                          f"{', '.join(where + m for m in missing)}")
    kwargs = {name: _coerce(hints[name], raw[name], f"{path}.{name}" if path else name) for name in raw}
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        prefix = f"{path}." if path and not str(exc).startswith(path) else ""
        raise ConfigError(f"{prefix}{exc}") from None
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{path or cls.__name__}: {exc}") from None


def to_dict(obj: Any) -> Any:
    """The plain-dict form of a config tree (what YAML files, checkpoints and run dirs store)."""
    if hasattr(obj, "to_dict") and not isinstance(obj, dict):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False)
