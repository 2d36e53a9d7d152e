"""The GN direction: ``Δ ≈ argmin_Δ gᵀΔ + ½ Δᵀ(G + δI)Δ``, warm-started.

One piece shared by :func:`gnopt.gauss_newton` and :func:`gnopt.fuse`
(PI-Muon): :class:`GNDirection` (solver + curvature + warm start, an equinox
module) and its transform :func:`scale_by_gauss_newton`, the first link of the
``gauss_newton`` chain (Abreu et al. 2025, §3; Martens 2010).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from gnopt._checks import check_number
from gnopt.curvature import AbstractCurvature
from gnopt.solvers import AbstractSolver, working_precision


def require_batch(name: str, params, batch):
    if params is None:
        raise ValueError(f"{name}.update needs params")
    if batch is None:
        raise ValueError(f"{name}.update needs the keyword argument batch=(inputs, targets)")


class GNDirection(eqx.Module):
    """Solver + curvature of one outer step, with the warm-start rule.

    ``direction(params, batch, x0, δ)`` is ``(Δ, stats, None)``: the
    solver's approximate minimiser of the damped GN model of ``curvature`` at
    ``params`` on ``batch``, started from ``x0``; with ``with_gradient=True``
    the last entry is the loss gradient ``g`` of the same linearisation
    (:meth:`gnopt.solvers.AbstractSolver.solve_with_gradient`).

    Attributes:
      apply_fn, loss_fn: the model and the loss (static).
      solver: an :class:`gnopt.solvers.AbstractSolver`.
      curvature: an :class:`gnopt.curvature.AbstractCurvature`.
      warm_start: factor on the last solution used as the next ``x0``
        (a number, may be traced).
    """

    apply_fn: Callable = eqx.field(static=True)
    loss_fn: Callable = eqx.field(static=True)
    solver: AbstractSolver
    curvature: AbstractCurvature
    warm_start: Any = 1.0

    def __check_init__(self):
        if not isinstance(self.solver, AbstractSolver):
            raise TypeError(f"solver must be a gnopt solver, got {type(self.solver).__name__}")
        if not isinstance(self.curvature, AbstractCurvature):
            raise TypeError("curvature must be a gnopt.curvature.AbstractCurvature (full(), "
                            f"layerwise(), ...), got {type(self.curvature).__name__}")

    def initial_start(self, params):
        """``x0`` of the first solve: zeros in working precision (at least float32)."""
        return working_precision(otu.tree_zeros_like(params))

    def __call__(self, params, batch, x0, damping, *, with_gradient: bool = False):
        args = (self.apply_fn, self.loss_fn, self.curvature, params, batch, x0, damping)
        if with_gradient:
            return self.solver.solve_with_gradient(*args)
        return (*self.solver.solve(*args), None)

    def next_start(self, delta, keep=True):
        """``x0`` of the next solve: ``warm_start · Δ``, or zeros where ``Δ`` is
        non-finite or ``keep`` is false (a rejected step is not retried from
        its own direction)."""
        keep = keep & jnp.isfinite(otu.tree_norm(delta))
        return working_precision(jax.tree.map(lambda x: jnp.where(keep, self.warm_start * x, 0.0),
                                              delta))


class GNDirectionState(NamedTuple):
    """State of :func:`scale_by_gauss_newton`."""

    warm_start: Any  # the last solution × the warm-start factor (next x0 if that step was kept)
    diagnostics: dict  # the solver's scalars of the last solve


def scale_by_gauss_newton(
    apply_fn: Callable,
    loss_fn: Callable,
    *,
    solver: AbstractSolver,
    curvature: AbstractCurvature,
    damping: Any = 0.0,
    warm_start: Any = 1.0,
) -> optax.GradientTransformationExtraArgs:
    """Replaces the incoming updates by the GN direction ``Δ`` (not negated: a descent step).

    ``update(updates, state, params, *, batch, damping=None, accepted=None)``:
    ``g`` and ``G`` come from one linearisation at ``params`` on ``batch``
    (the incoming gradients are not used); the keyword ``damping`` (a
    controller's output, given by :func:`accept_step`) overrides the fixed
    ``damping``; ``accepted=False`` (the verdict on the previous step, also
    given by :func:`accept_step`) starts the solve from zero instead of the
    warm start. Other keyword arguments are ignored.

    Args:
      apply_fn, loss_fn: model and loss (static).
      solver, curvature: see :class:`GNDirection`.
      damping: ``δ ≥ 0`` when no controller gives one.
      warm_start: factor on the last solution used as the next initial ``Δ``.
    """
    direction = GNDirection(apply_fn, loss_fn, solver, curvature, warm_start)
    check_number("scale_by_gauss_newton", "damping", damping, low=0.0)

    def init_fn(params):
        stats = {name: jnp.zeros((), jnp.float32) for name in solver.stat_names}
        return GNDirectionState(direction.initial_start(params), stats)

    def update_fn(updates, state, params=None, *, batch=None, accepted=None, **extra):
        del updates
        require_batch("gauss_newton", params, batch)
        delta_now = damping if extra.get("damping") is None else extra["damping"]
        x0 = state.warm_start
        if accepted is not None:
            x0 = jax.tree.map(lambda x: jnp.where(accepted, x, 0.0), x0)
        delta, stats, _ = direction(params, batch, x0, delta_now)
        stats = {k: jnp.asarray(stats[k], jnp.float32) for k in state.diagnostics}
        return delta, GNDirectionState(direction.next_start(delta), stats)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
