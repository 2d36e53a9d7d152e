"""What an optimizer builder needs from the trainer, stated by the builder.

The trainer (:func:`gnopt.train.build_optimizer`) reads a builder's
:class:`Requirements` (``builder.requirements``, set with :func:`requires`)
instead of guessing from its signature::

    @gnopt.requires("apply_fn", "loss_fn", whole_batch=True, own_gradient=True)
    def my_second_order(apply_fn, loss_fn, learning_rate=1.0): ...

A builder that states nothing (``optax.adamw``, a user's first-order
transform) gets no arguments from the trainer (gin binds its own) and is a
first-order optimizer: gradient accumulation allowed, the gradient checked.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import optax

ARGUMENTS = ("apply_fn", "loss_fn", "total_steps")
"""What the trainer can give a builder: the model's ``apply_fn(params, inputs,
tap=None)`` (``tap``: :data:`gnopt.models.Tap`, for K-FAC), the training loss,
and the run's number of optimizer steps."""


class Requirements(NamedTuple):
    """What a builder needs from the trainer."""

    arguments: tuple[str, ...] = ()  # builder arguments the trainer fills, of ARGUMENTS
    whole_batch: bool = False  # the transform sees the whole batch (batch=...): no accumulation
    own_gradient: bool = False  # it computes its own gradient: the trainer's is not used


def requires(*arguments: str, whole_batch: bool = False,
             own_gradient: bool = False) -> Callable[[Callable], Callable]:
    """Decorator stating a builder's :class:`Requirements` (``builder.requirements``)."""
    unknown = sorted(set(arguments) - set(ARGUMENTS))
    if unknown:
        raise ValueError(f"requires: unknown argument(s) {unknown}; the trainer gives {list(ARGUMENTS)}")

    def declare(builder: Callable) -> Callable:
        builder.requirements = Requirements(tuple(arguments), whole_batch, own_gradient)
        return builder

    return declare


def requirements_of(optimizer) -> Requirements:
    """The stated requirements of a builder (of the function a ``functools.partial`` wraps);
    none for a built transform or a builder that states nothing."""
    if isinstance(optimizer, optax.GradientTransformation):
        return Requirements()
    while isinstance(optimizer, functools.partial):
        optimizer = optimizer.func
    return getattr(optimizer, "requirements", Requirements())
