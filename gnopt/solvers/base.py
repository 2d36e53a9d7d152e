"""The solver interface: approximately minimise the GN model ``q`` of one outer step."""

from __future__ import annotations

from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from gnopt.curvature import AbstractCurvature, AbstractOperator, LinearisedModel


class AbstractSolver(eqx.Module):
    """Approximately solves ``min_Δ g_kᵀΔ_k + ½ Δ_kᵀ(C_kk + δI)Δ_k`` per block ``k``.

    A solver's core is :meth:`minimise` ``(operator, gradient, Δ0, δ)``: it knows
    nothing of models, losses or batches. :meth:`solve` (what the transforms
    call) builds the operator with the curvature and calls it; solvers that
    stream micro-batches (the inner optimizer) override :meth:`solve`.
    Concrete solvers are final classes; each is usable wherever another is.
    """

    stat_names: ClassVar[tuple[str, ...]] = ()  # scalar entries of ``stats``

    def minimise(self, operator: AbstractOperator, gradient, delta0, damping) -> tuple[Any, dict]:
        """``(Δ, stats)``: approximately ``argmin gᵀΔ + ½ Δᵀ(C + δI)Δ``, per block of ``C``.

        Args:
          operator: ``C`` (:meth:`~gnopt.curvature.AbstractOperator.mv`, its blocks).
          gradient: ``g``.
          delta0: warm start (a pytree like ``g``).
          damping: ``δ ≥ 0`` (a scalar, possibly traced).
        """
        raise NotImplementedError(f"{type(self).__name__} defines neither minimise nor solve")

    def solve(self, apply_fn, loss_fn, curvature: AbstractCurvature, params, batch,
              delta0, damping) -> tuple[Any, dict]:
        """Returns ``(Δ, stats)``; by default :meth:`minimise` on the curvature's operator.

        Args:
          apply_fn, loss_fn: the model and the loss.
          curvature: full or layerwise GGN.
          params: the anchor ``θ0``.
          batch: ``(inputs, targets)`` of the outer step.
          delta0: warm start (a pytree like ``params``).
          damping: ``δ ≥ 0`` (a scalar, possibly traced).

        ``stats`` maps names to arrays of fixed shape (scalars are logged).
        """
        return self.solve_with_gradient(apply_fn, loss_fn, curvature, params, batch, delta0,
                                        damping)[:2]

    def solve_with_gradient(self, apply_fn, loss_fn, curvature: AbstractCurvature, params,
                            batch, delta0, damping) -> tuple[Any, dict, Any]:
        """``(Δ, stats, g)``: :meth:`solve` plus the loss gradient ``g = Jᵀ∇_zℓ`` at
        ``params`` on ``batch``.

        This default builds the operator once and takes ``g`` from it (a solver
        defining only :meth:`solve`: ``g`` from one more linearisation).
        """
        if type(self).minimise is AbstractSolver.minimise:
            if type(self).solve is AbstractSolver.solve:
                raise NotImplementedError(f"{type(self).__name__} defines neither minimise nor solve")
            delta, stats = self.solve(apply_fn, loss_fn, curvature, params, batch, delta0, damping)
            return delta, stats, LinearisedModel(apply_fn, loss_fn, params, batch).gradient()
        operator = curvature.linearise(apply_fn, loss_fn, params, batch)
        g = working_precision(operator.gradient())
        delta, stats = self.minimise(operator, g, otu.tree_cast_like(delta0, params), damping)
        return delta, stats, g


def working_precision(tree):
    """Leaves in at least float32: solver iterates and warm starts of bf16 models.

    (CG recurrences in bf16 lose conjugacy at once.)
    """
    return jax.tree.map(lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32)), tree)
