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
from gnopt.transforms.pi_muon import pi_muon, split_along
from tests.test_ggn import make_mlp, mlp_apply


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
    pim = pi_muon(mlp_apply, losses.softmax_cross_entropy, 0.02, fusion=zero_lambda(), parallel=parallel)
    ref = muon(0.02)
    p1, p2, s1, s2 = params, params, pim.init(params), ref.init(params)
    for _ in range(3):
        u1, s1 = pim.update(grads_of(p1, batch), s1, p1, batch=batch)
        u2, s2 = ref.update(grads_of(p2, batch), s2, p2)
        jax.tree.map(np.testing.assert_array_equal, u1, u2)
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    assert float(s1.diagnostics["lambda"]) == 0.0


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
    with pytest.raises(ValueError, match="batch="):
        tx = pi_muon(mlp_apply, losses.softmax_cross_entropy)
        tx.update(params, tx.init(params), params)
