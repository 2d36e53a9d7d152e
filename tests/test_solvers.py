"""CG, inner-optimizer and prox-linear solvers on problems with known answers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, strategies as st
from jax.flatten_util import ravel_pytree

import gnopt
from gnopt.metrics import find_diagnostics
from gnopt import losses
from gnopt.curvature import LinearisedModel, full, layerwise
from tests.test_ggn import mlp_apply, mlp_problem


def linear_apply(params, x):
    return x @ params["w"] + params["b"]


def least_squares(seed, n=12, d=4, k=2):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * rng.uniform(0.2, 3.0, size=d)
    y = rng.normal(size=(n, k))
    params = {"w": jnp.asarray(rng.normal(size=(d, k))), "b": jnp.zeros((k,))}
    return params, (jnp.asarray(x), jnp.asarray(y))


def gn_step(params, batch, apply_fn, loss_fn, **kwargs):
    tx = gnopt.gauss_newton(apply_fn, loss_fn, **kwargs)
    updates, state = tx.update(None, tx.init(params), params, batch=batch)
    return optax.apply_updates(params, updates), state


@given(seed=st.integers(0, 2**31 - 1))
def test_cg_lands_on_lstsq(x64, seed):
    params, (x, y) = least_squares(seed)
    dim = x.shape[1] * y.shape[1] + y.shape[1]
    new, state = gn_step(params, (x, y), linear_apply, losses.mean_squared_error,
                         solver=gnopt.solvers.cg(max_iters=dim + 2, residual_tol=1e-12), line_search=None,
                         damping=1e-12)
    design = np.c_[np.asarray(x), np.ones(len(x))]
    exact = np.linalg.lstsq(design, np.asarray(y), rcond=None)[0]
    np.testing.assert_allclose(np.r_[np.asarray(new["w"]), np.asarray(new["b"])[None]], exact,
                               rtol=1e-6, atol=1e-8)
    assert find_diagnostics(state)["cg_iterations"] <= dim + 2


@given(seed=st.integers(0, 2**31 - 1))
def test_gn_equals_newton_on_strictly_convex_quadratic(x64, seed):
    """``L(θ) = ½‖Rθ‖² − bᵀRθ`` through a linear model: one GN step = one Newton step."""
    rng = np.random.default_rng(seed)
    r = jnp.asarray(rng.normal(size=(8, 5)))
    b = jnp.asarray(rng.normal(size=(8,)))
    theta = jnp.asarray(rng.normal(size=(5,)))
    loss_fn = lambda z, t: 0.5 * jnp.sum(z ** 2) - jnp.dot(t, z)  # a generic (autodiff-Hessian) loss
    apply_fn = lambda p, x: x @ p
    new, _ = gn_step(theta, (r, b), apply_fn, loss_fn,
                     solver=gnopt.solvers.cg(max_iters=10, residual_tol=1e-13), line_search=None)
    full_loss = lambda p: loss_fn(apply_fn(p, r), b)
    newton = theta - jnp.linalg.solve(jax.hessian(full_loss)(theta), jax.grad(full_loss)(theta))
    np.testing.assert_allclose(new, newton, rtol=1e-8, atol=1e-10)


@given(seed=st.integers(0, 2**31 - 1), warm=st.booleans(), curvature=st.sampled_from(["full", "layerwise"]))
def test_cg_model_value_never_increases(x64, seed, warm, curvature):
    params, batch, loss_fn = mlp_problem(seed, "ce")
    curv = full() if curvature == "full" else layerwise()
    delta0 = jax.tree.map(lambda p: 0.05 * jnp.ones_like(p), params) if warm else jax.tree.map(jnp.zeros_like, params)
    solver = gnopt.solvers.cg(max_iters=15)
    delta, stats = solver.solve(mlp_apply, loss_fn, curv, params, batch, delta0, 1e-3)
    hist = np.asarray(stats["model_history"])
    assert np.all(np.diff(hist) <= 1e-12 * np.abs(hist[:-1]).max()), hist
    assert hist[-1] <= 0.0
    lin = LinearisedModel(mlp_apply, loss_fn, params, batch, curv.block_fn())
    np.testing.assert_allclose(jnp.sum(lin.quadratic(delta, 1e-3)), hist[-1], rtol=1e-8, atol=1e-12)


def test_cg_relative_progress_stop_triggers():
    params, batch, loss_fn = mlp_problem(1, "ce")
    solver = gnopt.solvers.cg(max_iters=500, tol=1e-2, residual_tol=0.0)
    _, stats = jax.jit(lambda p: solver.solve(mlp_apply, loss_fn, full(), p, batch,
                                              jax.tree.map(jnp.zeros_like, p), 1e-4))(params)
    assert 10 < int(stats["cg_iterations"]) < 500


@given(seed=st.integers(0, 2**31 - 1), curvature=st.sampled_from(["full", "layerwise"]),
       objective=st.sampled_from(["quadratic", "prox_linear"]))
def test_inner_optimizer_lowers_the_quadratic(seed, curvature, objective):
    params, batch, loss_fn = mlp_problem(seed, "ce")
    params = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    batch = (batch[0].astype(jnp.float32), batch[1])
    curv = full() if curvature == "full" else layerwise()
    make = gnopt.solvers.inner_optimizer if objective == "quadratic" else gnopt.solvers.prox_linear
    solver = make(gnopt.inner_adamw(0.05), inner_batch_size=2)
    zero = jax.tree.map(jnp.zeros_like, params)
    delta, stats = solver.solve(mlp_apply, loss_fn, curv, params, batch, zero, 0.0)
    assert int(stats["inner_steps"]) == 3
    lin = LinearisedModel(mlp_apply, loss_fn, params, batch, curv.block_fn())
    assert float(jnp.sum(lin.quadratic(delta))) < 0.0


def test_prox_linear_agrees_with_quadratic_to_second_order(x64):
    """Both inner objectives share value, gradient and curvature at Δ = 0, so
    their SGD iterates differ by O(ε³) for inner step ε (cubic, not quadratic)."""
    params, batch, loss_fn = mlp_problem(5, "ce")
    zero = jax.tree.map(jnp.zeros_like, params)

    def gap(lr):
        sols = [ravel_pytree(make(optax.sgd(lr), inner_batch_size=2).solve(
            mlp_apply, loss_fn, full(), params, batch, zero, 0.0)[0])[0]
            for make in (gnopt.solvers.inner_optimizer, gnopt.solvers.prox_linear)]
        return float(jnp.linalg.norm(sols[0] - sols[1])), float(jnp.linalg.norm(sols[0]))

    (g1, n1), (g2, _) = gap(0.4), gap(0.2)
    assert g1 < 0.05 * n1
    assert 6.0 < g1 / g2 < 10.0  # ≈ 8 = 2³


def test_inner_solver_warm_start_and_schedule():
    schedule = gnopt.schedules.inner_cosine(1.0, 10)
    values = np.array([schedule(i) for i in range(11)])
    assert values[0] == pytest.approx(0.1) and values.max() == pytest.approx(1.0)
    assert values[-1] == pytest.approx(0.0, abs=1e-6)
    assert np.all(np.diff(values[np.argmax(values):]) <= 1e-7)
    with pytest.raises(ValueError, match="inner_batch_size=4 must divide"):
        params, batch, loss_fn = mlp_problem(0, "ce")
        gnopt.solvers.inner_optimizer(optax.sgd(0.1), 4).solve(
            mlp_apply, loss_fn, full(), params, batch, params, 0.0)


def test_rejected_step_resets_the_warm_start():
    params, batch, loss_fn = mlp_problem(3, "ce")
    always_worse = gnopt.line_search.grid(1, scale=1e3)  # a huge step: rejected
    tx = gnopt.gauss_newton(mlp_apply, loss_fn, solver=gnopt.solvers.cg(max_iters=5),
                            line_search=always_worse, damping=1e-3)
    updates, state = tx.update(None, tx.init(params), params, batch=batch)
    assert float(find_diagnostics(state)["step_size"]) == 0.0
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(updates))
    assert not bool(state.accepted)  # the next solve starts from zero (tests/test_combinators.py)


class _NoGradientSolver(gnopt.solvers.AbstractSolver):
    """A solver without its own gradient: exercises the default ``solve_with_gradient``."""

    def solve(self, apply_fn, loss_fn, curvature, params, batch, delta0, damping):
        return delta0, {}


@pytest.mark.parametrize("solver", [
    gnopt.solvers.cg(max_iters=3),
    gnopt.solvers.inner_optimizer(gnopt.inner_muon(0.01), inner_batch_size=2),
    gnopt.solvers.prox_linear(gnopt.inner_adamw(0.01), inner_batch_size=3),
    _NoGradientSolver(),
], ids=["cg", "inner", "prox_linear", "default"])
@pytest.mark.parametrize("curvature", [full(), layerwise()], ids=["full", "layerwise"])
def test_solve_with_gradient_returns_the_batch_gradient(x64, solver, curvature):
    params, batch, loss_fn = mlp_problem(3, "ce")
    zeros = jax.tree.map(jnp.zeros_like, params)
    delta, stats, grad = solver.solve_with_gradient(mlp_apply, loss_fn, curvature, params, batch, zeros, 0.0)
    expected = jax.grad(lambda p: loss_fn(mlp_apply(p, batch[0]), batch[1]))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13), grad, expected)
    plain, plain_stats = solver.solve(mlp_apply, loss_fn, curvature, params, batch, zeros, 0.0)
    jax.tree.map(np.testing.assert_array_equal, delta, plain)
    assert set(stats) == set(plain_stats)
