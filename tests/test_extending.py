"""The examples of docs/extending.md, run as written: the builders as chains, a new
curvature (the GNB diagonal), a new solver (blockwise steepest descent) and a new
controller (Marquardt's rule), each ≤ 40 lines."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gnopt
import gnopt.testing as gt
from gnopt.curvature import default_block_labels, full, layerwise
from tests.test_ggn import mlp_apply, mlp_problem

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "extending.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


def _load():
    assert len(BLOCKS) == 4
    namespace = {}
    for code in BLOCKS:
        assert len(code.strip().splitlines()) <= 40, code
        exec(compile(code, str(DOC), "exec"), namespace)
    return namespace


NS = _load()
GNBCurvature, SteepestDescent = NS["GNBCurvature"], NS["SteepestDescent"]
MarquardtDamping = NS["MarquardtDamping"]


def test_gnb_diagonal_is_n_times_the_sampled_gradient_squared(x64):
    params, batch, loss_fn = mlp_problem(1, "ce")
    op = GNBCurvature(seed=3).linearise(mlp_apply, loss_fn, params, batch)
    logits = mlp_apply(params, batch[0])
    sampled = jax.random.categorical(jax.random.key(3), logits)
    g_hat = jax.grad(lambda p: loss_fn(mlp_apply(p, batch[0]), sampled))(params)
    v = jax.tree.map(lambda x: jnp.ones_like(x) * 0.5, params)
    expected = jax.tree.map(lambda g, x: 6 * g * g * x, g_hat, v)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), op.mv(v), expected)
    grad = jax.grad(lambda p: loss_fn(mlp_apply(p, batch[0]), batch[1]))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), op.gradient(), grad)
    blocked = GNBCurvature(seed=3, blocks=default_block_labels).linearise(mlp_apply, loss_fn, params, batch)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), blocked.mv(v), expected)


@pytest.mark.parametrize("curvature", [full(), layerwise()], ids=["full", "layerwise"])
def test_steepest_descent_approaches_cg(x64, curvature):
    params, batch, loss_fn = mlp_problem(2, "mse")
    op = curvature.linearise(mlp_apply, loss_fn, params, batch)
    g, zeros = op.gradient(), jax.tree.map(jnp.zeros_like, params)
    exact, _ = gnopt.solvers.cg(max_iters=300, tol=1e-14, residual_tol=1e-13).minimise(op, g, zeros, 0.5)
    x, stats = SteepestDescent(iters=2000).minimise(op, g, zeros, 0.5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), x, exact)
    assert float(stats["model_value"]) < 0.0


@pytest.mark.parametrize("solver, curvature", [
    (SteepestDescent(iters=5), layerwise()),
    (gnopt.solvers.cg(max_iters=5), GNBCurvature()),
    (SteepestDescent(iters=5), GNBCurvature(blocks=default_block_labels)),
], ids=["sd_layerwise", "cg_gnb", "sd_gnb_blocks"])
def test_examples_pass_the_contract_and_descend(solver, curvature):
    from gnopt.models import MLP

    model = MLP([3, 8, 4], key=jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = (rng.normal(size=(8, 3)).astype(np.float32), rng.integers(0, 4, size=8))
    ce = gnopt.losses.softmax_cross_entropy
    make = lambda learning_rate: gnopt.gauss_newton(
        lambda m, x: m(x), ce, learning_rate=learning_rate, solver=solver, curvature=curvature,
        damping=1e-3, line_search=gnopt.line_search.backtracking(max_evals=3))
    gt.check_optimizer_contract(make, model, batch=batch, extra_args={"unused_extra": 1.0},
                                hyperparams={"learning_rate": 1e-2})
    problem = gt.Logistic.random(0)
    gt.check_preconditioner(lambda: gnopt.gauss_newton(
        problem.apply_fn, problem.loss_fn, solver=solver, curvature=curvature, damping=1e-3,
        line_search=gnopt.line_search.grid(5)), problem, steps=10)


def _mlp_batch():
    from gnopt.models import MLP

    rng = np.random.default_rng(0)
    model = MLP([3, 8, 4], key=jax.random.key(0))
    return model, (jnp.asarray(rng.normal(size=(16, 3)), jnp.float32),
                   jnp.asarray(rng.integers(0, 4, size=16)))


def _steps(tx, params, batch, n=3):
    state = tx.init(params)
    loss = lambda p: NS["loss_fn"](p(batch[0]), batch[1])
    for _ in range(n):
        updates, state = tx.update(jax.grad(loss)(params), state, params, batch=batch)
        params = optax.apply_updates(params, updates)
    return params, float(loss(params))


def test_the_chain_is_gauss_newton_and_the_fused_soap_descends():
    params, batch = _mlp_batch()
    alias = gnopt.gauss_newton(NS["apply_fn"], NS["loss_fn"], solver=gnopt.solvers.cg(),
                               curvature=layerwise(), line_search=gnopt.line_search.grid(5),
                               damping=gnopt.control.nielsen_damping())
    by_chain, _ = _steps(NS["gn_chain"], params, batch)
    by_alias, _ = _steps(alias, params, batch)
    assert all(bool(jnp.all(a == b)) for a, b in
               zip(jax.tree.leaves(by_chain), jax.tree.leaves(by_alias)))
    start = float(NS["loss_fn"](params(batch[0]), batch[1]))
    assert _steps(NS["soap_gn"], params, batch)[1] < start


def test_marquardt_damping_solves_jennrich_sampson(x64):
    from tests.test_gauss_newton import half_sum_of_squares, jennrich_sampson, run_lm

    tx = gnopt.gauss_newton(jennrich_sampson, half_sum_of_squares,
                            solver=gnopt.solvers.cg(max_iters=20), damping=MarquardtDamping())
    losses, records = run_lm(tx)
    start = float(half_sum_of_squares(jennrich_sampson(jnp.array([0.3, 0.4]), None), None))
    assert np.all(np.diff([start] + losses) <= 1e-9 * start), "a kept step raised the loss"
    assert 2 * losses[-1] == pytest.approx(124.362, rel=1e-5)
    assert any(not bool(r[3].accepted) for r in records)  # it did reject overshooting steps


def test_marquardt_rule_raises_lowers_and_rejects():
    ctl = MarquardtDamping(damping0=1.0)
    for rho, output, keep in [(0.1, 4.0, True), (0.9, 0.5, True), (0.5, 1.0, True),
                              (-1.0, 4.0, False), (jnp.nan, 4.0, False)]:
        state, accept = ctl.update(ctl.init(), jnp.asarray(rho))
        assert (float(state.output), bool(accept)) == (output, keep), rho
    state, accept = ctl.update(ctl.init(), jnp.asarray(0.9), accept=False)
    assert (float(state.output), bool(accept)) == (4.0, False)


def test_a_users_controller_is_pi_muons_damping():
    params, batch = _mlp_batch()
    tx = gnopt.pi_muon(NS["apply_fn"], NS["loss_fn"], 0.02, solver=gnopt.solvers.cg(max_iters=3),
                       damping=MarquardtDamping())
    start = float(NS["loss_fn"](params(batch[0]), batch[1]))
    assert _steps(tx, params, batch)[1] <= start
