"""First-order baselines (AdamW, Lion) and their learning-rate schedules.

Thin aliases around optax so every baseline is built the same way; learning
rates are floats or schedules (``step -> lr``), e.g. :func:`warmup_cosine`.

References:
  Loshchilov & Hutter, *Decoupled weight decay regularization*, ICLR 2019.
  Chen et al., *Symbolic discovery of optimization algorithms* (Lion), 2023,
  arXiv:2302.06675.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from gnopt._checks import check_int, check_learning_rate, check_number


def _warmup_factor(step, warmup_steps: int):
    """Linear warm-up ``min(1, (t + 1)/W)``: the first step is already non-zero."""
    if warmup_steps <= 0:
        return 1.0
    return jnp.minimum(1.0, (step + 1) / warmup_steps)


def _check(name: str, peak: float, warmup_steps: int):
    check_number(name, "learning rate", peak, low=0.0)
    check_int(name, "warmup_steps", warmup_steps, low=0)


def _check_adam_like(name: str, learning_rate, b1, b2, weight_decay, eps=0.0):
    check_learning_rate(name, "learning_rate", learning_rate)
    check_number(name, "b1", b1, low=0.0, high=1.0)
    check_number(name, "b2", b2, low=0.0, high=1.0)
    check_number(name, "weight_decay", weight_decay, low=0.0)
    check_number(name, "eps", eps, low=0.0)


def constant(lr: float, warmup_steps: int = 0) -> optax.Schedule:
    """``lr · min(1, (t + 1)/warmup_steps)``: linear warm-up, then constant."""
    _check("constant", lr, warmup_steps)
    return lambda step: lr * _warmup_factor(step, warmup_steps)


def warmup_cosine(peak: float, total_steps: int, warmup_steps: int = 0,
                  final_fraction: float = 0.1) -> optax.Schedule:
    """Linear warm-up to ``peak``, then cosine decay to ``final_fraction · peak``.

    For ``t ≥ W``: ``lr = peak (f + (1 − f) · ½ (1 + cos(π p)))`` with
    ``p = min(1, (t − W)/(T − W))``, ``T = total_steps``, ``W = warmup_steps``.
    """
    _check("warmup_cosine", peak, warmup_steps)
    if total_steps <= warmup_steps:
        raise ValueError(
            f"warmup_cosine: total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps})")
    if not 0.0 <= final_fraction <= 1.0:
        raise ValueError(f"warmup_cosine: final_fraction must be in [0, 1], got {final_fraction}")

    def schedule(step):
        progress = jnp.clip((step - warmup_steps) / (total_steps - warmup_steps), 0.0, 1.0)
        cosine = final_fraction + (1 - final_fraction) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
        return peak * _warmup_factor(step, warmup_steps) * cosine

    return schedule


def ramp(peak: float, warmup_steps: int = 0, decay_steps: int | None = None) -> optax.Schedule:
    """The benchmarks' schedule: a linear warm-up over ``warmup_steps``, then
    constant (``decay_steps=None``: :func:`constant`) or a cosine to ``0.1 · peak``
    at step ``decay_steps`` and constant after (:func:`warmup_cosine`)."""
    if decay_steps is None:
        return constant(peak, warmup_steps)
    return warmup_cosine(peak, decay_steps, warmup_steps)


def adamw(learning_rate: optax.ScalarOrSchedule, *, b1: float = 0.9, b2: float = 0.95,
          eps: float = 1e-8, weight_decay: float = 0.1,
          mask=None) -> optax.GradientTransformationExtraArgs:
    """AdamW (``optax.adamw``); ``mask`` chooses the leaves that decay."""
    _check_adam_like("adamw", learning_rate, b1, b2, weight_decay, eps)
    return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                       mask=mask)


def lion(learning_rate: optax.ScalarOrSchedule, *, b1: float = 0.9, b2: float = 0.99,
         weight_decay: float = 0.1, mask=None) -> optax.GradientTransformationExtraArgs:
    """Lion (``optax.lion``): ``−η (sign(β₁ m + (1 − β₁) g) + λ θ)``."""
    _check_adam_like("lion", learning_rate, b1, b2, weight_decay)
    return optax.lion(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay, mask=mask)
