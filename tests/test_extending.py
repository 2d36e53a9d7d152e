"""The examples of docs/extending.md, run as written: a new curvature (the GNB
diagonal) and a new solver (blockwise steepest descent), each ≤ 40 lines."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gnopt
import gnopt.testing as gt
from gnopt.curvature import default_block_labels, full, layerwise
from tests.test_ggn import mlp_apply, mlp_problem

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "extending.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


def _load():
    assert len(BLOCKS) == 2
    namespace = {}
    for code in BLOCKS:
        assert len(code.strip().splitlines()) <= 40, code
        exec(compile(code, str(DOC), "exec"), namespace)
    return namespace


NS = _load()
GNBCurvature, SteepestDescent = NS["GNBCurvature"], NS["SteepestDescent"]


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
