"""``gauss_newton``: a Gauss-Newton outer step as an optax transformation.

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

The incoming ``updates`` (gradients) are not used: ``g`` comes from the same
linearisation as ``G``. Put clipping *after* this transform to clip the step.

Numbers are data: ``learning_rate``, ``damping`` and ``warm_start`` (and the
fields of a line search or controller) may be traced, so they can be
hyperparameters of :func:`gnopt.hyperparams.inject_hyperparams` (changed
between jitted steps without a retrace) or ``jax.vmap``-ped over. The
functions and ``loss_chunk_size`` are static (:attr:`gauss_newton.static_args`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from gnopt.control import AbstractController
from gnopt._checks import check_int, check_learning_rate, check_number
from gnopt.curvature import AbstractCurvature, full, trust_ratio
from gnopt.line_search import AbstractLineSearch
from gnopt.solvers import AbstractSolver, cg, split_microbatches, working_precision


class GaussNewtonState(NamedTuple):
    """State of :func:`gauss_newton`."""

    count: jax.Array  # outer steps taken
    warm_start: Any  # last solution Δ (times the warm-start factor)
    damping: Any  # damping controller's state (None for a fixed δ)
    diagnostics: dict  # scalars of the last step, logged by the trainer


def require_batch(name: str, params, batch):
    if params is None:
        raise ValueError(f"{name}.update needs params")
    if batch is None:
        raise ValueError(f"{name}.update needs the keyword argument batch=(inputs, targets)")


def tree_loss(apply_fn, loss_fn, params, batch, chunk_size: int | None = None):
    """``L(θ) = ℓ(f(θ, x), y)`` on a batch.

    With ``chunk_size``, the mean of the loss over strided chunks of that many
    sequences, one chunk in memory at a time (``lax.map``): the batch mean for
    a per-token mean loss with equal tokens per chunk.
    """
    def loss(chunk):
        inputs, targets = chunk
        return loss_fn(apply_fn(params, inputs), targets)

    if chunk_size is None:
        return loss(batch)
    _, chunks = split_microbatches(batch, chunk_size)
    return jnp.mean(jax.lax.map(loss, chunks))


def _learning_rate(learning_rate, count):
    return learning_rate(count) if callable(learning_rate) else learning_rate


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

    def loss_of(params, batch):
        return tree_loss(apply_fn, loss_fn, params, batch, loss_chunk_size)

    def init_fn(params):
        names = ("loss_before", "step_size", "update_norm", "accepted") + solver.stat_names
        names += line_search.stat_names if line_search is not None else ()
        names += ("damping", "rho") if adaptive else ()
        diag = {name: jnp.zeros((), jnp.float32) for name in names}
        return GaussNewtonState(jnp.zeros((), jnp.int32), working_precision(otu.tree_zeros_like(params)),
                                damping.init() if adaptive else None, diag)

    def update_fn(updates, state, params=None, *, batch=None, line_search_batch=None, **extra):
        del updates, extra
        require_batch("gauss_newton", params, batch)
        delta_now = state.damping.output if adaptive else damping
        delta, stats = solver.solve(apply_fn, loss_fn, curvature, params, batch,
                                    state.warm_start, delta_now)
        eta = _learning_rate(learning_rate, state.count)
        step = otu.tree_scale(eta, delta)
        ls_batch = batch if line_search_batch is None else line_search_batch
        loss0 = loss_of(params, ls_batch)
        if line_search is None:
            alpha, ls_stats = jnp.asarray(1.0), {}
        else:
            alpha, ls_stats = line_search.search(
                lambda a: loss_of(otu.tree_add_scale(params, a, step), ls_batch), loss0,
                lambda: otu.tree_vdot(jax.grad(loss_of)(params, ls_batch), step))
        step = otu.tree_scale(alpha, step)
        # a non-finite solve (e.g. a non-finite adaptive δ) is never applied
        accept = (alpha > 0) & jnp.isfinite(delta_now) & jnp.isfinite(otu.tree_norm(step))
        damping_state, diag = state.damping, {}
        if adaptive:
            measured = trust_ratio(apply_fn, loss_fn, params, batch, step)
            if damping.rejects:  # a step that raised the loss is rejected even if predicted
                accept = accept & (measured.actual >= 0)
            damping_state, accept = damping.update(state.damping, measured.rho, accept)
            diag = {"damping": delta_now, "rho": measured.rho}
        new_updates = otu.tree_cast_like(
            jax.tree.map(lambda x: jnp.where(accept, x, jnp.zeros_like(x)), step), params)
        diag |= {"loss_before": loss0, "step_size": jnp.where(accept, alpha * eta, 0.0),
                 "update_norm": otu.tree_norm(new_updates), "accepted": accept, **stats, **ls_stats}
        diag = {k: jnp.asarray(diag[k], jnp.float32) for k in state.diagnostics}
        # A rejected step must not be retried from its own direction.
        warm = jax.tree.map(lambda x: jnp.where(accept, warm_start * x, 0.0), delta)
        return new_updates, GaussNewtonState(state.count + 1, working_precision(warm), damping_state, diag)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# Arguments that are not hyperparameters: functions and a count that fixes shapes
# (read by gnopt.hyperparams.inject_hyperparams).
gauss_newton.static_args = ("apply_fn", "loss_fn", "loss_chunk_size")
