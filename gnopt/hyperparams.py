"""``inject_hyperparams`` for builders that take functions: optax's, with the
builder's functions and counts kept static.

``optax.inject_hyperparams(builder)(*args, **kwargs)`` sorts the arguments by
value: a bool, or a name in ``static_args``, is passed through unchanged; any
other callable is taken for a *schedule* of the step count (``f(count)``); an
int, float or array becomes a hyperparameter in ``state.hyperparams`` (an
array, traced under ``jit``). So ``optax.inject_hyperparams(gnopt.gauss_newton)
(apply_fn, loss_fn, ...)`` calls ``apply_fn(count)`` and fails (``missing 1
required positional argument``): the model and the loss are callables but not
schedules, and optax has no way to tell them apart by value.

:func:`inject_hyperparams` is ``optax.inject_hyperparams`` with ``static_args``
filled in: the builder's own ``builder.static_args`` (gnopt's builders list
their functions and counts there, e.g. ``gauss_newton.static_args ==
("apply_fn", "loss_fn", "loss_chunk_size")``) and any parameter named
``apply_fn`` or ``loss_fn``, plus those you give. Every other number becomes a
hyperparameter, as with optax::

    tx = gnopt.inject_hyperparams(gnopt.gauss_newton)(
        apply_fn, loss_fn, learning_rate=0.5, damping=1e-3)
    state = tx.init(params)
    state.hyperparams["learning_rate"] = jnp.asarray(0.1, jnp.float32)  # no retrace

The same with optax alone: bind the functions first,
``optax.inject_hyperparams(functools.partial(gnopt.gauss_newton, apply_fn,
loss_fn))(learning_rate=0.5)``, or name them,
``optax.inject_hyperparams(gnopt.gauss_newton,
static_args=gnopt.gauss_newton.static_args)``.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Iterable

import optax

FUNCTION_NAMES = ("apply_fn", "loss_fn")


def static_args_of(inner_factory: Callable) -> tuple[str, ...]:
    """The parameters of ``inner_factory`` that :func:`inject_hyperparams` keeps
    static: those in its ``static_args`` attribute (of the wrapped function for a
    ``functools.partial``) and those named ``apply_fn`` or ``loss_fn``."""
    parameters = inspect.signature(inner_factory).parameters
    builder = inner_factory
    while isinstance(builder, functools.partial):
        builder = builder.func
    declared = tuple(getattr(builder, "static_args", ())) + FUNCTION_NAMES
    return tuple(dict.fromkeys(name for name in declared if name in parameters))


def inject_hyperparams(
    inner_factory: Callable[..., optax.GradientTransformation],
    static_args: str | Iterable[str] = (),
    hyperparam_dtype: Any = None,
) -> Callable[..., optax.GradientTransformationExtraArgs]:
    """``optax.inject_hyperparams`` with the builder's functions and counts static.

    Args:
      inner_factory: an optimizer builder (gnopt's or optax's).
      static_args: further parameters that are not hyperparameters (callables
        that are not schedules, counts that fix shapes).
      hyperparam_dtype: as in ``optax.inject_hyperparams``.

    Returns:
      The builder under ``optax.inject_hyperparams``: the numbers it is given
      (learning rates, damping, gains passed as floats) live in
      ``state.hyperparams`` and may be changed between jitted steps without a
      retrace, or given as schedules.
    """
    static_args = {static_args} if isinstance(static_args, str) else set(static_args)
    static_args |= set(static_args_of(inner_factory))
    return optax.inject_hyperparams(inner_factory, static_args=tuple(sorted(static_args)),
                                    hyperparam_dtype=hyperparam_dtype)
