"""``fuse``: any optax base transform fused with a GN direction, the weight set by a controller.

The combinator behind PI-Muon (:func:`gnopt.pi_muon` = ``fuse(muon(...), ...)``;
the maths, steps 1–6, is in :mod:`gnopt.transforms.pi_muon` with "Muon" read as
"the base transform"). Per step at ``θ``: the base's update ``u`` (Muon,
AdamW, SOAP, ...; its gradient from the GN solver or the one given), the GN
direction ``s`` (:class:`gnopt.GNDirection`, layerwise by default), the fused
step in ``span{u, s}`` by ``parallel`` (``"plane"``, ``"interpolate"``, or
``"muon"`` for ``u + λ s⊥``), the trust ratio ``ρ`` on the trust batch, the
weight ``λ`` (and the damping ``δ``) from controllers on ``ρ``
(:func:`gnopt.control.decide`), and a checked fallback for a rejected step.
A PI-fused SOAP + GN is one line::

  tx = gnopt.fuse(gnopt.soap(1e-2), apply_fn, loss_fn)
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from gnopt._checks import check_int, check_number, is_traced
from gnopt.control import AbstractController, damping_controller, decide, fusion_weight_controller
from gnopt.curvature import AbstractCurvature, LinearisedModel, TrustRatio, layerwise, trust_ratio
from gnopt.requirements import requires
from gnopt.solvers import AbstractSolver, cg
from gnopt.transforms.gn_direction import GNDirection, require_batch


class FusionState(NamedTuple):
    """State of :func:`fuse` (and :func:`gnopt.pi_muon`)."""

    base: Any  # the base transform's state (Muon's momentum, AdamW moments, ...)
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


class PlaneStep(NamedTuple):
    """:func:`plane_coefficients`' answer (scalars): the step ``a u + c s⊥``."""

    ok: jax.Array  # s⊥ enters the step (else c = 0 and s⊥, perhaps non-finite, is left out)
    a: jax.Array  # coefficient on u
    c: jax.Array  # coefficient on s⊥
    beta: jax.Array  # clip(−gᵀu/uᵀGu, 0, 1), the 1-D minimiser along u
    slope: jax.Array  # gᵀΔ of the step, from b
    curvature: jax.Array  # ΔᵀGΔ of the step, from M


def plane_coefficients(model: LinearisedModel, u, perp, lam, damping=0.0) -> PlaneStep:
    """The GN model on ``span{u, s⊥}``: a :class:`PlaneStep`.

    With ``b = (gᵀu, gᵀs⊥)`` and ``M = [[uᵀGu, uᵀGs⊥], [uᵀGs⊥, s⊥ᵀGs⊥]]`` on
    ``model``'s batch (tangents ``Ju``, ``Js⊥``: two passes; ``G = JᵀH_zJ``, so
    every entry is an output-space product), the joint minimiser of
    ``q(a u + c s⊥) = a b_u + c b_⊥ + ½ [a c] M [a c]ᵀ`` is
    ``(a*, c*) = −M⁻¹ b``; with ``damping = μ > 0`` (Levenberg–Marquardt on
    the 2×2 problem) ``(a*, c*) = −(M + μ diag M)⁻¹ b``. Returned: ``c = λ c*``
    and ``a = −(b_u + M_u⊥ c) / ((1 + μ) M_uu)`` (the best ``a`` for that
    ``c``; ``a*`` at ``λ = 1``, the 1-D minimiser along ``u`` at ``λ = 0``).
    Where ``M`` is non-finite or not positive definite (``det M ≤ tol ·
    M_uu M_⊥⊥``, e.g. ``s⊥ = 0`` or ``u = 0``) the step is the better, by the
    model, of the two clipped 1-D minimisers (:func:`_line_minimiser`): ``a = β
    = clip(−gᵀu/uᵀGu, 0, 1)``, ``c = 0``, or ``a = 0``, ``c = λ clip(−gᵀs⊥ /
    s⊥ᵀGs⊥, 0, 1)`` (a base that returns a zero step, as SOAP on its first
    call, leaves the GN step). ``ok``: ``s⊥`` enters the step (it may be
    non-finite otherwise); ``β`` is returned in every case. The step's slope
    ``gᵀΔ = a b_u + c b_⊥`` and curvature ``ΔᵀGΔ = [a c] M [a c]ᵀ`` come from
    the same numbers, so :func:`gnopt.curvature.trust_ratio` needs no tangent
    pass along ``Δ``.
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
    perp_ok, gamma = _line_minimiser(bp, mpp)
    c_line = lam * gamma
    decrease = lambda t, b, m: jnp.where(jnp.isfinite(b * m), -(t * b + 0.5 * t * t * m), -jnp.inf)
    along_perp = ~ok & perp_ok & (decrease(c_line, bp, mpp) > decrease(beta, bu, muu))
    a = jnp.where(ok, a, jnp.where(along_perp, 0.0, beta))
    c = jnp.where(along_perp, c_line, c)
    used = ok | along_perp
    slope = a * bu + jnp.where(used, c * bp, 0.0)
    curvature = a * a * muu + jnp.where(used, 2 * a * c * mup + c * c * mpp, 0.0)
    return PlaneStep(used, a, c, beta, slope, curvature)


def _parabola_step(measured: TrustRatio, step, u):
    """``τΔ``, ``τ`` the minimiser of the parabola through ``L(θ)`` (slope
    ``gᵀΔ``) and ``L(θ + Δ)`` (Nocedal & Wright 2006, §3.5; ``τ ≤ 1/2`` when the
    loss rose); the base step ``u`` where that parabola has no minimiser ahead (or
    ``Δ`` is non-finite)."""
    ok, tau = _line_minimiser(measured.slope, measured.loss_curvature)
    return jax.tree.map(lambda d, ul: jnp.where(ok, tau * d, ul), step, u)


def _length_correction(curvature_ratio, low: float, high: float):
    """``κ = clip(1/r, low, high)``; non-convex (``r ≤ 0``) reads as ``high``,
    non-finite as ``low``."""
    r = curvature_ratio
    kappa = jnp.where(r > 0, 1 / jnp.where(r > 0, r, 1.0), high)
    return jnp.where(jnp.isfinite(r), jnp.clip(kappa, low, high), low).astype(jnp.float32)


STAT_NAMES = ("lambda", "rho", "gn_scale", "muon_scale", "curvature_ratio", "perp_ratio",
              "damping", "accepted", "actual_decrease", "predicted_decrease", "plane_a", "plane_c")
"""Diagnostics of :func:`fuse` (``muon_scale``: the factor on the base step;
``curvature_ratio``: 0 where undefined, a zero step), plus the solver's."""


