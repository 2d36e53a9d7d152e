"""PI-Muon invariants (algorithms.md §3) and its convergence on a toy quadratic."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, strategies as st

import gnopt
from gnopt import losses
from gnopt.control import PIController, fusion_weight_controller
from gnopt.transforms.muon import muon
from jax.flatten_util import ravel_pytree

from gnopt.transforms.pi_muon import (_length_correction, pi_muon, plane_coefficients, split_along,
                                     split_whole)
from tests.test_ggn import dense_ggn, make_mlp, mlp_apply


def mlp_batch(seed=0, n=16):
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda p: p.astype(jnp.float32), make_mlp(rng, [3, 8, 4]))
    return params, (jnp.asarray(rng.normal(size=(n, 3)), jnp.float32), jnp.asarray(rng.integers(0, 4, size=n)))


def zero_lambda():
    return PIController(setpoint=0.75, kp=0.5, ki=0.1, output0=0.0, output_min=0.0, output_max=0.0,
                        integral_limit=1.0, error_limit=1.0)


def grads_of(params, batch):
    return jax.grad(lambda p: losses.softmax_cross_entropy(mlp_apply(p, batch[0]), batch[1]))(params)


@pytest.mark.parametrize("parallel", ["interpolate", "muon"])
def test_zero_lambda_is_exactly_muon(parallel):
    params, batch = mlp_batch()
    pim = pi_muon(mlp_apply, losses.softmax_cross_entropy, 0.02, fusion=zero_lambda(), parallel=parallel,
                  gradient="given", muon_step_length="muon")
    ref = muon(0.02)
    p1, p2, s1, s2 = params, params, pim.init(params), ref.init(params)
    for _ in range(3):
        u1, s1 = pim.update(grads_of(p1, batch), s1, p1, batch=batch)
        u2, s2 = ref.update(grads_of(p2, batch), s2, p2)
        jax.tree.map(np.testing.assert_array_equal, u1, u2)
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    assert float(s1.diagnostics["lambda"]) == 0.0


def test_zero_lambda_with_the_solvers_gradient_is_muon_up_to_rounding():
    params, batch = mlp_batch()
    solver = gnopt.solvers.inner_optimizer(gnopt.inner_muon(0.03), inner_batch_size=4)
    pim = pi_muon(mlp_apply, losses.softmax_cross_entropy, 0.02, fusion=zero_lambda(), solver=solver,
                  parallel="interpolate", muon_step_length="muon")
    ref = muon(0.02)
    p1, p2, s1, s2 = params, params, pim.init(params), ref.init(params)
    for _ in range(3):
        # the given gradient is ignored: Muon's comes from the solver's micro-batches
        u1, s1 = pim.update(jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), p1), s1, p1, batch=batch)
        u2, s2 = ref.update(grads_of(p2, batch), s2, p2)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), u1, u2)
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)


def fixed_lambda(value, reject_below=None):
    return PIController(setpoint=0.75, kp=0.5, ki=0.1, output0=value, output_min=value,
                        output_max=value, integral_limit=1.0, error_limit=1.0, reject_below=reject_below)


@pytest.mark.parametrize("length", ["model", "solver"])
def test_gn_step_length_is_the_model_minimiser_along_s(x64, length):
    """λ ≡ 1: the step is ``α s`` with ``α = clip(−gᵀs/sᵀGs, 0, 1)`` on the trust batch
    (``"model"``), or ``s`` itself (``"solver"``); ``s`` from the same solver call."""
    params, batch = mlp_batch(n=16)
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    batch = (batch[0].astype(jnp.float64), batch[1])
    trust = mlp_batch(seed=2, n=16)[1]
    trust = (trust[0].astype(jnp.float64), trust[1])
    solver = gnopt.solvers.cg(max_iters=30)
    curv = gnopt.curvature.layerwise()
    tx = pi_muon(mlp_apply, losses.softmax_cross_entropy, 0.02, solver=solver, curvature=curv,
                 fusion=fixed_lambda(1.0), damping=1e-4, gn_step_length=length,
                 parallel="interpolate")
    step, state = tx.update(grads_of(params, batch), tx.init(params), params, batch=batch,
                            line_search_batch=trust)
    s, _ = solver.solve(mlp_apply, losses.softmax_cross_entropy, curv, params, batch,
                        jax.tree.map(jnp.zeros_like, params), 1e-4)
    g_dense, flat, _ = dense_ggn(mlp_apply, losses.softmax_cross_entropy, params, trust)
    grad = ravel_pytree(grads_of(params, trust))[0]
    s_flat = ravel_pytree(s)[0]
    alpha = float(np.clip(-(grad @ s_flat) / (s_flat @ g_dense @ s_flat), 0.0, 1.0))
    expected = alpha if length == "model" else 1.0
    assert float(state.diagnostics["gn_scale"]) == pytest.approx(expected, rel=1e-8)
    # the solver's full step overshoots on the trust batch and is rejected (not kept)
    assert bool(state.diagnostics["accepted"]) == (length == "model")
    if length == "model":
        np.testing.assert_allclose(ravel_pytree(step)[0], expected * s_flat, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("lr", [1e-3, 2.0])
def test_muon_step_length_from_the_model_shortens_u(x64, lr):
    """λ ≡ 0, ``muon_step_length="model"``: the step is Muon's ``u`` times
    ``β = clip(−gᵀu/uᵀGu, 0, 1)`` on the trust batch (β < 1 once η overshoots)."""
    params, batch = mlp_batch(n=16)
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    batch = (batch[0].astype(jnp.float64), batch[1])
    trust = mlp_batch(seed=1, n=16)[1]
    trust = (trust[0].astype(jnp.float64), trust[1])
    tx = pi_muon(mlp_apply, losses.softmax_cross_entropy, lr, fusion=zero_lambda(),
                 gradient="given", muon_step_length="model", parallel="interpolate")
    step, state = tx.update(grads_of(params, batch), tx.init(params), params, batch=batch,
                            line_search_batch=trust)
    u, _ = muon(lr).update(grads_of(params, batch), muon(lr).init(params), params)
    g_dense, _, _ = dense_ggn(mlp_apply, losses.softmax_cross_entropy, params, trust)
    grad = ravel_pytree(grads_of(params, trust))[0]
    u_flat = ravel_pytree(u)[0]
    beta = float(np.clip(-(grad @ u_flat) / (u_flat @ g_dense @ u_flat), 0.0, 1.0))
    assert (beta < 1.0) == (lr > 1.0)  # a short u is kept, an overshooting one cut back
    assert float(state.diagnostics["muon_scale"]) == pytest.approx(beta, rel=1e-6)  # logged in f32
    np.testing.assert_allclose(ravel_pytree(step)[0], beta * u_flat, rtol=1e-8, atol=1e-12)


def test_length_correction_follows_the_measured_curvature():
    params, batch = mlp_batch()
    tx = pi_muon(mlp_apply, losses.softmax_cross_entropy, 0.02, damping=1e-2,
                 correction_limits=(0.25, 4.0))
    state = tx.init(params)
    assert float(state.length_correction) == 1.0
    for _ in range(3):
        updates, state = tx.update(grads_of(params, batch), state, params, batch=batch)
        params = optax.apply_updates(params, updates)
        r = float(state.diagnostics["curvature_ratio"])
        assert float(state.length_correction) == pytest.approx(float(np.clip(1 / r, 0.25, 4.0)), rel=1e-5)


class _NaNSolver(gnopt.solvers.AbstractSolver):
    def solve(self, apply_fn, loss_fn, curvature, params, batch, delta0, damping):
        return jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), params), {}


def test_a_non_finite_gn_step_falls_back_to_muon_and_does_not_seed_the_next_solve():
    params, batch = mlp_batch()
    tx = pi_muon(mlp_apply, losses.softmax_cross_entropy, 0.02, solver=_NaNSolver(), gradient="given",
                 muon_step_length="muon", parallel="interpolate")
    ref = muon(0.02)
    step, state = tx.update(grads_of(params, batch), tx.init(params), params, batch=batch)
    expected, _ = ref.update(grads_of(params, batch), ref.init(params), params)
    jax.tree.map(np.testing.assert_array_equal, step, expected)
    assert not bool(state.diagnostics["accepted"])
    assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(state.gn_warm_start))
    assert float(state.length_correction) == 0.5
    assert bool(jnp.isfinite(state.fusion.output))


def test_a_non_finite_gn_step_leaves_the_plane_at_muons_direction():
    """``parallel="plane"`` (the default): a non-finite ``s`` makes the 2×2 model
    unusable, so the step is ``β u`` (finite), and ``s`` does not seed the next solve."""
    params, batch = mlp_batch()
    tx = pi_muon(mlp_apply, losses.softmax_cross_entropy, 0.02, solver=_NaNSolver(), gradient="given")
    step, state = tx.update(grads_of(params, batch), tx.init(params), params, batch=batch)
    u, _ = muon(0.02).update(grads_of(params, batch), muon(0.02).init(params), params)
    beta = float(state.diagnostics["muon_scale"])
    assert 0.0 < beta <= 1.0 and float(state.diagnostics["plane_c"]) == 0.0
    np.testing.assert_allclose(ravel_pytree(step)[0], beta * ravel_pytree(u)[0], rtol=1e-5, atol=1e-8)
    assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(state.gn_warm_start))
    # ρ's model decrease comes from the 2×2 entries; the non-finite s⊥ entries are left out
    assert np.isfinite(float(state.diagnostics["predicted_decrease"]))
    assert np.isfinite(float(state.diagnostics["rho"]))


def test_a_rejected_step_is_cut_back_to_the_parabola_minimiser(x64):
    """ρ < 0 with an uphill-curving loss: the fallback is τΔ, τ from the parabola
    through L(θ), gᵀΔ and L(θ+Δ), checked against jax.grad and two loss values,
    and kept only if it lowers the loss."""
    params, batch = mlp_batch(n=16)
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    batch = (batch[0].astype(jnp.float64), batch[1])
    loss = lambda p: losses.softmax_cross_entropy(mlp_apply(p, batch[0]), batch[1])
    # λ ≡ 1 and a huge solver step (length from the solver): the loss rises
    solver = gnopt.solvers.cg(max_iters=30)
    overshoot = pi_muon(mlp_apply, losses.softmax_cross_entropy, 0.02, fusion=fixed_lambda(1.0, 0.0),
                        damping=1e-8, gn_step_length="solver", solver=solver,
                        parallel="interpolate")
    step, state = overshoot.update(grads_of(params, batch), overshoot.init(params), params, batch=batch)
    # λ = 1, interpolation, the solver's length: the fused step is the solver's s itself
    full, _ = solver.solve(mlp_apply, losses.softmax_cross_entropy, gnopt.curvature.layerwise(), params,
                           batch, jax.tree.map(jnp.zeros_like, params), 1e-8)
    flat, unravel = ravel_pytree(params)
    d = ravel_pytree(full)[0]
    assert float(loss(unravel(flat + d))) > float(loss(params))  # the full step is uphill
    slope = ravel_pytree(grads_of(params, batch))[0] @ d
    c = 2 * (float(loss(unravel(flat + d))) - float(loss(params)) - slope)
    tau = -slope / c
    assert 0 < tau <= 0.5
    assert not bool(state.diagnostics["accepted"])
    # the cut-back is kept only if it lowers the loss; else no step at all
    lowers = float(loss(unravel(flat + tau * d))) < float(loss(params))
    np.testing.assert_allclose(ravel_pytree(step)[0], tau * d if lowers else 0 * d, rtol=1e-7, atol=1e-12)


def test_a_step_that_raises_the_loss_as_predicted_is_cut_back(x64):
    """λ ≡ 0 and an overlong Muon step: the model predicts the rise and the loss
    rises, so ρ > 0 passes ``reject_below = 0``; the step is still not kept, with
    or without a threshold, and its parabola cut-back is kept only if it lowers
    the loss."""
    params, batch = mlp_batch(n=16)
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    batch = (batch[0].astype(jnp.float64), batch[1])
    loss = lambda p: float(losses.softmax_cross_entropy(mlp_apply(p, batch[0]), batch[1]))
    kwargs = dict(damping=1e-2, gradient="given", muon_step_length="muon", parallel="interpolate")
    tx = pi_muon(mlp_apply, losses.softmax_cross_entropy, 2.0, fusion=fixed_lambda(0.0, 0.0), **kwargs)
    step, state = tx.update(grads_of(params, batch), tx.init(params), params, batch=batch)
    diag = state.diagnostics
    assert float(diag["predicted_decrease"]) < 0 and float(diag["actual_decrease"]) < 0
    assert float(diag["rho"]) > 0
    assert not bool(diag["accepted"])
    # A step that raised the loss is rejected with or without a threshold on ρ.
    keep = pi_muon(mlp_apply, losses.softmax_cross_entropy, 2.0, fusion=fixed_lambda(0.0), **kwargs)
    step2, keep_state = keep.update(grads_of(params, batch), keep.init(params), params, batch=batch)
    assert not bool(keep_state.diagnostics["accepted"])
    jax.tree.map(np.testing.assert_array_equal, step, step2)
    u, _ = muon(2.0).update(grads_of(params, batch), muon(2.0).init(params), params)
    # the parabola's cut τu (τ ≤ 1/2) is checked on the same loss: here it is no better
    # than L(θ) either, so no step is kept
    full = ravel_pytree(u)[0]
    slope = ravel_pytree(grads_of(params, batch))[0] @ full
    tau = -slope / (2 * (loss(optax.apply_updates(params, u)) - loss(params) - slope))
    assert 0 < tau <= 0.5
    assert loss(jax.tree.map(lambda p, x: p + tau * x, params, u)) >= loss(params)
    assert float(optax.tree_utils.tree_norm(step)) == 0.0
    assert loss(params) < loss(optax.apply_updates(params, u))


def test_the_fallback_of_the_issue_is_checked_not_taken_blindly():
    """The reported case: λ = 0.3, learning rate 2, Muon's length, fallback Muon's
    full step — worse than the rejected step. Now the fallback is checked on the
    same loss and, being worse than L(θ), replaced by no step."""
    params, batch = softmax_regression(seed=3)
    fresh = softmax_regression(seed=4)[1]
    tx = pi_muon(softmax_apply, losses.softmax_cross_entropy, 2.0, fusion=fixed_lambda(0.3, 0.0),
                 muon_step_length="muon", rejected="muon", gradient="given", parallel="interpolate")
    step, state = tx.update(grads_of_softmax(params, batch), tx.init(params), params, batch=batch,
                            line_search_batch=fresh)
    before = float(losses.softmax_cross_entropy(softmax_apply(params, fresh[0]), fresh[1]))
    after = float(losses.softmax_cross_entropy(softmax_apply(optax.apply_updates(params, step), fresh[0]),
                                               fresh[1]))
    assert not bool(state.diagnostics["accepted"])
    assert after <= before


def softmax_regression(seed, n=32, d=6, k=5):
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(rng.normal(size=(d, k)) / np.sqrt(d), jnp.float32),
              "b": jnp.zeros((k,), jnp.float32)}
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    teacher = np.random.default_rng(0).normal(size=(d, k))
    y = jnp.asarray(np.argmax(np.asarray(x) @ teacher + rng.gumbel(size=(n, k)), axis=1))
    return params, (x, y)


def softmax_apply(params, x):
    return x @ params["w"] + params["b"]


def grads_of_softmax(params, batch):
    return jax.grad(lambda p: losses.softmax_cross_entropy(softmax_apply(p, batch[0]), batch[1]))(params)


@given(seed=st.integers(0, 2**16), lr=st.sampled_from([0.02, 0.3, 2.0, 8.0]),
       lam=st.sampled_from([0.0, 0.1, 0.3, 1.0]), muon_length=st.sampled_from(["muon", "model"]),
       rejected=st.sampled_from(["parabola", "muon"]), threshold=st.sampled_from([None, 0.0, 0.5]),
       parallel=st.sampled_from(["interpolate", "muon", "plane"]))
def test_no_kept_step_raises_the_fresh_batch_loss(seed, lr, lam, muon_length, rejected, threshold,
                                                   parallel):
    params, batch = softmax_regression(seed)
    fresh = softmax_regression(seed + 1)[1]
    tx = pi_muon(softmax_apply, losses.softmax_cross_entropy, lr, fusion=fixed_lambda(lam, threshold),
                 muon_step_length=muon_length, rejected=rejected, parallel=parallel, gradient="given",
                 solver=gnopt.solvers.cg(max_iters=5))
    state = tx.init(params)
    fresh_loss = lambda p: float(losses.softmax_cross_entropy(softmax_apply(p, fresh[0]), fresh[1]))
    for _ in range(3):
        step, state = tx.update(grads_of_softmax(params, batch), state, params, batch=batch,
                                line_search_batch=fresh)
        new = optax.apply_updates(params, step)
        assert fresh_loss(new) <= fresh_loss(params) * (1 + 1e-6), dict(state.diagnostics)
        params = new


def f64_problem(seed=0, trust_seed=2):
    params, batch = mlp_batch(seed=seed, n=16)
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    batch = (batch[0].astype(jnp.float64), batch[1])
    trust = mlp_batch(seed=trust_seed, n=16)[1]
    return params, batch, (trust[0].astype(jnp.float64), trust[1])


def dense_plane(params, trust, u, perp):
    """``(b, M)`` of the GN model on ``span{u, s⊥}`` from the dense GGN and ``jax.grad``."""
    g_dense, _, _ = dense_ggn(mlp_apply, losses.softmax_cross_entropy, params, trust)
    basis = np.stack([np.asarray(ravel_pytree(u)[0]), np.asarray(ravel_pytree(perp)[0])], axis=1)
    grad = np.asarray(ravel_pytree(grads_of(params, trust))[0])
    return basis, basis.T @ grad, basis.T @ np.asarray(g_dense) @ basis


@pytest.mark.parametrize("lam, mu", [(1.0, 0.0), (0.4, 0.0), (1.0, 0.5)])
def test_plane_coefficients_minimise_the_dense_gn_model_on_the_plane(x64, lam, mu):
    """λ = 1: ``(a, c) = −(M + μ diag M)⁻¹b`` with ``M``, ``b`` from the dense GGN
    on the trust batch; λ < 1: ``c = λ c*`` and ``a`` the best for that ``c``.
    The transform's step is ``a u + c s⊥`` with the same ``u``, ``s``."""
    params, batch, trust = f64_problem(trust_seed=3)
    solver = gnopt.solvers.cg(max_iters=30)
    curv = gnopt.curvature.layerwise()
    u, _ = muon(0.02).update(grads_of(params, batch), muon(0.02).init(params), params)
    s, _ = solver.solve(mlp_apply, losses.softmax_cross_entropy, curv, params, batch,
                        jax.tree.map(jnp.zeros_like, params), 1e-4)
    _, perp = split_whole(s, u)
    basis, b, m = dense_plane(params, trust, u, perp)
    damped = m + mu * np.diag(np.diag(m))
    a_star, c_star = np.linalg.solve(damped, -b)
    lam = float(np.float32(lam))  # the controller's λ is float32
    c_exp = lam * c_star
    a_exp = -(b[0] + m[0, 1] * c_exp) / damped[0, 0]
    model = gnopt.curvature.LinearisedModel(mlp_apply, losses.softmax_cross_entropy, params, trust)
    plane = plane_coefficients(model, u, perp, lam, mu)
    ok, a, c, beta = plane.ok, plane.a, plane.c, plane.beta
    assert bool(ok)
    np.testing.assert_allclose([float(a), float(c)], [a_exp, c_exp], rtol=1e-8)
    assert float(beta) == pytest.approx(float(np.clip(-b[0] / m[0, 0], 0, 1)), rel=1e-8)
    z = np.array([a_exp, c_exp])  # the step's slope and curvature, for ρ without a tangent pass
    assert float(plane.slope) == pytest.approx(b @ z, rel=1e-8)
    assert float(plane.curvature) == pytest.approx(z @ m @ z, rel=1e-8)
    if lam == 1.0:  # the joint minimiser: the model's gradient vanishes on the plane
        np.testing.assert_allclose(damped @ [float(a), float(c)] + b, 0.0, atol=1e-10 * np.abs(b).max())
    tx = pi_muon(mlp_apply, losses.softmax_cross_entropy, 0.02, solver=solver, curvature=curv,
                 fusion=fixed_lambda(lam), damping=1e-4, parallel="plane", gradient="given",
                 plane_damping=mu)
    step, state = tx.update(grads_of(params, batch), tx.init(params), params, batch=batch,
                            line_search_batch=trust)
    diag = state.diagnostics
    assert float(diag["plane_a"]) == pytest.approx(a_exp, rel=1e-6)  # logged in f32
    assert float(diag["plane_c"]) == pytest.approx(c_exp, rel=1e-6)
    assert bool(diag["accepted"])
    assert float(diag["predicted_decrease"]) == pytest.approx(-(b @ z + 0.5 * z @ m @ z), rel=1e-6)
    np.testing.assert_allclose(ravel_pytree(step)[0], basis @ [a_exp, c_exp], rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_a_zero_base_step_leaves_the_gn_step_on_the_plane(x64, lam):
    """``u = 0`` (SOAP's first step): ``M`` is singular, and the step is ``λ γ s``,
    ``γ = clip(−gᵀs/sᵀGs, 0, 1)`` from the dense GGN of the trust batch (not zero)."""
    params, batch, trust = f64_problem(trust_seed=3)
    s, _ = gnopt.solvers.cg(max_iters=30).solve(
        mlp_apply, losses.softmax_cross_entropy, gnopt.curvature.layerwise(), params, batch,
        jax.tree.map(jnp.zeros_like, params), 1e-4)
    u = jax.tree.map(jnp.zeros_like, params)
    _, perp = split_whole(s, u)
    g_dense, _, _ = dense_ggn(mlp_apply, losses.softmax_cross_entropy, params, trust)
    grad = ravel_pytree(grads_of(params, trust))[0]
    s_flat = ravel_pytree(s)[0]
    gamma = float(np.clip(-(grad @ s_flat) / (s_flat @ g_dense @ s_flat), 0.0, 1.0))
    model = gnopt.curvature.LinearisedModel(mlp_apply, losses.softmax_cross_entropy, params, trust)
    plane = plane_coefficients(model, u, perp, lam)
    assert bool(plane.ok) and float(plane.a) == 0.0 and float(plane.beta) == 0.0
    assert 0.0 < gamma and float(plane.c) == pytest.approx(lam * gamma, rel=1e-8)
    step = lam * gamma * s_flat
    assert float(plane.slope) == pytest.approx(float(grad @ step), rel=1e-8)
    assert float(plane.curvature) == pytest.approx(float(step @ g_dense @ step), rel=1e-8)


def test_plane_with_zero_lambda_is_muons_direction_at_the_model_length(x64):
    """λ ≡ 0: the step is ``a u``, ``a = −gᵀu/uᵀGu`` (dense) on the trust batch,
    unclipped (here ``a > 1``: Muon's small η undershoots)."""
    params, batch, trust = f64_problem(trust_seed=1)
    tx = pi_muon(mlp_apply, losses.softmax_cross_entropy, 1e-3, fusion=zero_lambda(), gradient="given",
                 parallel="plane")
    step, state = tx.update(grads_of(params, batch), tx.init(params), params, batch=batch,
                            line_search_batch=trust)
    u, _ = muon(1e-3).update(grads_of(params, batch), muon(1e-3).init(params), params)
    g_dense, _, _ = dense_ggn(mlp_apply, losses.softmax_cross_entropy, params, trust)
    grad = ravel_pytree(grads_of(params, trust))[0]
    u_flat = ravel_pytree(u)[0]
    a = float(-(grad @ u_flat) / (u_flat @ g_dense @ u_flat))
    assert a > 1.0
    assert bool(state.diagnostics["accepted"])
    assert float(state.diagnostics["plane_a"]) == pytest.approx(a, rel=1e-6)
    assert float(state.diagnostics["plane_c"]) == 0.0
    np.testing.assert_allclose(ravel_pytree(step)[0], a * u_flat, rtol=1e-8, atol=1e-12)


def test_plane_step_beats_interpolate_and_muon_on_a_quadratic(x64):
    """λ ≡ 1 on least squares (model exact, ρ = 1): one plane step lowers the loss
    at least as much as the interpolate step and Muon's (both lie in the plane)."""
    params, batch, _ = centred_least_squares()
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    batch = jax.tree.map(lambda x: x.astype(jnp.float64), batch)
    apply_fn = lambda p, x: x @ p["w"] + p["b"]
    loss = lambda p: float(losses.mean_squared_error(apply_fn(p, batch[0]), batch[1]))
    grads = jax.grad(lambda p: losses.mean_squared_error(apply_fn(p, batch[0]), batch[1]))(params)
    after = {}
    for name, kwargs in {"plane": dict(parallel="plane", fusion=fixed_lambda(1.0)),
                         "interpolate": dict(fusion=fixed_lambda(1.0)),
                         "muon_model": dict(fusion=zero_lambda()),
                         "muon": dict(fusion=zero_lambda(), muon_step_length="muon")}.items():
        tx = pi_muon(apply_fn, losses.mean_squared_error, 0.02, solver=gnopt.solvers.cg(max_iters=3),
                     damping=1e-3, gradient="given", **kwargs)
        step, state = tx.update(grads, tx.init(params), params, batch=batch)
        after[name] = loss(optax.apply_updates(params, step))
        if name == "plane":
            assert float(state.diagnostics["rho"]) == pytest.approx(1.0, abs=1e-6)
    assert after["plane"] <= min(after["interpolate"], after["muon_model"], after["muon"]) * (1 + 1e-12)
    assert after["plane"] < loss(params)


@given(seed=st.integers(0, 2**31 - 1))
def test_the_whole_split_keeps_s_in_the_plane(x64, seed):
    rng = np.random.default_rng(seed)
    s = {"w": jnp.asarray(rng.normal(size=(3, 4))), "b": jnp.asarray(rng.normal(size=(4,)))}
    u = {"w": jnp.asarray(rng.normal(size=(3, 4))), "b": jnp.asarray(rng.normal(size=(4,)))}
    c, perp = split_whole(s, u)
    assert abs(float(optax.tree_utils.tree_vdot(perp, u))) <= 1e-12 * float(
        optax.tree_utils.tree_norm(s) * optax.tree_utils.tree_norm(u))
    jax.tree.map(lambda a, b, x: np.testing.assert_allclose(c * a + b, x, atol=1e-12), u, perp, s)


def test_length_correction_limits_and_bad_measurements():
    kappa = _length_correction(jnp.asarray([0.1, 0.8, 1.0, 5.0, -1.0, 0.0, jnp.nan, jnp.inf]), 0.5, 2.0)
    np.testing.assert_allclose(kappa, [2.0, 1.25, 1.0, 0.5, 2.0, 2.0, 0.5, 0.5])


@given(seed=st.integers(0, 2**31 - 1), zero_u=st.booleans())
def test_perpendicular_part_is_orthogonal_per_leaf(x64, seed, zero_u):
    rng = np.random.default_rng(seed)
    shapes = {"w": (3, 4), "b": (4,), "v": (2, 2, 2)}
    s = {k: jnp.asarray(rng.normal(size=v)) for k, v in shapes.items()}
    u = {k: jnp.asarray(rng.normal(size=v)) * (0.0 if zero_u and k == "b" else 1.0) for k, v in shapes.items()}
    c, perp = split_along(s, u)
    for k in shapes:
        assert abs(float(jnp.vdot(perp[k], u[k]))) <= 1e-12 * float(jnp.linalg.norm(s[k]) * jnp.linalg.norm(u[k]) + 1)
        np.testing.assert_allclose(c[k] * u[k] + perp[k], s[k], atol=1e-12)
    if zero_u:
        np.testing.assert_array_equal(perp["b"], s["b"])


def test_lambda_stays_in_limits_and_diagnostics_are_logged():
    params, batch = mlp_batch()
    tx = pi_muon(mlp_apply, losses.softmax_cross_entropy, 0.05,
                 fusion=fusion_weight_controller(lambda_max=0.7, kp=2.0, ki=1.0),
                 damping=gnopt.control.damping_controller(damping0=1e-2))
    state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(grads_of(p, batch), s, p, batch=batch))
    start = float(losses.softmax_cross_entropy(mlp_apply(params, batch[0]), batch[1]))
    for _ in range(6):
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
        lam = float(state.diagnostics["lambda"])
        assert 0.0 <= lam <= 0.7
    assert {"lambda", "rho", "perp_ratio", "cg_iterations", "damping"} <= set(state.diagnostics)
    assert float(losses.softmax_cross_entropy(mlp_apply(params, batch[0]), batch[1])) < start


