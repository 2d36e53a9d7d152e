"""Curvatures beyond the GGN, each one small class on :class:`AbstractOperator`.

* :class:`EmpiricalFisher`: ``F = (1/n) Σ_i g_i g_iᵀ`` from per-example
  gradients ``g_i = ∇_θ ℓ(f(θ, x_i), y_i)`` (each example's own mean loss).
  PSD, rank ≤ n; ``mv`` costs two contractions with the stored gradients.
  Block-diagonal with :func:`gnopt.curvature.block_diagonal` (or
  ``empirical_fisher(blocks=...)``) as for any operator.
"""

from __future__ import annotations

from typing import Any, Callable

import equinox as eqx
import jax
import jax.numpy as jnp

from gnopt.curvature.ggn import AbstractCurvature, AbstractOperator, block_diagonal


class EmpiricalFisher(AbstractOperator):
    """``F v = (1/n) Σ_i g_i (g_iᵀ v)``; ``gradient()`` is the mean of the ``g_i``."""

    params: Any
    per_example: Any  # pytree like params, every leaf with a leading axis n
    losses: jax.Array  # [n]

    def __init__(self, apply_fn: Callable, loss_fn: Callable, params, batch):
        inputs, targets = batch

        def value_and_grad(x, y):  # of one example's loss (a batch of one)
            return jax.value_and_grad(lambda p: loss_fn(
                apply_fn(p, x[None]), jax.tree.map(lambda t: t[None], y)))(params)

        self.params = params
        self.losses, self.per_example = jax.vmap(value_and_grad)(inputs, targets)

    def _coefficients(self, v):  # [n]: g_iᵀ v
        return sum(jnp.tensordot(g, x.astype(g.dtype), axes=x.ndim)
                   for g, x in zip(jax.tree.leaves(self.per_example), jax.tree.leaves(v)))

    def mv(self, v):
        c = self._coefficients(v) / self.losses.shape[0]
        return jax.tree.map(lambda g, x: jnp.tensordot(c, g, axes=1).astype(x.dtype),
                            self.per_example, self.params)

    def gradient(self):
        return jax.tree.map(lambda g: jnp.mean(g, axis=0), self.per_example)

    def loss(self):
        return jnp.mean(self.losses)


class EmpiricalFisherCurvature(AbstractCurvature):
    """Gauss-Newton steps with the empirical Fisher in place of the GGN."""

    blocks: Callable[[Any], Any] | None = eqx.field(static=True, default=None)

    def block_fn(self):
        return self.blocks

    def linearise(self, apply_fn, loss_fn, params, batch) -> AbstractOperator:
        return block_diagonal(EmpiricalFisher(apply_fn, loss_fn, params, batch), self.blocks)


def empirical_fisher(blocks: Callable[[Any], Any] | None = None) -> EmpiricalFisherCurvature:
    """The empirical Fisher (block-diagonal by ``blocks(params)`` when given)."""
    return EmpiricalFisherCurvature(blocks)