class FusedStep(NamedTuple):
    """One fusion's answer: the step ``Δ`` and what the transform needs besides."""

    step: Any  # Δ
    base: Any  # the base step the "muon" fallback takes
    scaled: Any  # the GN step at the length the fusion used
    perp: Any  # s⊥
    scales: dict  # gn_scale, muon_scale, plane_a, plane_c
    along: tuple | None  # (gᵀΔ, ΔᵀGΔ) where the fusion has them, else None


def _plane_step(model, u, s, lam, plane_damping, base_step_length) -> FusedStep:
    """``parallel="plane"``: ``a u + c s⊥`` from :func:`plane_coefficients`."""
    _, s_perp = split_whole(s, u)
    plane = plane_coefficients(model, u, s_perp, lam, plane_damping)
    a, c = plane.a, plane.c
    # where s⊥ is not used c = 0, and s⊥ (perhaps non-finite) is left out
    step = jax.tree.map(lambda ul, pl: a * ul + jnp.where(plane.ok, c * pl, 0.0), u, s_perp)
    base_scale = plane.beta if base_step_length == "model" else jnp.ones(())
    scales = {"gn_scale": jnp.ones(()), "muon_scale": base_scale, "plane_a": a, "plane_c": c}
    return FusedStep(step, otu.tree_scale(base_scale, u), s, s_perp, scales,
                     (plane.slope, plane.curvature))


def _split_step(model, u, s, lam, kappa, parallel, gn_step_length, base_step_length) -> FusedStep:
    """``parallel="interpolate"`` (``(1 − λ) u + λ α s``) or ``"muon"`` (``u + λ α s⊥``),
    the per-leaf split of ``α s`` along ``β u``."""
    gn_scale = (jnp.ones(()) if gn_step_length == "solver"
                else kappa * _line_minimiser(*model.along(s))[1])
    base_scale = jnp.ones(())
    if base_step_length == "model":
        base_scale = _line_minimiser(*model.along(u))[1]
        u = otu.tree_scale(base_scale, u)
    scaled = otu.tree_scale(gn_scale, s)
    c, s_perp = split_along(scaled, u)
    if parallel == "interpolate":
        step = jax.tree.map(lambda ul, cl, pl: ((1 - lam) + lam * cl) * ul + lam * pl, u, c, s_perp)
    else:
        step = jax.tree.map(lambda ul, pl: ul + lam * pl, u, s_perp)
    zero = jnp.zeros(())
    scales = {"gn_scale": gn_scale, "muon_scale": base_scale, "plane_a": zero, "plane_c": zero}
    return FusedStep(step, u, scaled, s_perp, scales, None)


