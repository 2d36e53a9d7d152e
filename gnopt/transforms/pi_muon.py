"""PI-Muon: Muon fused with layerwise Gauss-Newton, the weight set by a PI controller.

Our method (design: ``shared/design/algorithms.md`` §3). Per step at ``θ``:

1. ``u``: Muon's update (orthogonalised Nesterov momentum on hidden matrices,
   AdamW on the rest, times the learning rate) — :func:`gnopt.transforms.muon`;
   its gradient comes from the GN solver, which computes it anyway
   (``gradient="solver"``; the trainer's backward pass is then dead code), or
   is the one passed to ``update`` (``gradient="given"``). By default
   (``muon_step_length="model"``) ``u`` is then shortened to ``β u``,
   ``β = clip(−gᵀu / uᵀGu, 0, 1)`` the minimiser of the full-GGN model along
   ``u`` on the trust batch (one more tangent pass): at batch 1024 Muon's
   fixed ``η`` made 9 of 16 fused steps uphill by the model's own prediction
   (``docs/pi_muon.md``, change 9); ``"muon"`` keeps Muon's length;
2. ``s``: layerwise GN step, ``(G_kk + δI) s_k ≈ −g_k`` (CG by default,
   warm-started), scaled to the length ``α = κ · α*``:
   ``α* = clip(−gᵀs / sᵀGs, 0, 1)`` minimises the full-GGN model along ``s`` on
   the trust batch (Martens & Grosse 2015, §6.4) — the layerwise step ignores
   the coupling of the blocks and overshoots, which the grid line search of
   layerwise GN otherwise absorbs — and ``κ = clip(1/r, 1/2, 3/2)`` corrects for
   the loss curving ``r`` times as much as the model along the last step
   (``r`` from the parabola through ``L(θ)``, ``gᵀΔ`` and ``L(θ+Δ)``, all
   measured anyway: :attr:`gnopt.curvature.TrustRatio.curvature_ratio`)
   (``gn_step_length``: ``"corrected"``, ``"model"`` for ``κ ≡ 1``, or
   ``"solver"`` for ``α ≡ 1``);
3. per leaf ``l`` (one weight matrix or vector), the orthogonal split
   ``s_l = c_l u_l + s⊥_l`` with ``c_l = ⟨s_l, u_l⟩ / ⟨u_l, u_l⟩``, ``⟨s⊥_l, u_l⟩ = 0``
   (``s`` scaled by ``α``);
4. the fused update

   * ``parallel="muon"`` (§3 as written): ``Δ = u + λ s⊥``;
   * ``parallel="interpolate"`` (our first refinement): the component along
     ``u`` also moves from Muon's to GN's, ``Δ = ((1 − λ) + λ c) u + λ s⊥ =
     (1 − λ) u + λ s``.

   * ``parallel="plane"`` (default since issue 17): the GN model minimised exactly
     on the plane ``span{u, s⊥} = span{u, s}`` (``u`` before any model
     shortening; here ``s⊥ = s − (⟨s,u⟩/⟨u,u⟩) u`` with one coefficient for the
     whole pytree, :func:`split_whole`: with the per-leaf split ``s`` itself
     is ``Σ_l c_l u_l + s⊥``, outside the plane, and the plane's minimiser lost
     to the interpolate step on a quadratic), see :func:`plane_coefficients`:
     ``q(a u + c s⊥) = a b_u + c b_⊥ + ½ [a c] M [a c]ᵀ`` with
     ``b = (gᵀu, gᵀs⊥)`` and ``M = [[uᵀGu, uᵀGs⊥], [uᵀGs⊥, s⊥ᵀGs⊥]]`` on the
     trust batch (two tangent passes ``Ju``, ``Js⊥``; ``uᵀGs⊥ = (Ju)ᵀH_z(Js⊥)``;
     the step's ``gᵀΔ`` and ``ΔᵀGΔ`` for ``ρ`` follow from ``b`` and ``M``).
     ``λ`` scales the GN coefficient of the joint minimiser ``(a*, c*)``,
     ``c = λ c*``, and ``a = −(b_u + M_u⊥ c)/M_uu`` is then the best
     coefficient on ``u`` for that ``c`` (``plane_damping = μ`` damps the
     2×2 problem, ``M + μ diag M``): ``λ = 1`` is the plane's minimiser,
     ``λ = 0`` Muon's direction at the model-optimal length. ``M`` not
     positive definite (or non-finite) falls back to the better of ``β u``,
     ``β = clip(−gᵀu/uᵀGu, 0, 1)``, and ``λ γ s⊥`` (``γ`` likewise along ``s⊥``). ``gn_step_length`` and
     ``muon_step_length`` do not shape this step (the plane chooses both
     lengths); ``muon_step_length="model"`` still makes ``β u`` the Muon
     fallback of a rejected step.

   Why the refinement: with ``u + λ s⊥`` the step's component along ``u`` is
   Muon's whatever ``λ`` is, so even where the GN model is exact (``ρ = 1``,
   ``λ → 1``) the step is not the GN step and PI-Muon cannot converge like GN on
   a quadratic (measured: tests/test_pi_muon.py). Both forms keep ``λ ≡ 0`` =
   Muon (bit for bit with ``gradient="given"`` and ``muon_step_length="muon"``
   while steps are accepted) and use the same orthogonal split;
5. the trust ratio ``ρ = (L(θ) − L(θ+Δ)) / (q(0) − q(Δ))`` on the step's batch,
   on ``line_search_batch`` when given — a fresh batch: ρ measured on the batch
   the step was built from is optimistic (measured: an accepted ρ = 0.75 on the
   step's own batch took the tiny LLaMA's validation loss from 3.6 to 10.2).
   Steps 2 and 5 share one linearisation on that batch: one primal pass, two
   tangent passes (the plane: ``Ju``, ``Js⊥``, ``ρ``'s model decrease from the
   2×2 model; the other fusions: along ``s`` and ``u``, and ``JΔ``, three) and
   one forward at ``θ + Δ`` — against the ten forwards of layerwise GN's grid
   line search;
6. ``λ`` for the next step from a controller on ``ρ``
   (:class:`gnopt.control.AbstractController`, by default a PI controller; no
   line search); optionally the GN damping ``δ`` from a second controller
   (a smooth Levenberg–Marquardt rule). A step is rejected when either
   controller rejects it (e.g. ``ρ < reject_below``, or non-finite) or when it
   raised the loss on the trust batch (even as predicted: both decreases
   negative give ``ρ > 0``); both controllers then see a bad step. The
   fallback is ``τΔ``, the minimiser of the parabola through ``L(θ)``,
   ``gᵀΔ`` and ``L(θ + Δ)`` — all measured already (``rejected="parabola"``) —
   or Muon's ``u`` (``rejected="muon"``). The fallback is kept only if its
   loss on the same trust batch is below ``L(θ)`` (one more forward, on
   rejected steps only); otherwise the update is zero. So no kept step raises
   the trust-batch loss.
"""

