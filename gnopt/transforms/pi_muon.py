"""PI-Muon: Muon fused with layerwise Gauss-Newton, the weight set by a PI controller.

Our method (design: ``shared/design/algorithms.md`` §3). Per step at ``θ``:

1. ``u``: Muon's update (orthogonalised Nesterov momentum on hidden matrices,
   AdamW on the rest, times the learning rate) — :func:`gnopt.transforms.muon`;
2. ``s``: layerwise GN step, ``(G_kk + δI) s_k ≈ −g_k`` (CG by default,
   warm-started);
3. per leaf ``l`` (one weight matrix or vector), the orthogonal split
   ``s_l = c_l u_l + s⊥_l`` with ``c_l = ⟨s_l, u_l⟩ / ⟨u_l, u_l⟩``, ``⟨s⊥_l, u_l⟩ = 0``;
4. the fused update

   * ``parallel="muon"`` (§3 as written): ``Δ = u + λ s⊥``;
   * ``parallel="interpolate"`` (default, our refinement): the component along
     ``u`` also moves from Muon's to GN's, ``Δ = ((1 − λ) + λ c) u + λ s⊥ =
     (1 − λ) u + λ s``.

   Why the refinement: with ``u + λ s⊥`` the step's component along ``u`` is
   Muon's whatever ``λ`` is, so even where the GN model is exact (``ρ = 1``,
   ``λ → 1``) the step is not the GN step and PI-Muon cannot converge like GN on
   a quadratic (measured: tests/test_pi_muon.py). Both forms keep ``λ ≡ 0`` =
   Muon exactly and use the same orthogonal split;
5. the trust ratio ``ρ = (L(θ) − L(θ+Δ)) / (q(0) − q(Δ))`` on the step's batch
   (one jvp, one extra forward; :func:`gnopt.curvature.trust_ratio`), on
   ``line_search_batch`` when given — a fresh batch: ρ measured on the batch the
   step was built from is optimistic (measured: an accepted ρ = 0.75 on the
   step's own batch took the tiny LLaMA's validation loss from 3.6 to 10.2);
6. ``λ`` for the next step from a :class:`gnopt.control.PIController` on ``ρ``
   (no line search); optionally the GN damping ``δ`` from a second controller
   (a smooth Levenberg–Marquardt rule). A step the controller rejects
   (``ρ < reject_below``, or non-finite) falls back to Muon's ``u``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from gnopt.control import PIController, PIState, damping_controller, fusion_weight_controller
from gnopt.curvature import AbstractCurvature, layerwise, trust_ratio
from gnopt.solvers import AbstractSolver, cg, working_precision
from gnopt.transforms.gauss_newton import require_batch
from gnopt.transforms.muon import muon


class PIMuonState(NamedTuple):
    """State of :func:`pi_muon`."""

    muon: Any  # Muon's state (momentum, AdamW moments)
    gn_warm_start: Any  # last GN solution s
    fusion: PIState  # λ controller; ``fusion.output`` is the next λ
    damping: PIState | None  # δ controller's state (None for a fixed δ)
    diagnostics: dict  # λ, ρ, |s⊥|/|s|, solver stats of the last step


def split_along(s, u):
    """Per-leaf orthogonal split ``s = c u + s⊥``; returns ``(c, s⊥)``.

    ``c_l = ⟨s_l, u_l⟩/⟨u_l, u_l⟩`` (0 where ``u_l = 0``), ``⟨s⊥_l, u_l⟩ = 0``.
    """
    def one(sl, ul):
        su = jnp.vdot(sl, ul).real
        uu = jnp.vdot(ul, ul).real
        c = jnp.where(uu > 0, su / jnp.where(uu > 0, uu, 1.0), 0.0)
        return c, sl - c * ul

    pairs = jax.tree.map(one, s, u)
    outer = jax.tree.structure(s)
    c, perp = jax.tree.transpose(outer, jax.tree.structure((0, 0)), pairs)
    return c, perp


def pi_muon(
    apply_fn: Callable,
    loss_fn: Callable,
    learning_rate: optax.ScalarOrSchedule = 0.02,
    *,
    solver: AbstractSolver | None = None,
    curvature: AbstractCurvature | None = None,
    fusion: PIController | None = None,
    damping: float | PIController | None = None,
    parallel: str = "interpolate",
    gn_warm_start: float = 1.0,
    trust_batch_size: int | None = None,
    **muon_kwargs,
) -> optax.GradientTransformationExtraArgs:
    """PI-Muon (see the module docstring for the maths).

    Args:
      apply_fn, loss_fn: model and loss (static).
      learning_rate: Muon's ``η`` (float or schedule).
      solver: GN solver for ``s`` (default ``cg(max_iters=10)``).
      curvature: GGN of ``s`` (default :func:`gnopt.curvature.layerwise`).
      fusion: controller of ``λ`` (default
        ``fusion_weight_controller(reject_below=0.0)``: steps whose loss rose
        against the model's prediction fall back to Muon's step).
      damping: ``δ``, a float or a controller driven by the same ``ρ``
        (default :func:`gnopt.control.damping_controller`). Measured on the
        tiny LLaMA: a fixed ``δ = 1e-3`` without rejection diverges in the
        first steps (loss 5.5 → 1e8); the adaptive defaults train.
      parallel: ``"interpolate"`` (default) or ``"muon"`` (§3 as written).
      gn_warm_start: factor on the last ``s`` used to start the next solve.
      trust_batch_size: measure ``ρ`` on the first this many sequences of its
        batch (default: all; paper-size batches need a slice to fit in memory).
      **muon_kwargs: passed to :func:`gnopt.transforms.muon`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` takes the
      gradients, ``params``, ``batch=(inputs, targets)`` and optionally
      ``line_search_batch`` (a fresh batch on which ``ρ`` is measured).
    """
    if parallel not in ("interpolate", "muon"):
        raise ValueError(f"pi_muon: parallel must be 'interpolate' or 'muon', got {parallel!r}")
    solver = cg(max_iters=10) if solver is None else solver
    curvature = layerwise() if curvature is None else curvature
    fusion = fusion_weight_controller(reject_below=0.0) if fusion is None else fusion
    damping = damping_controller() if damping is None else damping
    adaptive = isinstance(damping, PIController)
    base = muon(learning_rate, **muon_kwargs)
    stat_names = ("lambda", "rho", "perp_ratio", "damping", "accepted", "actual_decrease",
                  "predicted_decrease") + solver.stat_names

    def init_fn(params):
        return PIMuonState(base.init(params), working_precision(otu.tree_zeros_like(params)), fusion.init(),
                           damping.init() if adaptive else None, {k: jnp.zeros((), jnp.float32) for k in stat_names})

    def update_fn(updates, state, params=None, *, batch=None, line_search_batch=None, **extra):
        require_batch("pi_muon", params, batch)
        u, muon_state = base.update(updates, state.muon, params)
        lam = state.fusion.output
        delta = state.damping.output if adaptive else damping
        s, stats = solver.solve(apply_fn, loss_fn, curvature, params, batch,
                                state.gn_warm_start, delta)
        c, s_perp = split_along(s, u)
        if parallel == "interpolate":
            step = jax.tree.map(lambda ul, cl, pl: ((1 - lam) + lam * cl) * ul + lam * pl, u, c, s_perp)
        else:
            step = jax.tree.map(lambda ul, pl: ul + lam * pl, u, s_perp)
        trust_batch = batch if line_search_batch is None else line_search_batch
        trust_batch = trust_batch if trust_batch_size is None else jax.tree.map(
            lambda x: x[:trust_batch_size], trust_batch)
        rho, actual, predicted = trust_ratio(apply_fn, loss_fn, params, trust_batch, step)
        fusion_state, accept = fusion.update(state.fusion, rho)
        damping_state = damping.update(state.damping, rho)[0] if adaptive else None
        step = jax.tree.map(lambda a, b: jnp.where(accept, a, b), step, u)
        diag = {"lambda": lam, "rho": rho, "damping": delta, "accepted": accept,
                "perp_ratio": otu.tree_norm(s_perp) / jnp.maximum(otu.tree_norm(s), 1e-30),
                "actual_decrease": actual, "predicted_decrease": predicted, **stats}
        diag = {k: jnp.asarray(diag[k], jnp.float32) for k in stat_names}
        new_state = PIMuonState(muon_state, working_precision(otu.tree_scale(gn_warm_start, s)), fusion_state,
                                damping_state, diag)
        return otu.tree_cast_like(step, params), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
