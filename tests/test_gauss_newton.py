"""The ``gauss_newton`` transform: optax contract, chaining, jit, convergence."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gnopt
from gnopt import losses
from gnopt.transforms.gauss_newton import tree_loss
from tests.test_ggn import make_mlp, mlp_apply


def problem(dtype=jnp.float32):
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda p: p.astype(dtype), make_mlp(rng, [3, 8, 4]))
    x = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 4, size=16))
    return params, (x, y)


VARIANTS = {
    "cg_full": dict(solver=gnopt.solvers.cg(max_iters=10), damping=1e-3),
    "inner_layerwise": dict(solver=gnopt.solvers.inner_optimizer(optax.sgd(1.0), 4),
                            curvature=gnopt.curvature.layerwise(), line_search=gnopt.line_search.grid(10)),
    "prox_backtracking": dict(solver=gnopt.solvers.prox_linear(gnopt.inner_adamw(0.2), 8),
                              line_search=gnopt.line_search.backtracking()),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_traces_once_ignores_extra_args_and_lowers_loss(name):
    params, batch = problem()
    tx = gnopt.gauss_newton(mlp_apply, losses.softmax_cross_entropy,
                            **{"line_search": gnopt.line_search.grid(), **VARIANTS[name]})
    traces = []

    @jax.jit
    def step(params, state, batch):
        traces.append(1)
        grads = jax.grad(lambda p: losses.softmax_cross_entropy(mlp_apply(p, batch[0]), batch[1]))(params)
        updates, state = tx.update(grads, state, params, batch=batch, some_unused_arg=3.0)
        return optax.apply_updates(params, updates), state

    loss = lambda p: float(losses.softmax_cross_entropy(mlp_apply(p, batch[0]), batch[1]))
    state = tx.init(params)
    start = loss(params)
    shapes0 = jax.tree.map(lambda x: (x.shape, x.dtype), state)
    for _ in range(5):
        params, state = step(params, state, batch)
    assert len(traces) == 1
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == shapes0
    assert loss(params) < 0.8 * start
    assert set(state.diagnostics) >= {"loss_before", "step_size"}


def test_chains_with_clipping_and_inject_hyperparams():
    params, batch = problem()
    make = optax.inject_hyperparams(gnopt.gauss_newton, static_args=("apply_fn", "loss_fn"))
    tx = optax.chain(
        make(apply_fn=mlp_apply, loss_fn=losses.softmax_cross_entropy, learning_rate=0.5,
             line_search=None, solver=gnopt.solvers.cg(max_iters=5), damping=1e-2),
        optax.clip_by_global_norm(0.01))
    state = tx.init(params)
    updates, state = jax.jit(lambda s, p, b: tx.update(p, s, p, batch=b))(state, params, batch)
    assert float(optax.tree.norm(updates)) <= 0.01 + 1e-6
    assert float(state[0].hyperparams["learning_rate"]) == 0.5


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_updates_keep_param_dtype(dtype):
    params, batch = problem(dtype)
    tx = gnopt.gauss_newton(mlp_apply, losses.softmax_cross_entropy, solver=gnopt.solvers.cg(max_iters=3))
    updates, _ = tx.update(None, tx.init(params), params, batch=batch)
    assert jax.tree.map(lambda u: u.dtype, updates) == jax.tree.map(lambda p: p.dtype, params)


def test_line_search_batch_and_missing_batch_error():
    params, batch = problem()
    tx = gnopt.gauss_newton(mlp_apply, losses.softmax_cross_entropy)
    state = tx.init(params)
    with pytest.raises(ValueError, match="batch="):
        tx.update(None, state, params)
    other = (batch[0][::-1], batch[1][::-1][:16])
    _, state = tx.update(None, state, params, batch=batch, line_search_batch=other)
    start = losses.softmax_cross_entropy(mlp_apply(params, other[0]), other[1])
    assert float(state.diagnostics["loss_before"]) == pytest.approx(float(start))
    with pytest.raises(TypeError, match="solver"):
        gnopt.gauss_newton(mlp_apply, losses.softmax_cross_entropy, solver=optax.sgd(1.0))


def test_damping_controller_adapts_levenberg_marquardt_style():
    """A good model (ρ ≈ 1) lowers δ step after step; δ stays within its limits."""
    params, batch = problem()
    ctl = gnopt.control.damping_controller(damping0=10.0, damping_min=1e-4, damping_max=1e3)
    tx = gnopt.gauss_newton(mlp_apply, losses.softmax_cross_entropy, solver=gnopt.solvers.cg(max_iters=10),
                            damping=ctl, line_search=None)
    state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(None, s, p, batch=batch))
    seen = []
    for _ in range(4):
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
        seen.append((float(state.diagnostics["damping"]), float(state.diagnostics["rho"])))
    dampings = [d for d, _ in seen]
    assert all(r > 0.5 for _, r in seen), seen
    assert dampings == sorted(dampings, reverse=True) and dampings[-1] < dampings[0], seen
    assert float(state.damping.output) >= 1e-4


def test_chunked_line_search_loss_equals_full_batch_loss():
    params, batch = problem()
    full_loss = tree_loss(mlp_apply, losses.softmax_cross_entropy, params, batch)
    chunked = tree_loss(mlp_apply, losses.softmax_cross_entropy, params, batch, 4)
    assert float(chunked) == pytest.approx(float(full_loss), rel=1e-6)
    tx = gnopt.gauss_newton(mlp_apply, losses.softmax_cross_entropy, loss_chunk_size=4)
    updates, state = tx.update(None, tx.init(params), params, batch=batch)
    ref = gnopt.gauss_newton(mlp_apply, losses.softmax_cross_entropy)
    ref_updates, _ = ref.update(None, ref.init(params), params, batch=batch)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), updates, ref_updates)
