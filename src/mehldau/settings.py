"""Strict settings: a config group becomes its dataclass only if every key is a field of it,
every value has the field's type, and the dataclass's own range checks pass; otherwise one
line names the key (`train.lr must be a number, got 'abc'`).

Hydra's structured configs (dataclasses in its ConfigStore) would type-check at compose time,
but our groups are chosen per branch (a model preset is a Music Transformer's, Moonbeam's or
a VQ-VAE's), and Hydra reports a type error as a multi-line trace. So the composed config
stays a plain DictConfig, struct mode refuses unknown keys at compose time (`cli.common`), and
each group is checked here against the dataclass that will use it
(`mehldau.recipes.run.check_settings`, before the recipe reads any data).
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

from mehldau.errors import UserError

T = TypeVar("T")


def _plain(value: Any) -> Any:
    if isinstance(value, DictConfig) or OmegaConf.is_list(value):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _matches(kind: Any, value: Any) -> bool:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(a, value) for a in args)
    if kind is type(None):
        return value is None
    if kind is Any:
        return True
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, str)
    if origin in (list, tuple) or kind in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        inner = [a for a in args if a is not Ellipsis]
        return all(any(_matches(a, v) for a in inner) for v in value) if inner else True
    if origin is dict or kind is dict:
        return isinstance(value, dict)
    return True  # anything more elaborate is the dataclass's own business


def _describe(kind: Any) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        names = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    return {bool: "true or false", int: "a whole number", float: "a number",
            str: "a string"}.get(kind, "a list" if origin in (list, tuple) else str(kind))


def checked(cls: type[T], values: Mapping[str, Any], where: str, **given: Any) -> T:
    """`cls(**values, **given)` once every key of `values` is a field of `cls` of the right
    type; a bad key, type or value is a `UserError` naming `where.key`."""
    assert is_dataclass(cls)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    plain = {k: _plain(v) for k, v in values.items()}
    for key, value in plain.items():
        name = f"{where}.{key}" if where else key
        if key not in names:
            raise UserError(f"unknown option '{name}'; known: {', '.join(sorted(names))}")
        if not _matches(hints[key], value):
            raise UserError(f"{name} must be {_describe(hints[key])}, got {value!r}")
    try:
        return cls(**plain, **given)
    except (ValueError, TypeError) as e:
        message = str(e)
        raise UserError(message if not where or message.startswith(where)
                        else f"{where}.{message}") from e
