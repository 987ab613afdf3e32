"""Build frozen dataclasses from TOML tables, and write them back.

Configs and profiles are plain data; this is the one place that turns a TOML document into
those dataclasses, so both share the same checks and error messages.
"""

from __future__ import annotations

import dataclasses
import enum
import tomllib
import types
import typing
from pathlib import Path

from .errors import InputError
from .files import read_text


def read_toml(path: str | Path) -> dict:
    """Parse a TOML file; a missing or malformed file is an :class:`InputError`."""
    text = read_text(path, "TOML file")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{path} is not valid TOML: {e}; fix the file") from None


def from_table(cls, data: dict, makers: dict, default_base: str, where: str, name: str):
    """Build ``cls`` from a table whose keys override the built-in its ``base`` names (tables
    merge key by key); ``name`` names it where the table does not."""
    data = dict(data)
    base = data.pop("base", default_base)
    if not isinstance(base, str) or base not in makers:
        choices = ", ".join(makers)
        raise InputError(f"{where}: base {base!r} is not a built-in; use one of {choices}")
    merged = to_dict(makers[base]())
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    if "name" not in data:
        merged["name"] = name
    return from_dict(cls, merged, where)


def load_named(cls, spec: str | Path, makers: dict, default_base: str, what: str):
    """A built-in by name (``makers[name]()``), or a TOML file whose keys override the built-in
    its ``base`` names. Without a ``name`` key the result is named after the file."""
    spec = str(spec)
    if spec in makers:
        return makers[spec]()
    if not spec.endswith(".toml"):
        raise InputError(f"unknown {what} {spec!r}; use one of {', '.join(makers)} or a .toml file")
    data = read_toml(spec)
    return from_table(
        cls, data, makers, default_base, Path(spec).name, data.get("name", Path(spec).stem)
    )


# scalar type -> (does a TOML value fit it, what the error says was expected)
SCALARS = {
    float: (lambda v: not isinstance(v, bool) and isinstance(v, (int, float)), "a number"),
    int: (lambda v: not isinstance(v, bool) and isinstance(v, int), "an integer"),
    bool: (lambda v: isinstance(v, bool), "true or false"),
    str: (lambda v: isinstance(v, str), "a string"),
}


def _coerce_tuple(value, tp, where: str) -> tuple:
    args = typing.get_args(tp)
    if not isinstance(value, (list, tuple)):
        raise InputError(f"{where}: expected a list, found {value!r}")
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if len(args) != len(value):
        raise InputError(f"{where}: expected {len(args)} values, found {len(value)}")
    return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))


def _coerce(value, tp, where: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise InputError(f"{where}: expected a table, found {value!r}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(value, args[0], where)
    if origin is tuple:
        return _coerce_tuple(value, tp, where)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if not isinstance(value, str):
            names = ", ".join(m.value for m in tp)
            raise InputError(f"{where}: expected one of {names}, found {value!r}")
        return value  # the dataclass turns it into a member and names the choices if it is none
    if tp in SCALARS:
        fits, what = SCALARS[tp]
        if not fits(value):
            raise InputError(f"{where}: expected {what}, found {value!r}")
        return float(value) if tp is float else value
    return value


def from_dict(cls, data: dict, where: str = ""):
    """Build dataclass ``cls`` from ``data``; missing keys keep their defaults.

    Unknown keys are refused, so a typo never silently falls back to a default.
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise InputError(
            f"{where or cls.__name__}: unknown key {unknown[0]!r}; "
            f"known keys: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, InputError) as e:
        raise InputError(f"{where or cls.__name__}: {e}") from None


def to_dict(obj) -> dict:
    """Dataclass → plain dict of TOML-compatible values (None values are dropped)."""
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if v is None:
            continue
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, tuple):
            v = [list(x) if isinstance(x, tuple) else x for x in v]
        elif isinstance(v, enum.Enum):
            v = v.value
        out[f.name] = v
    return out


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return (
            repr(v)
            if v == v and v not in (float("inf"), float("-inf"))
            else ("nan" if v != v else ("inf" if v > 0 else "-inf"))
        )
    if isinstance(v, (int,)):
        return str(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dumps_toml(data: dict) -> str:
    """A dict of scalars, lists and sub-tables (nested ones too) → TOML text."""
    return "\n\n".join(_toml_tables(data, "")) + "\n"


def _toml_tables(data: dict, name: str) -> list[str]:
    """The table ``name`` (its scalars under a ``[name]`` header), then its sub-tables."""
    top = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    head = [f"[{name}]"] if name else []
    parts = ["\n".join(head + top)] if top or (name and not data) else []
    for k, v in data.items():
        if isinstance(v, dict):
            parts += _toml_tables(v, f"{name}.{k}" if name else k)
    return parts