def _checked_fallback(apply_fn, loss_fn, params, batch, model, measured, step, u, rejected):
    """The step kept after a rejection: ``τΔ`` (or ``u``), only if it lowers the
    trust-batch loss (one forward), else zero."""
    fallback = _parabola_step(measured, step, u) if rejected == "parabola" else u
    loss = loss_fn(apply_fn(otu.tree_add(params, otu.tree_cast_like(fallback, params)), batch[0]),
                   batch[1])
    better = jnp.isfinite(loss) & (loss < model.loss())
    return jax.tree.map(lambda f, s: jnp.where(better, f, 0.0).astype(s.dtype), fallback, step)


def _verdict(controllers, states, measured: TrustRatio, fused: FusedStep, fallback):
    """``(new_states, accept, step)``: the controllers' verdict on ``ρ`` (a step that
    raised the trust-batch loss, or is non-finite, is rejected whatever they say,
    :func:`gnopt.control.decide`), their states (the fusion's, the damping's or
    None) and the step kept, ``fused.step`` or ``fallback()``."""
    kept = (measured.actual >= 0) & jnp.isfinite(otu.tree_norm(fused.step))
    states, accept = decide(controllers, states, measured.rho, kept)
    states += (None,) * (2 - len(states))  # a fixed damping has no state
    return states, accept, jax.lax.cond(accept, lambda: fused.step, fallback)


def _check_arguments(*, where, correction_limits, damping, plane_damping, gn_warm_start,
                     trust_batch_size, **arguments):
    """Checks :func:`fuse`'s arguments (given as keywords, the ones not checked here ignored)."""
    allowed = {"parallel": ("interpolate", "muon", "plane"), "rejected": ("parabola", "muon"),
               "gradient": ("solver", "given"),
               "gn_step_length": ("solver", "model", "corrected"),
               "base_step_length": ("base", "model")}
    for name in allowed:
        value = arguments[name]
        if value not in allowed[name]:
            raise ValueError(f"{where}: {name} must be one of {', '.join(map(repr, allowed[name]))}, "
                             f"got {value!r}")
    if not is_traced(*correction_limits) and not 0 < correction_limits[0] <= 1 <= correction_limits[1]:
        raise ValueError(f"{where}: correction_limits must satisfy 0 < low <= 1 <= high, "
                         f"got {correction_limits}")
    if damping is not None and not isinstance(damping, AbstractController):
        check_number(where, "damping", damping, low=0.0)
    check_number(where, "plane_damping", plane_damping, low=0.0)
    check_number(where, "gn_warm_start", gn_warm_start, low=0.0, high=1.0)
    if trust_batch_size is not None:
        check_int(where, "trust_batch_size", trust_batch_size, low=1)


def _controllers(fusion, damping, where: str):
    """``fuse``'s controllers, defaults filled in: ``(fusion, damping, controllers)``,
    ``controllers`` the ones that see ``ρ`` (``damping`` among them unless a float)."""
    fusion = fusion_weight_controller(kp=0.2, reject_below=0.0) if fusion is None else fusion
    if not isinstance(fusion, AbstractController):
        raise TypeError(f"{where}: fusion must be a gnopt.control controller, got {type(fusion).__name__}")
    damping = damping_controller() if damping is None else damping
    return fusion, damping, (fusion, damping) if isinstance(damping, AbstractController) else (fusion,)


def _trust_batch(batch, line_search_batch, size: int | None):
    """Where ``ρ`` is measured: ``line_search_batch`` (else ``batch``), its first ``size`` rows."""
    trust = batch if line_search_batch is None else line_search_batch
    return trust if size is None else jax.tree.map(lambda x: x[:size], trust)


def _fused_step(model, u, s, lam, correction, *, parallel: str, plane_damping,
                gn_step_length: str, base_step_length: str) -> FusedStep:
    """``parallel``'s fusion (``"plane"``: ``u`` as the base made it and ``s``
    unscaled, the plane chooses both lengths)."""
    if parallel == "plane":
        return _plane_step(model, u, s, lam, plane_damping, base_step_length)
    return _split_step(model, u, s, lam, correction, parallel, gn_step_length, base_step_length)


def _trust_diagnostics(measured: TrustRatio, s_perp, scaled) -> dict:
    r = measured.curvature_ratio  # 0/0 for a zero step: logged as 0
    return {"rho": measured.rho, "curvature_ratio": jnp.where(jnp.isfinite(r), r, 0.0),
            "perp_ratio": otu.tree_norm(s_perp) / jnp.maximum(otu.tree_norm(scaled), 1e-30),
            "actual_decrease": measured.actual, "predicted_decrease": measured.predicted}


