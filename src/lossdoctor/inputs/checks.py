"""Checks shared by the frozen dataclasses of configs and profiles, run on construction."""

from __future__ import annotations

import math

from .errors import InputError

# a sampling seed must fit the int64 a torch.Generator holds
MAX_SEED = 2**63 - 1


def as_member(enum, value, what: str):
    """``value`` as a member of ``enum``; an unknown name is an :class:`InputError` listing them."""
    try:
        return enum(value)
    except ValueError:
        names = ", ".join(m.value for m in enum)
        raise InputError(f"{what} {value!r} is unknown; use one of {names}") from None


def check_range(value, what: str, low: float, high: float = math.inf, *, open_low=False) -> None:
    """``low <= value <= high`` (``low < value`` with ``open_low``); NaN is refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise InputError(f"{what} must be a number, found {value!r}")
    below = value <= low if open_low else value < low
    if below or value > high:
        bound = f"{'>' if open_low else '>='} {low:g}"
        if high < math.inf:
            bound += f" and <= {high:g}"
        raise InputError(f"{what} must be {bound}, found {value!r}")


def check_fraction(value, what: str) -> None:
    """A fraction in (0, 1]."""
    check_range(value, what, 0.0, 1.0, open_low=True)


def check_unit(value, what: str) -> None:
    """A probability or IoU threshold in [0, 1]."""
    check_range(value, what, 0.0, 1.0)


def check_count(value, what: str) -> None:
    """A positive integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{what} must be a positive integer, found {value!r}")


def check_seed(value, what: str) -> None:
    """A sampling seed: an integer in [0, MAX_SEED]."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise InputError(f"{what} must be an integer in [0, {MAX_SEED}], found {value!r}")
