"""The GN model as an operator pytree: restricted (pruned) layerwise passes equal
today's zero-filled ones, solvers run on any operator, and a new curvature
(the empirical Fisher, gnopt/curvature/extra.py) passes the property suite."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st
from jax.flatten_util import ravel_pytree

import gnopt
import gnopt.testing as gt
from gnopt import losses
from gnopt.curvature import BlockDiagonal, LinearisedModel, default_block_labels, full, layerwise
from gnopt.curvature.extra import EmpiricalFisher, empirical_fisher
from gnopt.bench.layerwise import ZeroFilledLayerwise, flop_row, matmul_floor
from tests.test_ggn import mlp_apply, mlp_problem

CE = losses.softmax_cross_entropy


def tiny_llama(masked=False, seed=3):
    from gnopt.models import LLaMA, llama_config

    cfg = llama_config("tiny", vocab_size=11, d_model=8, n_layers=2, n_heads=2, d_ff=12, seq_len=6)
    model = jax.tree.map(lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                         LLaMA(cfg, key=jax.random.key(seed)))
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, 11, size=(4, 6)), jnp.int32)
    labels = jnp.asarray(rng.integers(0, 11, size=(4, 6)), jnp.int32)
    targets = (labels, jnp.asarray(rng.integers(0, 2, size=(4, 6))).at[:, 0].set(1)) if masked else labels
    return model, (tokens, targets), (lambda m, x: m(x))


def _problem(name):  # built inside the test, where float64 is on
    if name == "mlp":
        params, batch, loss_fn = mlp_problem(5, "ce")
        return mlp_apply, loss_fn, params, batch
    model, batch, apply_fn = tiny_llama(masked=True)
    return apply_fn, CE, model, batch


def _close(a, b, rtol=1e-10, atol=1e-13):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def _random_like(tree, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), tree)


@pytest.mark.parametrize("name", ["mlp", "tiny_llama"])
def test_restricted_layerwise_equals_zero_filled(x64, name):
    apply_fn, loss_fn, params, batch = _problem(name)
    new = layerwise().linearise(apply_fn, loss_fn, params, batch)
    old = ZeroFilledLayerwise().linearise(apply_fn, loss_fn, params, batch)
    assert isinstance(new, BlockDiagonal) and new.num_blocks == old.num_blocks > 1
    v = _random_like(params, 0)
    _close(new.mv(v), old.mv(v))
    for objective in ("quadratic", "prox_linear"):
        terms = new.quadratic_terms if objective == "quadratic" else new.prox_linear_terms
        ref = old.quadratic_terms if objective == "quadratic" else old.prox_linear_terms
        _close(terms(v), ref(v))
    # the legacy LinearisedModel(blocks=...) interface agrees too
    legacy = LinearisedModel(apply_fn, loss_fn, params, batch, default_block_labels)
    _close(legacy.ggn_mvp(v), old.mv(v))
    values, cots = legacy.model_terms(v, "quadratic")
    _close((values, legacy.block_pullback(cots)), old.quadratic_terms(v))
    _close(legacy.quadratic(v, 0.1), old.quadratic_terms(v)[0] + 0.05 * old.block_vdot(v, v))


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_matmul_floor_agrees_with_xla_and_bounds_the_restricted_product(mlp):
    """XLA's FLOP count (an account we did not write) is the floor's full product, to
    the elementwise work, and never goes below its layerwise floor, at a shape where
    the matrix products dominate: the restricted passes skip all the floor allows."""
    config = gnopt.models.LLaMAConfig(vocab_size=2048, d_model=256, n_layers=3, n_heads=4,
                                      d_ff=1024, seq_len=64, mlp=mlp)
    row = flop_row(config, batch=1, seq=64)
    # multiply-adds per token -> FLOPs of the 64 tokens
    full, floor = (2 * 64 * x for x in matmul_floor(config, 64))
    assert row["full"] == pytest.approx(full, rel=0.02)
    assert floor <= row["layerwise_restricted"] <= 1.02 * floor
    assert row["layerwise_zero_filled"] > 1.1 * floor
    assert row["matmul_floor_over_full"] == pytest.approx(floor / full)


@pytest.mark.parametrize("name", ["mlp", "tiny_llama"])
def test_solvers_equal_todays_outputs(x64, name):
    apply_fn, loss_fn, params, batch = _problem(name)
    delta0 = jax.tree.map(lambda x: 0.01 * x, _random_like(params, 1))
    solvers = [gnopt.solvers.cg(max_iters=8),
               gnopt.solvers.inner_optimizer(gnopt.inner_adamw(1e-2), inner_batch_size=2),
               gnopt.solvers.prox_linear(gnopt.inner_adamw(1e-2), inner_batch_size=2)]
    for solver in solvers:
        new = solver.solve_with_gradient(apply_fn, loss_fn, layerwise(), params, batch, delta0, 1e-3)
        old = solver.solve_with_gradient(apply_fn, loss_fn, ZeroFilledLayerwise(), params, batch,
                                         delta0, 1e-3)
        _close(new, old, rtol=1e-9, atol=1e-12)


def test_cg_minimise_takes_only_an_operator(x64):
    """CG on (operator, g, Δ0, δ) solves the damped system blockwise."""
    params, batch, loss_fn = mlp_problem(2, "mse")
    op = layerwise().linearise(mlp_apply, loss_fn, params, batch)
    g = op.gradient()
    delta, stats = gnopt.solvers.cg(max_iters=200, residual_tol=1e-12, tol=1e-14).minimise(
        op, g, jax.tree.map(jnp.zeros_like, g), 0.1)
    residual = jax.tree.map(lambda a, d, b: a + 0.1 * d + b, op.mv(delta), delta, g)
    assert max(float(jnp.abs(r).max()) for r in jax.tree.leaves(residual)) < 1e-9


def test_inner_minimise_lowers_the_quadratic(x64):
    params, batch, loss_fn = mlp_problem(2, "ce")
    op = full().linearise(mlp_apply, loss_fn, params, batch)
    solver = gnopt.solvers.inner_optimizer(optax.sgd(0.5), inner_batch_size=2)
    delta, stats = solver.minimise(op, op.gradient(), jax.tree.map(jnp.zeros_like, params), 0.0,
                                   num_steps=30)
    assert float(stats["model_last"]) < float(stats["model_first"]) <= 0.0


# -- the empirical Fisher: a new curvature in one small class ---------------------------

def dense_fisher(apply_fn, loss_fn, params, batch):
    inputs, targets = batch
    flat, unravel = ravel_pytree(params)
    one = lambda f, x, y: loss_fn(apply_fn(unravel(f), x[None]), jax.tree.map(lambda t: t[None], y))
    grads = jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(flat, inputs, targets)
    return grads.T @ grads / grads.shape[0], grads.mean(0), unravel


@pytest.mark.parametrize("masked", [False, True])
def test_empirical_fisher_matches_dense(x64, masked):
    params, batch, loss_fn = mlp_problem(4, "ce", masked=masked)
    f_dense, g_dense, unravel = dense_fisher(mlp_apply, loss_fn, params, batch)
    v = jnp.asarray(np.random.default_rng(0).normal(size=g_dense.shape))
    op = EmpiricalFisher(mlp_apply, loss_fn, params, batch)
    np.testing.assert_allclose(ravel_pytree(op.mv(unravel(v)))[0], f_dense @ v, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(ravel_pytree(op.gradient())[0], g_dense, rtol=1e-10, atol=1e-13)
    blocked = empirical_fisher(default_block_labels).linearise(mlp_apply, loss_fn, params, batch)
    ids = np.asarray(ravel_pytree(jax.tree.unflatten(
        jax.tree.structure(params), [jnp.full(x.shape, float(i)) for x, i in
                                     zip(jax.tree.leaves(params), blocked.block_ids)]))[0])
    mask = ids[:, None] == ids[None, :]
    np.testing.assert_allclose(ravel_pytree(blocked.mv(unravel(v)))[0],
                               np.where(mask, f_dense, 0.0) @ v, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("blocks", [None, default_block_labels], ids=["full", "blocks"])
@pytest.mark.parametrize("solver", [
    gnopt.solvers.cg(max_iters=3),
    gnopt.solvers.inner_optimizer(gnopt.inner_adamw(1e-2), inner_batch_size=4),
], ids=["cg", "inner"])
def test_empirical_fisher_with_every_solver_passes_the_contract(solver, blocks):
    from gnopt.models import MLP

    model = MLP([3, 8, 4], key=jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = (rng.normal(size=(8, 3)).astype(np.float32), rng.integers(0, 4, size=8))
    make = lambda learning_rate: gnopt.gauss_newton(
        lambda m, x: m(x), CE, learning_rate=learning_rate, solver=solver,
        curvature=empirical_fisher(blocks), line_search=gnopt.line_search.backtracking(max_evals=3))
    gt.check_optimizer_contract(make, model, batch=batch, extra_args={"unused_extra": 1.0},
                                hyperparams={"learning_rate": 1e-2})


def test_prox_linear_refuses_the_fisher():
    params, batch, loss_fn = mlp_problem(4, "ce")
    solver = gnopt.solvers.prox_linear(gnopt.inner_adamw(1e-2), inner_batch_size=3)
    with pytest.raises(TypeError, match="prox-linear needs"):
        solver.solve(mlp_apply, loss_fn, empirical_fisher(), params, batch,
                     jax.tree.map(jnp.zeros_like, params), 0.0)


@settings(max_examples=5, deadline=None)
@given(problem=st.one_of(gt.least_squares(), gt.logistic_problems()),
       solver=st.sampled_from(["cg", "inner"]), blocks=st.booleans())
def test_empirical_fisher_descends(problem, solver, blocks):
    make = {"cg": lambda: gnopt.solvers.cg(max_iters=10),
            "inner": lambda: gnopt.solvers.inner_optimizer(gnopt.inner_adamw(1e-2), inner_batch_size=problem.batch[0].shape[0])}[solver]
    gt.check_preconditioner(lambda: gnopt.gauss_newton(
        problem.apply_fn, problem.loss_fn, solver=make(), damping=1e-3,
        curvature=empirical_fisher(default_block_labels if blocks else None),
        line_search=gnopt.line_search.grid(5)), problem, steps=10)


def test_restricted_passes_skip_the_layers_before_each_block():
    """3-layer MLP, 3 blocks: block k's tangent and transpose touch only layers ≥ k.
    dot_generals: primal 3; tangents 3 + 2 + 1; transposes 3 + 2 + 1 (zero-filled: 33)."""
    rng = np.random.default_rng(0)
    params = {"layers": tuple({"w": jnp.asarray(rng.normal(size=(a, b)), jnp.float32),
                               "b": jnp.zeros(b)} for a, b in [(3, 4), (4, 4), (4, 2)])}
    batch = (jnp.ones((5, 3)), jnp.ones((5, 2)))

    def dots(curv):
        fn = lambda p, v: curv.linearise(mlp_apply, losses.mean_squared_error, p, batch).mv(v)
        text = str(jax.make_jaxpr(fn)(params, params))
        return text.count("dot_general[")

    assert dots(full()) == 3 + 5 + 5
    assert dots(layerwise()) == 3 + 6 + 6
    assert dots(ZeroFilledLayerwise()) == 3 + 15 + 15
