"""``gauss_newton``: a Gauss-Newton outer step, an alias chained from small transforms.

One outer step at ``θ0`` on ``batch`` (Abreu et al. 2025, §3; Martens 2010):

1. ``Δ ≈ argmin_Δ q(Δ)``, ``q(Δ) = gᵀΔ + ½ Δᵀ(G + δI)Δ`` (full or layerwise
   ``G``), by the chosen solver, warm-started from the last solution;
2. ``α`` by a line search of ``L(θ0 + α·η·Δ)`` on the true loss of
   ``line_search_batch`` (default: the step's batch);
3. the update ``α·η·Δ`` (``η``: ``learning_rate``, a float or a schedule);
4. with a damping controller (Levenberg–Marquardt): the trust ratio
   ``ρ = (L(θ0) − L(θ0 + αηΔ)) / (q(0) − q(αηΔ))`` on ``batch``; the controller
   sets the next ``δ`` and decides whether the step is kept. A rejected step
   (the controller's verdict, a line search that found no decrease, a loss
   that rose, or a non-finite step) is not applied: the update is zero and
   the damping rises (Moré 1978; Nielsen 1999).

As a chain (the pieces are public and swappable)::

  accept_step(optax.chain(scale_by_gauss_newton(...),          # 1. Δ
                          optax.scale(η),                       # 3. η
                          scale_by_line_search(...)),           # 2. α
              apply_fn, loss_fn, controller=damping)            # 4. ρ, keep or reject

The incoming ``updates`` (gradients) are not used: ``g`` comes from the same
linearisation as ``G``. Put clipping *after* this transform to clip the step.

Numbers are data: ``learning_rate``, ``damping`` and ``warm_start`` (and the
fields of a line search or controller) may be traced, so they can be
hyperparameters of :func:`gnopt.hyperparams.inject_hyperparams` (changed
between jitted steps without a retrace) or ``jax.vmap``-ped over. The
functions and ``loss_chunk_size`` are static (:attr:`gauss_newton.static_args`).
"""

from __future__ import annotations

from typing import Callable

import optax

from gnopt._checks import check_int, check_learning_rate, check_number
from gnopt.control import AbstractController
from gnopt.curvature import AbstractCurvature, full
from gnopt.line_search import AbstractLineSearch
from gnopt.requirements import requires
from gnopt.solvers import AbstractSolver, cg
from gnopt.transforms.acceptance import accept_step
from gnopt.transforms.gn_direction import scale_by_gauss_newton
from gnopt.transforms.line_search_step import scale_by_line_search


def gauss_newton(
    apply_fn: Callable,
    loss_fn: Callable,
    *,
    solver: AbstractSolver | None = None,
    curvature: AbstractCurvature | None = None,
    line_search: AbstractLineSearch | None = None,
    learning_rate: float | optax.Schedule = 1.0,
    damping: float | AbstractController = 0.0,
    warm_start: float = 1.0,
    loss_chunk_size: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """A Gauss-Newton optimizer step (full, layerwise, CG, inner optimizer, prox-linear).

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs`` (static).
      loss_fn: ``loss_fn(outputs, targets) -> scalar`` (static).
      solver: :func:`gnopt.solvers.cg` (default) or
        :func:`gnopt.solvers.inner_optimizer` / :func:`gnopt.solvers.prox_linear`.
      curvature: :func:`gnopt.curvature.full` (default) or ``layerwise()``.
      line_search: e.g. :func:`gnopt.line_search.grid` (the paper's 5 points)
        or ``backtracking()``; ``None`` takes ``α = 1``.
      learning_rate: outer step size ``η`` (float or schedule of the step count).
      damping: ``δ``, the L2 proximal term on ``Δ`` (Tikhonov damping): a
        float ``≥ 0``, or an :class:`gnopt.control.AbstractController` such as
        :func:`gnopt.control.nielsen_damping` (Levenberg–Marquardt) or
        :func:`gnopt.control.damping_controller` (a smooth PI rule), driven by
        the trust ratio ``ρ`` of each step (one jvp and one forward per step),
        whose accept decision is honoured (step 4 above).
      warm_start: factor on the last solution used as the next initial ``Δ``
        (0 disables warm starts; Martens uses 0.95); after a rejected step
        (``α = 0``) the next solve starts from 0.
      loss_chunk_size: evaluate line-search losses over chunks of this many
        sequences (memory of one chunk: needed at paper-size batches, where
        one pass over the line-search batch's logits does not fit).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs
      ``params`` and ``batch=(inputs, targets)``, optionally
      ``line_search_batch``, and ignores other keyword arguments.

    Under ``inject_hyperparams``: ``optax.inject_hyperparams`` takes every
    callable argument for a schedule of the step count, ``apply_fn`` and
    ``loss_fn`` included; use :func:`gnopt.hyperparams.inject_hyperparams`,
    which keeps :attr:`gauss_newton.static_args` static::

      tx = inject_hyperparams(gnopt.gauss_newton)(apply_fn, loss_fn, learning_rate=0.5,
                                                  damping=1e-3)
      state.hyperparams["learning_rate"] = jnp.asarray(0.1, jnp.float32)  # no retrace

    or ``optax.inject_hyperparams(functools.partial(gnopt.gauss_newton,
    apply_fn, loss_fn))(learning_rate=0.5)``.
    """
    solver = cg() if solver is None else solver
    curvature = full() if curvature is None else curvature
    if not isinstance(solver, AbstractSolver):
        raise TypeError(f"gauss_newton: solver must be a gnopt solver, got {type(solver).__name__}")
    if not isinstance(curvature, AbstractCurvature):
        raise TypeError(f"gauss_newton: curvature must be a gnopt.curvature.AbstractCurvature (full(), layerwise(), ...), got {type(curvature).__name__}")
    adaptive = isinstance(damping, AbstractController)
    if not adaptive:
        check_number("gauss_newton", "damping", damping, low=0.0)
    check_learning_rate("gauss_newton", "learning_rate", learning_rate)
    check_number("gauss_newton", "warm_start", warm_start, low=0.0, high=1.0)
    if loss_chunk_size is not None:
        check_int("gauss_newton", "loss_chunk_size", loss_chunk_size, low=1)

    links = [scale_by_gauss_newton(apply_fn, loss_fn, solver=solver, curvature=curvature,
                                   damping=0.0 if adaptive else damping, warm_start=warm_start),
             optax.scale_by_schedule(learning_rate) if callable(learning_rate)
             else optax.scale(learning_rate)]
    if line_search is not None:
        links.append(scale_by_line_search(apply_fn, loss_fn, line_search,
                                          loss_chunk_size=loss_chunk_size))
    return accept_step(optax.chain(*links), apply_fn, loss_fn,
                       controller=damping if adaptive else None)


# Arguments that are not hyperparameters: functions and a count that fixes shapes
# (read by gnopt.hyperparams.inject_hyperparams).
gauss_newton.static_args = ("apply_fn", "loss_fn", "loss_chunk_size")
requires("apply_fn", "loss_fn", whole_batch=True, own_gradient=True)(gauss_newton)
