"""Parameter counts and a one-line description of a model."""

from __future__ import annotations

import math

import equinox as eqx
import jax


def count_params(model) -> int:
    """Number of scalars in the array leaves of ``model``.

    Also accepts the output of ``eqx.filter_eval_shape`` (``ShapeDtypeStruct``
    leaves), so big models can be counted without allocating them.
    """
    leaves = jax.tree.leaves(model)
    return sum(math.prod(x.shape) for x in leaves
               if eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct))


def describe(model) -> str:
    """One line: the model's class, parameter count and config (if it has one)."""
    line = f"{type(model).__name__}: {count_params(model):,} parameters"
    config = getattr(model, "config", None)
    return line if config is None else f"{line}; {config}"
