"""Construction-time argument checks: one-line errors naming the builder, the
argument and the value."""

from __future__ import annotations

import math
import numbers

import jax
import numpy as np


def _fail(where: str, name: str, what: str, value) -> ValueError:
    return ValueError(f"{where}: {name} must be {what}, got {value!r} ({type(value).__name__})")


def check_number(where: str, name: str, value, *, low: float | None = None,
                 high: float | None = None, low_open: bool = False,
                 high_open: bool = False) -> float:
    """A finite real in ``[low, high]`` (open at an end with ``low_open`` / ``high_open``)."""
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        bounds.append(f"{'<' if high_open else '<='} {high:g}")
    what = "a finite number" + (" " + " and ".join(bounds) if bounds else "")
    if isinstance(value, jax.core.Tracer):
        return value  # traced (e.g. under optax.inject_hyperparams): checked by its caller
    if isinstance(value, (np.ndarray, jax.Array)) and value.shape == () and (
            np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _fail(where, name, what, value)
    x = float(value)
    if (not math.isfinite(x) or (low is not None and (x <= low if low_open else x < low))
            or (high is not None and (x >= high if high_open else x > high))):
        raise _fail(where, name, what, value)
    return x


def is_traced(*values) -> bool:
    """Whether any value is a tracer (e.g. under ``jax.vmap`` or a jitted
    ``optax.inject_hyperparams``): comparisons between such values cannot be
    checked at construction."""
    return any(isinstance(v, jax.core.Tracer) for v in values)


def check_int(where: str, name: str, value, *, low: int | None = None) -> int:
    """An integer ``≥ low``."""
    what = "an integer" + (f" >= {low}" if low is not None else "")
    if isinstance(value, jax.core.Tracer):
        return value
    if isinstance(value, (np.ndarray, jax.Array)) and value.shape == () and np.issubdtype(
            value.dtype, np.integer):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (
            low is not None and value < low):
        raise _fail(where, name, what, value)
    return int(value)


def check_learning_rate(where: str, name: str, value) -> None:
    """A finite number ``≥ 0``, or a schedule (a callable of the step count)."""
    if not callable(value):
        check_number(where, name, value, low=0.0)
