"""The solver interface: approximately minimise the GN model ``q`` of one outer step."""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp

from gnopt.curvature import AbstractCurvature, LinearisedModel


class AbstractSolver(eqx.Module):
    """Approximately solves ``min_Δ g_kᵀΔ_k + ½ Δ_kᵀ(G_kk + δI)Δ_k`` per block ``k``.

    Concrete solvers are final classes; each is usable wherever another is.
    """

    stat_names: ClassVar[tuple[str, ...]] = ()  # scalar entries of ``stats``

    @abc.abstractmethod
    def solve(self, apply_fn, loss_fn, curvature: AbstractCurvature, params, batch,
              delta0, damping) -> tuple[Any, dict]:
        """Returns ``(Δ, stats)``.

        Args:
          apply_fn, loss_fn: the model and the loss.
          curvature: full or layerwise GGN.
          params: the anchor ``θ0``.
          batch: ``(inputs, targets)`` of the outer step.
          delta0: warm start (a pytree like ``params``).
          damping: ``δ ≥ 0`` (a scalar, possibly traced).

        ``stats`` maps names to arrays of fixed shape (scalars are logged).
        """

    def solve_with_gradient(self, apply_fn, loss_fn, curvature: AbstractCurvature, params,
                            batch, delta0, damping) -> tuple[Any, dict, Any]:
        """``(Δ, stats, g)``: :meth:`solve` plus the loss gradient ``g = Jᵀ∇_zℓ`` at
        ``params`` on ``batch``.

        This default linearises the whole batch once more; solvers that compute
        ``g`` anyway override it to share the work.
        """
        delta, stats = self.solve(apply_fn, loss_fn, curvature, params, batch, delta0, damping)
        return delta, stats, LinearisedModel(apply_fn, loss_fn, params, batch).gradient()


def working_precision(tree):
    """Leaves in at least float32: solver iterates and warm starts of bf16 models.

    (CG recurrences in bf16 lose conjugacy at once.)
    """
    return jax.tree.map(lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32)), tree)
