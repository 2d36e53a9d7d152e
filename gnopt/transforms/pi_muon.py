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
   * ``parallel="interpolate"`` (default, our refinement): the component along
     ``u`` also moves from Muon's to GN's, ``Δ = ((1 − λ) + λ c) u + λ s⊥ =
     (1 − λ) u + λ s``.

   * ``parallel="plane"`` (not yet the default): the GN model minimised exactly
     on the plane ``span{u, s⊥} = span{u, s}`` (``u`` before any model
     shortening; here ``s⊥ = s − (⟨s,u⟩/⟨u,u⟩) u`` with one coefficient for the
     whole pytree, :func:`split_whole`: with the per-leaf split ``s`` itself
     is ``Σ_l c_l u_l + s⊥``, outside the plane, and the plane's minimiser lost
     to the interpolate step on a quadratic), see :func:`plane_coefficients`:
     ``q(a u + c s⊥) = a b_u + c b_⊥ + ½ [a c] M [a c]ᵀ`` with
     ``b = (gᵀu, gᵀs⊥)`` and ``M = [[uᵀGu, uᵀGs⊥], [uᵀGs⊥, s⊥ᵀGs⊥]]`` on the
     trust batch (two tangent passes ``Ju``, ``Js⊥``; ``uᵀGs⊥ = (Ju)ᵀH_z(Js⊥)``).
     ``λ`` scales the GN coefficient of the joint minimiser ``(a*, c*)``,
     ``c = λ c*``, and ``a = −(b_u + M_u⊥ c)/M_uu`` is then the best
     coefficient on ``u`` for that ``c`` (``plane_damping = μ`` damps the
     2×2 problem, ``M + μ diag M``): ``λ = 1`` is the plane's minimiser,
     ``λ = 0`` Muon's direction at the model-optimal length. ``M`` not
     positive definite (or non-finite) falls back to ``β u``,
     ``β = clip(−gᵀu/uᵀGu, 0, 1)``. ``gn_step_length`` and
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
   tangent passes (``Js``, ``JΔ``) and one forward at ``θ + Δ`` — against the
   ten forwards of layerwise GN's grid line search;
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

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from gnopt.control import AbstractController, damping_controller, fusion_weight_controller
from gnopt._checks import check_int, check_learning_rate, check_number, is_traced
from gnopt.curvature import AbstractCurvature, LinearisedModel, TrustRatio, layerwise, trust_ratio
from gnopt.solvers import AbstractSolver, cg, working_precision
from gnopt.transforms.gauss_newton import require_batch
from gnopt.transforms.muon import muon


class PIMuonState(NamedTuple):
    """State of :func:`pi_muon`."""

    muon: Any  # Muon's state (momentum, AdamW moments)
    gn_warm_start: Any  # last GN solution s
    fusion: Any  # λ controller's state; ``fusion.output`` is the next λ
    damping: Any  # δ controller's state (None for a fixed δ)
    length_correction: Any  # κ, the GN step-length correction for the next step
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


def split_whole(s, u):
    """The split ``s = c u + s⊥`` with one ``c = ⟨s, u⟩/⟨u, u⟩`` for the whole
    pytree (0 where ``u = 0``); returns ``(c, s⊥)``. Unlike :func:`split_along`,
    ``span{u, s⊥} = span{u, s}``: the plane holds the GN step itself."""
    su = otu.tree_vdot(s, u).real
    uu = otu.tree_vdot(u, u).real
    c = jnp.where(uu > 0, su / jnp.where(uu > 0, uu, 1.0), 0.0)
    return c, jax.tree.map(lambda sl, ul: sl - c * ul, s, u)


def _line_minimiser(slope, curvature):
    """``(ok, τ)``: ``τ = clip(−slope / curvature, 0, 1)`` minimises
    ``t ↦ t·slope + ½ t²·curvature``; ``ok``: a minimiser lies ahead (descent,
    positive curvature, both finite), else ``τ = 0``."""
    ok = (slope < 0) & (curvature > 0) & jnp.isfinite(slope) & jnp.isfinite(curvature)
    return ok, jnp.where(ok, jnp.clip(-slope / jnp.where(ok, curvature, 1.0), 0.0, 1.0), 0.0)