from __future__ import annotations

from typing import Callable

import optax

from gnopt._checks import check_learning_rate
from gnopt.control import AbstractController
from gnopt.curvature import AbstractCurvature
from gnopt.requirements import requires
from gnopt.solvers import AbstractSolver
from gnopt.transforms.fusion import (FusionState, _length_correction, fuse,  # noqa: F401
                                     plane_coefficients, split_along, split_whole)
from gnopt.transforms.muon import muon

PIMuonState = FusionState
"""State of :func:`pi_muon` (``base``: Muon's state)."""


def pi_muon(
    apply_fn: Callable,
    loss_fn: Callable,
    learning_rate: optax.ScalarOrSchedule = 0.02,
    *,
    solver: AbstractSolver | None = None,
    curvature: AbstractCurvature | None = None,
    fusion: AbstractController | None = None,
    damping: float | AbstractController | None = None,
    parallel: str = "plane",
    gn_warm_start: float = 1.0,
    trust_batch_size: int | None = None,
    gn_step_length: str = "corrected",
    gradient: str = "solver",
    rejected: str = "parabola",
    correction_limits: tuple[float, float] = (0.5, 1.5),
    muon_step_length: str = "model",
    plane_damping: float = 0.0,
    beta: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    weight_decay: float = 0.0,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    adam_b1: float = 0.9,
    adam_b2: float = 0.95,
    adam_eps: float = 1e-8,
    adam_weight_decay: float = 0.0,
    compute_dtype: str = "float32",
    is_hidden_matrix: Callable | None = None,
) -> optax.GradientTransformationExtraArgs:
    """PI-Muon (see the module docstring for the maths).

    Args:
      apply_fn, loss_fn: model and loss (static).
      learning_rate: Muon's ``η`` (float or schedule).
      solver: GN solver for ``s`` (default ``cg(max_iters=10)``).
      curvature: GGN of ``s`` (default :func:`gnopt.curvature.layerwise`).
      fusion: controller of ``λ`` (default
        ``fusion_weight_controller(kp=0.2, reject_below=0.0)``: steps whose
        loss moved against the model's prediction, or rose, are rejected;
        with ``kp=0.5`` one rejection at batch 512–1024 cut λ from 1 to
        ≈ 0.04 and the Muon-dominated steps that followed raised the loss).
      damping: ``δ``, a float or a controller driven by the same ``ρ``
        (default :func:`gnopt.control.damping_controller`). Measured on the
        tiny LLaMA: a fixed ``δ = 1e-3`` without rejection diverges in the
        first steps (loss 5.5 → 1e8); the adaptive defaults train.
      parallel: ``"plane"`` (default: the GN model minimised on
        ``span{u, s⊥}``, ``λ`` on the GN coefficient), ``"interpolate"`` or
        ``"muon"`` (§3 as written); step 4 of the module docstring, and
        ``docs/pi_muon.md`` for why the plane is the default.
      gn_warm_start: factor on the last ``s`` used to start the next solve.
      trust_batch_size: measure ``ρ`` on the first this many sequences of its
        batch (default: all; paper-size batches need a slice to fit in memory).
      gn_step_length: ``"corrected"`` (default), ``"model"`` or ``"solver"``
        (step 2 of the module docstring).
      gradient: ``"solver"`` (default) or ``"given"``: where Muon's gradient
        comes from (step 1). ``"given"`` with ``λ ≡ 0`` and
        ``muon_step_length="muon"`` is Muon bit for bit; ``"solver"`` equals
        it up to rounding (micro-batch sums).
      rejected: ``"parabola"`` (default) or ``"muon"``: the step taken when
        the fused step is rejected (step 6). With ``"parabola"``, ``λ ≡ 0`` is
        Muon only while Muon's steps are accepted.
      correction_limits: ``(low, high)`` limits of ``κ``. At ``κ`` the model's
        decrease is ``κ(2 − κ)`` of its best, so ``κ → 2`` makes ``ρ``
        ill-conditioned (measured at batch 256: ``κ = 1.97`` gave ρ = −44 and
        12 steps to the target instead of 7 with the default ``3/2``).
      muon_step_length: ``"model"`` (default: ``u`` shortened by the GN
        model along it, step 1) or ``"muon"`` (``u`` as Muon makes it).
      plane_damping: ``μ ≥ 0``, the Levenberg–Marquardt damping of the 2×2
        problem of ``parallel="plane"`` (:func:`plane_coefficients`);
        ``μ > 0`` shortens both coefficients (a trust radius on the plane).
      beta, nesterov, ns_steps, weight_decay, adam_learning_rate, adam_b1, adam_b2,
        adam_eps, adam_weight_decay, compute_dtype, is_hidden_matrix: Muon's
        (:func:`gnopt.transforms.muon`, same defaults); named here, not passed
        as ``**kwargs``, so that ``inject_hyperparams`` sees each number.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` takes the
      gradients, ``params``, ``batch=(inputs, targets)`` and optionally
      ``line_search_batch`` (a fresh batch on which ``ρ`` is measured).

    Numbers are data: ``learning_rate``, ``damping`` (a float),
    ``gn_warm_start``, ``correction_limits``, Muon's numbers and the
    controllers' fields may be traced — hyperparameters of
    :func:`gnopt.hyperparams.inject_hyperparams` (which keeps
    :attr:`pi_muon.static_args`, the functions and counts, static)::

      tx = inject_hyperparams(gnopt.pi_muon)(apply_fn, loss_fn, learning_rate=0.02)

    or a controller given new gains (``eqx.tree_at``) without a retrace when
    it is an argument of the jitted step that builds the transform.
    """
    check_learning_rate("pi_muon", "learning_rate", learning_rate)
    if muon_step_length not in ("muon", "model"):
        raise ValueError("pi_muon: muon_step_length must be 'muon' or 'model', "
                         f"got {muon_step_length!r}")
    base = muon(learning_rate, beta=beta, nesterov=nesterov, ns_steps=ns_steps,
                weight_decay=weight_decay, adam_learning_rate=adam_learning_rate, adam_b1=adam_b1,
                adam_b2=adam_b2, adam_eps=adam_eps, adam_weight_decay=adam_weight_decay,
                compute_dtype=compute_dtype, is_hidden_matrix=is_hidden_matrix)
    return fuse(base, apply_fn, loss_fn, solver=solver, curvature=curvature, fusion=fusion,
                damping=damping, parallel=parallel, gn_warm_start=gn_warm_start,
                trust_batch_size=trust_batch_size, gn_step_length=gn_step_length,
                gradient=gradient, rejected=rejected, correction_limits=correction_limits,
                base_step_length="base" if muon_step_length == "muon" else "model",
                plane_damping=plane_damping, where="pi_muon")


# Arguments that are not hyperparameters: functions and counts
# (read by gnopt.hyperparams.inject_hyperparams).
pi_muon.static_args = ("apply_fn", "loss_fn", "trust_batch_size", "ns_steps", "is_hidden_matrix")
# the trainer's gradient is unused with the default gradient="solver"
requires("apply_fn", "loss_fn", whole_batch=True, own_gradient=True)(pi_muon)