def fuse(
    base: optax.GradientTransformation,
    apply_fn: Callable,
    loss_fn: Callable,
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
    base_step_length: str = "model",
    plane_damping: float = 0.0,
    where: str = "fuse",
) -> optax.GradientTransformationExtraArgs:
    """``base`` fused with a GN direction under a weight controller (PI-Muon's combinator).

    Args:
      base: any optax transform; its update is the step ``u`` (already
        scaled by its learning rate and negated, as optax's aliases make it).
      apply_fn, loss_fn: model and loss (static).
      solver, curvature: the GN direction's (default ``cg(max_iters=10)``,
        :func:`gnopt.curvature.layerwise`).
      fusion: controller of ``λ`` (default
        ``fusion_weight_controller(kp=0.2, reject_below=0.0)``).
      damping: ``δ``, a float or a controller on the same ``ρ`` (default
        :func:`gnopt.control.damping_controller`).
      parallel, gn_warm_start, trust_batch_size, gn_step_length, gradient,
        rejected, correction_limits, plane_damping: as in :func:`gnopt.pi_muon`.
      base_step_length: ``"model"`` (``u`` shortened by the GN model along it)
        or ``"base"`` (``u`` as the base makes it); ``pi_muon``'s
        ``muon_step_length``.
      where: the builder named in error messages (``pi_muon`` for the alias).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` takes the
      gradients, ``params``, ``batch=(inputs, targets)`` and optionally
      ``line_search_batch`` (a fresh batch on which ``ρ`` is measured); other
      keyword arguments reach ``base``.
    """
    _check_arguments(**locals())  # the arguments, before anything else is defined
    base = optax.with_extra_args_support(base)
    direction = GNDirection(apply_fn, loss_fn, cg(max_iters=10) if solver is None else solver,
                            layerwise() if curvature is None else curvature, gn_warm_start)
    fusion, damping, controllers = _controllers(fusion, damping, where)
    adaptive = len(controllers) == 2
    fused_step = functools.partial(_fused_step, parallel=parallel, plane_damping=plane_damping,
                                   gn_step_length=gn_step_length, base_step_length=base_step_length)
    stat_names = STAT_NAMES + direction.solver.stat_names

    def init_fn(params):
        return FusionState(base.init(params), direction.initial_start(params), fusion.init(),
                           damping.init() if adaptive else None, jnp.ones((), jnp.float32),
                           {k: jnp.zeros((), jnp.float32) for k in stat_names})

    def update_fn(updates, state, params=None, *, batch=None, line_search_batch=None, **extra):
        require_batch(where, params, batch)
        lam = state.fusion.output
        delta = state.damping.output if adaptive else damping
        s, stats, grads = direction(params, batch, state.gn_warm_start, delta,
                                    with_gradient=gradient == "solver")
        if gradient == "solver":
            updates = otu.tree_cast_like(grads, updates)
        u, base_state = base.update(updates, state.base, params, batch=batch, **extra)
        trust_batch = _trust_batch(batch, line_search_batch, trust_batch_size)
        model = LinearisedModel(apply_fn, loss_fn, params, trust_batch)
        fused = fused_step(model, u, s, lam, state.length_correction)
        measured = trust_ratio(apply_fn, loss_fn, params, trust_batch, fused.step, model=model,
                               along=fused.along)
        states, accept, step = _verdict(
            controllers, (state.fusion, state.damping)[:len(controllers)], measured, fused,
            lambda: _checked_fallback(apply_fn, loss_fn, params, trust_batch, model, measured,
                                      fused.step, fused.base, rejected))
        correction = (_length_correction(measured.curvature_ratio, *correction_limits)
                      if gn_step_length == "corrected" else state.length_correction)
        diag = {"lambda": lam, "damping": delta, "accepted": accept, **fused.scales, **stats,
                **_trust_diagnostics(measured, fused.perp, fused.scaled)}
        new_state = FusionState(base_state, direction.next_start(s), *states, correction,
                                {k: jnp.asarray(diag[k], jnp.float32) for k in stat_names})
        return otu.tree_cast_like(step, params), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# Arguments that are not hyperparameters (read by gnopt.hyperparams.inject_hyperparams).
fuse.static_args = ("base", "apply_fn", "loss_fn", "trust_batch_size")
requires("apply_fn", "loss_fn", whole_batch=True, own_gradient=True)(fuse)