# ``M`` counts as singular when ``det M ≤ tol · M_uu · M_⊥⊥`` (cos² of the
# G-angle between u and s⊥ above 1 − tol): scale-free, and well above the
# float32 cancellation error of the determinant.
_PLANE_TOL = 1e-4


def plane_coefficients(model: LinearisedModel, u, perp, lam, damping=0.0):
    """The GN model on ``span{u, s⊥}``: ``(ok, a, c, β)`` (scalars).

    With ``b = (gᵀu, gᵀs⊥)`` and ``M = [[uᵀGu, uᵀGs⊥], [uᵀGs⊥, s⊥ᵀGs⊥]]`` on
    ``model``'s batch (tangents ``Ju``, ``Js⊥``: two passes; ``G = JᵀH_zJ``, so
    every entry is an output-space product), the joint minimiser of
    ``q(a u + c s⊥) = a b_u + c b_⊥ + ½ [a c] M [a c]ᵀ`` is
    ``(a*, c*) = −M⁻¹ b``; with ``damping = μ > 0`` (Levenberg–Marquardt on
    the 2×2 problem) ``(a*, c*) = −(M + μ diag M)⁻¹ b``. Returned: ``c = λ c*``
    and ``a = −(b_u + M_u⊥ c) / ((1 + μ) M_uu)`` (the best ``a`` for that
    ``c``; ``a*`` at ``λ = 1``, the 1-D minimiser along ``u`` at ``λ = 0``). ``ok`` is false
    when ``M`` is non-finite or not positive definite (``det M ≤ tol ·
    M_uu M_⊥⊥``, e.g. ``s⊥ = 0``); then ``a = β``, ``c = 0``. ``β =
    clip(−gᵀu/uᵀGu, 0, 1)`` is the clipped 1-D minimiser along ``u``
    (:func:`_line_minimiser`), free from the same entries.
    """
    ju, jp = model.jvp(u), model.jvp(perp)
    gz = model.output_grad()
    hu, hp = model.output_hvp(ju), model.output_hvp(jp)
    bu, bp = jnp.vdot(gz, ju).real, jnp.vdot(gz, jp).real
    muu, mup, mpp = jnp.vdot(ju, hu).real, jnp.vdot(ju, hp).real, jnp.vdot(jp, hp).real
    duu, dpp = (1 + damping) * muu, (1 + damping) * mpp
    det = duu * dpp - mup * mup
    finite = jnp.isfinite(jnp.stack([bu, bp, muu, mup, mpp]))
    ok = jnp.all(finite) & (muu > 0) & (mpp > 0) & (det > _PLANE_TOL * duu * dpp)
    safe = lambda x: jnp.where(ok, x, 1.0)
    c_star = (mup * bu - duu * bp) / safe(det)
    c = jnp.where(ok, lam * c_star, 0.0)
    a = -(bu + mup * c) / safe(duu)
    _, beta = _line_minimiser(bu, muu)
    return ok, jnp.where(ok, a, beta), c, beta


def _parabola_step(measured: TrustRatio, step, u):
    """``τΔ``, ``τ`` the minimiser of the parabola through ``L(θ)`` (slope
    ``gᵀΔ``) and ``L(θ + Δ)`` (Nocedal & Wright 2006, §3.5; ``τ ≤ 1/2`` when the
    loss rose); Muon's ``u`` where that parabola has no minimiser ahead (or
    ``Δ`` is non-finite)."""
    ok, tau = _line_minimiser(measured.slope, measured.loss_curvature)
    return jax.tree.map(lambda d, ul: jnp.where(ok, tau * d, ul), step, u)


def _length_correction(curvature_ratio, low: float, high: float):
    """``κ = clip(1/r, low, high)``; non-convex (``r ≤ 0``) reads as ``high``,
    non-finite as ``low``."""
    r = curvature_ratio
    kappa = jnp.where(r > 0, 1 / jnp.where(r > 0, r, 1.0), high)
    return jnp.where(jnp.isfinite(r), jnp.clip(kappa, low, high), low).astype(jnp.float32)