def centred_least_squares(seed=0, n=64, d=8, k=4):
    """A quadratic whose GN model is exact (ρ = 1) and whose layers decouple."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * np.logspace(0, 1.5, d)
    x -= x.mean(0)
    y = x @ rng.normal(size=(d, k)) + 0.1 * rng.normal(size=(n, k))
    params = {"w": jnp.zeros((d, k)), "b": jnp.zeros((k,))}
    exact = np.linalg.lstsq(np.c_[x, np.ones(n)], y, rcond=None)[0]
    return params, (jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)), exact


def steps_to_tolerance(tx, params, batch, exact, tol=1e-3, max_steps=20):
    apply_fn = lambda p, x: x @ p["w"] + p["b"]
    loss = lambda p: losses.mean_squared_error(apply_fn(p, batch[0]), batch[1])
    best = float(losses.mean_squared_error(jnp.c_[batch[0], jnp.ones(len(batch[0]))] @ exact, batch[1]))
    gap0 = float(loss(params)) - best
    step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p, batch=batch))
    state = tx.init(params)
    for t in range(1, max_steps + 1):
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
        if float(loss(params)) - best <= tol * gap0:
            return t, state
    return max_steps + 1, state


def test_converges_like_layerwise_gn_on_a_quadratic():
    params, batch, exact = centred_least_squares()
    apply_fn = lambda p, x: x @ p["w"] + p["b"]
    lwgn = gnopt.gauss_newton(apply_fn, losses.mean_squared_error, solver=gnopt.solvers.cg(max_iters=20),
                              curvature=gnopt.curvature.layerwise(), line_search=gnopt.line_search.grid(10))
    gn_steps, _ = steps_to_tolerance(lwgn, params, batch, exact)
    assert gn_steps <= 2
    solver = gnopt.solvers.cg(max_iters=20)
    # ρ = 1 keeps λ at its limit: from λ0 = λ_max the step is the layerwise GN step.
    optimistic = pi_muon(apply_fn, losses.mean_squared_error, 0.02, solver=solver, damping=1e-3,
                         fusion=fusion_weight_controller(lambda0=1.0))
    pi_steps, state = steps_to_tolerance(optimistic, params, batch, exact)
    assert pi_steps <= gn_steps
    assert float(state.diagnostics["rho"]) == pytest.approx(1.0, abs=1e-3)
    assert float(state.length_correction) == pytest.approx(1.0, abs=1e-3)  # loss = model: r = 1
    # From the default λ0 = 0.5 the controller ramps λ up; the ramp bounds the extra steps.
    default_steps, state = steps_to_tolerance(
        pi_muon(apply_fn, losses.mean_squared_error, 0.02, solver=solver, damping=1e-3),
        params, batch, exact)
    assert default_steps <= gn_steps + 5
    # §3 as written (u + λ s⊥) keeps Muon's component along u and does not converge like GN:
    literal, _ = steps_to_tolerance(
        pi_muon(apply_fn, losses.mean_squared_error, 0.02, solver=solver, parallel="muon", damping=1e-3,
                fusion=fusion_weight_controller(lambda0=1.0)), params, batch, exact)
    assert literal > gn_steps + 5


def test_errors():
    params, batch = mlp_batch(n=8)
    with pytest.raises(ValueError, match="parallel"):
        pi_muon(mlp_apply, losses.softmax_cross_entropy, parallel="sideways")
    with pytest.raises(ValueError, match="plane_damping"):
        pi_muon(mlp_apply, losses.softmax_cross_entropy, parallel="plane", plane_damping=-1.0)
    with pytest.raises(ValueError, match="gn_step_length"):
        pi_muon(mlp_apply, losses.softmax_cross_entropy, gn_step_length="line_search")
    with pytest.raises(ValueError, match="rejected"):
        pi_muon(mlp_apply, losses.softmax_cross_entropy, rejected="skip")
    with pytest.raises(ValueError, match="gradient"):
        pi_muon(mlp_apply, losses.softmax_cross_entropy, gradient="numerical")
    with pytest.raises(ValueError, match="muon_step_length"):
        pi_muon(mlp_apply, losses.softmax_cross_entropy, muon_step_length="fixed")
    with pytest.raises(ValueError, match="correction_limits"):
        pi_muon(mlp_apply, losses.softmax_cross_entropy, correction_limits=(2.0, 4.0))
    with pytest.raises(ValueError, match="batch="):
        tx = pi_muon(mlp_apply, losses.softmax_cross_entropy)
        tx.update(params, tx.init(params), params)
