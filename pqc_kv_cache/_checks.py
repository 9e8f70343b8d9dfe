"""Argument checks shared by the public entry points: one rule for integers, one for durations.

An integer argument is a Python int or any integer type that implements
``__index__`` (numpy and torch integer scalars), converted to a plain int;
``bool`` (and numpy's bool, and a bool tensor) is refused although it is an int to Python, since
``True`` as a layer index or a count is always a mistake. A duration is a
real number of seconds, finite unless the caller allows infinity, never NaN.
Failures are TypeError (wrong kind) or ValueError (out of range), each naming
the argument.
"""

from __future__ import annotations

import math
import operator

__all__ = ["check_int", "check_seconds"]


def _is_bool(value: object) -> bool:
    if isinstance(value, bool):
        return True
    t = type(value)
    if t.__module__ == "numpy" and t.__name__ in ("bool", "bool_"):
        return True
    # a 0-d bool tensor or array has __index__ as well (torch.tensor(True) would pass as 1)
    return str(getattr(value, "dtype", "")) in ("bool", "torch.bool")


def check_int(name: str, value: object, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as a plain int in ``[lo, hi]`` (either bound may be None)."""
    if type(value) is not int:      # a plain int (never a bool: its type is bool) needs no conversion
        value = _as_int(name, value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        lo_s = "-inf" if lo is None else str(lo)
        hi_s = "inf" if hi is None else str(hi)
        raise ValueError(f"{name} must be in [{lo_s}, {hi_s}], got {value}")
    return value


def _as_int(name: str, value: object) -> int:
    if _is_bool(value):
        raise TypeError(f"{name} must be an integer, got a bool ({value!r})")
    if type(value) is not int:
        try:
            value = operator.index(value)
        except TypeError:
            raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None
    return value


def check_seconds(name: str, value: object, *, hi: float | None = None, allow_inf: bool = False) -> float:
    """``value`` as a positive float of seconds, at most ``hi``; infinity only if ``allow_inf``."""
    if _is_bool(value):
        raise TypeError(f"{name} must be a number of seconds, got a bool ({value!r})")
    if isinstance(value, (str, bytes, bytearray)):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    try:
        seconds = float(value)          # int, float, numpy scalars; OverflowError for a huge int
    except OverflowError:
        raise ValueError(f"{name} is too large: {value!r}") from None
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}") from None
    if math.isnan(seconds) or seconds <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    if math.isinf(seconds):
        if allow_inf:
            return seconds
        raise ValueError(f"{name} must be finite, got {value!r}")
    if hi is not None and seconds > hi:
        raise ValueError(f"{name} must be at most {hi:g} seconds, got {value!r}")
    return seconds