def pi_muon(
    apply_fn: Callable,
    loss_fn: Callable,
    learning_rate: optax.ScalarOrSchedule = 0.02,
    *,
    solver: AbstractSolver | None = None,
    curvature: AbstractCurvature | None = None,
    fusion: AbstractController | None = None,
    damping: float | AbstractController | None = None,
    parallel: str = "interpolate",
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
      parallel: ``"interpolate"`` (default), ``"muon"`` (§3 as written) or
        ``"plane"`` (the GN model minimised on ``span{u, s⊥}``, ``λ`` on the
        GN coefficient; step 4 of the module docstring).
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
    if parallel not in ("interpolate", "muon", "plane"):
        raise ValueError(f"pi_muon: parallel must be 'interpolate', 'muon' or 'plane', got {parallel!r}")
    if rejected not in ("parabola", "muon"):
        raise ValueError(f"pi_muon: rejected must be 'parabola' or 'muon', got {rejected!r}")
    if gradient not in ("solver", "given"):
        raise ValueError(f"pi_muon: gradient must be 'solver' or 'given', got {gradient!r}")
    if gn_step_length not in ("solver", "model", "corrected"):
        raise ValueError("pi_muon: gn_step_length must be 'solver', 'model' or 'corrected', "
                         f"got {gn_step_length!r}")
    if muon_step_length not in ("muon", "model"):
        raise ValueError("pi_muon: muon_step_length must be 'muon' or 'model', "
                         f"got {muon_step_length!r}")
    if not is_traced(*correction_limits) and not 0 < correction_limits[0] <= 1 <= correction_limits[1]:
        raise ValueError("pi_muon: correction_limits must satisfy 0 < low <= 1 <= high, "
                         f"got {correction_limits}")
    solver = cg(max_iters=10) if solver is None else solver
    curvature = layerwise() if curvature is None else curvature
    fusion = fusion_weight_controller(kp=0.2, reject_below=0.0) if fusion is None else fusion
    damping = damping_controller() if damping is None else damping
    if not isinstance(fusion, AbstractController):
        raise TypeError(f"pi_muon: fusion must be a gnopt.control controller, got {type(fusion).__name__}")
    adaptive = isinstance(damping, AbstractController)
    if not adaptive:
        check_number("pi_muon", "damping", damping, low=0.0)
    check_learning_rate("pi_muon", "learning_rate", learning_rate)
    check_number("pi_muon", "plane_damping", plane_damping, low=0.0)
    check_number("pi_muon", "gn_warm_start", gn_warm_start, low=0.0, high=1.0)
    if trust_batch_size is not None:
        check_int("pi_muon", "trust_batch_size", trust_batch_size, low=1)
    base = muon(learning_rate, beta=beta, nesterov=nesterov, ns_steps=ns_steps,
                weight_decay=weight_decay, adam_learning_rate=adam_learning_rate, adam_b1=adam_b1,
                adam_b2=adam_b2, adam_eps=adam_eps, adam_weight_decay=adam_weight_decay,
                compute_dtype=compute_dtype, is_hidden_matrix=is_hidden_matrix)
    stat_names = ("lambda", "rho", "gn_scale", "muon_scale", "curvature_ratio", "perp_ratio",
                  "damping", "accepted", "actual_decrease", "predicted_decrease",
                  "plane_a", "plane_c") + solver.stat_names

    def init_fn(params):
        return PIMuonState(base.init(params), working_precision(otu.tree_zeros_like(params)),
                           fusion.init(), damping.init() if adaptive else None,
                           jnp.ones((), jnp.float32), {k: jnp.zeros((), jnp.float32) for k in stat_names})

    def update_fn(updates, state, params=None, *, batch=None, line_search_batch=None, **extra):
        require_batch("pi_muon", params, batch)
        lam = state.fusion.output
        delta = state.damping.output if adaptive else damping
        solve_args = (apply_fn, loss_fn, curvature, params, batch, state.gn_warm_start, delta)
        if gradient == "solver":
            s, stats, grads = solver.solve_with_gradient(*solve_args)
            updates = otu.tree_cast_like(grads, updates)
        else:
            s, stats = solver.solve(*solve_args)
        u, muon_state = base.update(updates, state.muon, params)
        trust_batch = batch if line_search_batch is None else line_search_batch
        trust_batch = trust_batch if trust_batch_size is None else jax.tree.map(
            lambda x: x[:trust_batch_size], trust_batch)
        model = LinearisedModel(apply_fn, loss_fn, params, trust_batch)
        plane_a = plane_c = jnp.zeros(())
        if parallel == "plane":
            # u as Muon made it, s unscaled: the plane chooses both lengths
            gn_scale, scaled = jnp.ones(()), s
            _, s_perp = split_whole(s, u)
            plane_ok, plane_a, plane_c, beta = plane_coefficients(model, u, s_perp, lam,
                                                                   plane_damping)
            # where M is unusable c = 0, and s⊥ (perhaps non-finite) is left out
            step = jax.tree.map(lambda ul, pl: plane_a * ul + jnp.where(plane_ok, plane_c * pl, 0.0),
                                u, s_perp)
            muon_scale = beta if muon_step_length == "model" else jnp.ones(())
            u = otu.tree_scale(muon_scale, u)  # Muon's step, for the fallback
        else:
            gn_scale = (jnp.ones(()) if gn_step_length == "solver"
                        else state.length_correction * _line_minimiser(*model.along(s))[1])
            muon_scale = jnp.ones(())
            if muon_step_length == "model":
                muon_scale = _line_minimiser(*model.along(u))[1]
                u = otu.tree_scale(muon_scale, u)
            scaled = otu.tree_scale(gn_scale, s)
            c, s_perp = split_along(scaled, u)
            if parallel == "interpolate":
                step = jax.tree.map(lambda ul, cl, pl: ((1 - lam) + lam * cl) * ul + lam * pl,
                                    u, c, s_perp)
            else:
                step = jax.tree.map(lambda ul, pl: ul + lam * pl, u, s_perp)
        measured = trust_ratio(apply_fn, loss_fn, params, trust_batch, step, model=model)
        rho = measured.rho
        kept = (measured.actual >= 0) & jnp.isfinite(otu.tree_norm(step))
        fusion_state, accept = fusion.update(state.fusion, rho, kept)
        if adaptive:
            damping_state, damping_accept = damping.update(state.damping, rho, accept)
            accept = accept & damping_accept
        else:
            damping_state = None

        def checked_fallback():
            fallback = _parabola_step(measured, step, u) if rejected == "parabola" else u
            loss = loss_fn(apply_fn(otu.tree_add(params, otu.tree_cast_like(fallback, params)),
                                    trust_batch[0]), trust_batch[1])
            better = jnp.isfinite(loss) & (loss < model.loss())
            return jax.tree.map(lambda f, s: jnp.where(better, f, 0.0).astype(s.dtype), fallback, step)

        step = jax.lax.cond(accept, lambda: step, checked_fallback)
        correction = (_length_correction(measured.curvature_ratio, *correction_limits)
                      if gn_step_length == "corrected" else state.length_correction)
        diag = {"lambda": lam, "rho": rho, "damping": delta, "accepted": accept, "gn_scale": gn_scale,
                "muon_scale": muon_scale, "plane_a": plane_a, "plane_c": plane_c,
                "curvature_ratio": measured.curvature_ratio,
                "perp_ratio": otu.tree_norm(s_perp) / jnp.maximum(otu.tree_norm(scaled), 1e-30),
                "actual_decrease": measured.actual, "predicted_decrease": measured.predicted, **stats}
        diag = {k: jnp.asarray(diag[k], jnp.float32) for k in stat_names}
        # a non-finite solve must not seed the next one
        finite = jnp.isfinite(otu.tree_norm(s))
        warm = jax.tree.map(lambda x: jnp.where(finite, gn_warm_start * x, 0.0), s)
        new_state = PIMuonState(muon_state, working_precision(warm), fusion_state, damping_state,
                                correction, diag)
        return otu.tree_cast_like(step, params), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# Arguments that are not hyperparameters: functions and counts
# (read by gnopt.hyperparams.inject_hyperparams).
pi_muon.static_args = ("apply_fn", "loss_fn", "trust_batch_size", "ns_steps", "is_hidden_matrix")
