"""The ``gauss_newton`` transform: optax contract, chaining, jit, convergence."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gnopt
from gnopt.metrics import find_diagnostics
from gnopt import losses
from gnopt.transforms.line_search_step import tree_loss
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
    assert set(find_diagnostics(state)) >= {"loss_before", "step_size"}


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
    tx = gnopt.gauss_newton(mlp_apply, losses.softmax_cross_entropy,
                            line_search=gnopt.line_search.grid(3))
    state = tx.init(params)
    with pytest.raises(ValueError, match="batch="):
        tx.update(None, state, params)
    other = (batch[0][::-1], batch[1][::-1][:16])
    _, state = tx.update(None, state, params, batch=batch, line_search_batch=other)
    start = losses.softmax_cross_entropy(mlp_apply(params, other[0]), other[1])
    assert float(find_diagnostics(state)["loss_before"]) == pytest.approx(float(start))
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
        seen.append((float(find_diagnostics(state)["damping"]), float(find_diagnostics(state)["rho"])))
    dampings = [d for d, _ in seen]
    assert all(r > 0.5 for _, r in seen), seen
    assert dampings == sorted(dampings, reverse=True) and dampings[-1] < dampings[0], seen
    assert float(state.controller.output) >= 1e-4


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


# --- Levenberg–Marquardt: rejected steps are not applied and raise the damping.
# Jennrich–Sampson (Moré, Garbow & Hillstrom 1981, problem 6): m = 10, x0 = (0.3, 0.4),
# f* = Σr² = 124.362 at the published minimiser; a problem on which the GN step from x0
# overshoots badly, so an LM method must reject steps on its way.

def jennrich_sampson(x, inputs):
    del inputs
    i = jnp.arange(1.0, 11.0, dtype=x.dtype)
    return 2 + 2 * i - (jnp.exp(i * x[0]) + jnp.exp(i * x[1]))


def half_sum_of_squares(r, targets):
    del targets
    return 0.5 * jnp.sum(r ** 2)


def run_lm(tx, steps=60):
    x = jnp.array([0.3, 0.4])
    batch = (jnp.zeros((10, 1)), jnp.zeros((10,)))
    step = jax.jit(lambda x, s: tx.update(None, s, x, batch=batch))
    state, losses_, records = tx.init(x), [], []
    for _ in range(steps):
        updates, new_state = step(x, state)
        records.append((x, updates, state, new_state))
        x, state = x + updates, new_state
        losses_.append(float(half_sum_of_squares(jennrich_sampson(x, None), None)))
    return losses_, records


@pytest.mark.parametrize("setting", ["backtracking_pi", "pi_reject", "nielsen"])
def test_levenberg_marquardt_rejects_and_reaches_the_published_minimum(x64, setting):
    kwargs = {
        "backtracking_pi": dict(line_search=gnopt.line_search.backtracking(),
                                damping=gnopt.control.damping_controller(damping0=1e-3)),
        "pi_reject": dict(damping=gnopt.control.damping_controller(damping0=1e-3, reject_below=0.0)),
        "nielsen": dict(damping=gnopt.control.nielsen_damping(1e-3)),
    }[setting]
    tx = gnopt.gauss_newton(jennrich_sampson, half_sum_of_squares, solver=gnopt.solvers.cg(max_iters=20),
                            curvature=gnopt.curvature.full(), **kwargs)
    losses_, records = run_lm(tx)
    start = float(half_sum_of_squares(jennrich_sampson(jnp.array([0.3, 0.4]), None), None))
    assert np.all(np.diff([start] + losses_) <= 1e-9 * start), "a kept step raised the loss"
    assert 2 * losses_[-1] == pytest.approx(124.362, rel=1e-5)
    rejected = [r for r in records if not bool(find_diagnostics(r[3])["accepted"])]
    assert rejected, "Jennrich–Sampson's first GN steps overshoot: some must be rejected"
    for _, updates, before, after in rejected:
        assert float(jnp.max(jnp.abs(updates))) == 0.0  # the parameters stay put
        assert float(after.controller.output) > float(before.controller.output) or \
            float(after.controller.output) == pytest.approx(float(before.controller.output), rel=1e-6)
        assert float(find_diagnostics(after)["update_norm"]) == 0.0
    # the next solve uses the raised damping
    _, _, _, after = rejected[0]
    nxt = next(r for r in records if r[2] is after)
    assert float(find_diagnostics(nxt[3])["damping"]) == float(after.controller.output)


class CountState(NamedTuple):
    output: jax.Array
    count: jax.Array


class RejectEveryOther(gnopt.control.AbstractController):
    """A user's controller: fixed δ, rejects every second step whatever ρ is."""

    def init(self):
        return CountState(jnp.asarray(1e-3), jnp.zeros((), jnp.int32))

    def update(self, state, measurement, accept=True):
        keep = (state.count % 2 == 0) & accept
        return CountState(state.output, state.count + 1), keep

    @property
    def rejects(self):
        return True


def test_any_controllers_accept_decision_is_honoured():
    params, batch = problem()
    tx = gnopt.gauss_newton(mlp_apply, losses.softmax_cross_entropy, solver=gnopt.solvers.cg(max_iters=5),
                            damping=RejectEveryOther())
    state = tx.init(params)
    for k in range(4):
        updates, state = tx.update(None, state, params, batch=batch)
        norm = float(optax.tree_utils.tree_norm(updates))
        assert (norm > 0) == (k % 2 == 0), (k, norm)
        assert float(find_diagnostics(state)["accepted"]) == float(k % 2 == 0)
        if k % 2 == 1:  # a rejected step is not retried from its own direction
            assert not bool(state.accepted)  # so the next solve starts from zero
        params = optax.apply_updates(params, updates)


def test_a_rejected_line_search_counts_as_a_rejection_for_the_damping():
    """α = 0 (no decrease found) raises δ; before, ρ of the zero step read as 1 and δ fell."""
    params, batch = problem()
    always_worse = gnopt.line_search.grid(num=1, scale=1e6)  # a huge step: the loss rises
    ctl = gnopt.control.damping_controller(damping0=1.0)
    tx = gnopt.gauss_newton(mlp_apply, losses.softmax_cross_entropy, solver=gnopt.solvers.cg(max_iters=5),
                            line_search=always_worse, damping=ctl)
    state = tx.init(params)
    updates, state = tx.update(None, state, params, batch=batch)
    assert float(optax.tree_utils.tree_norm(updates)) == 0.0
    assert not bool(find_diagnostics(state)["accepted"])
    assert float(state.controller.output) > 1.0


class NaNDamping(gnopt.control.AbstractController):
    def init(self):
        return CountState(jnp.asarray(jnp.nan), jnp.zeros((), jnp.int32))

    def update(self, state, measurement, accept=True):
        return state, jnp.asarray(accept, bool)

    @property
    def rejects(self):
        return False


def test_non_finite_damping_is_refused_or_reported():
    with pytest.raises(ValueError, match="gauss_newton: damping must be a finite number >= 0, got nan"):
        gnopt.gauss_newton(mlp_apply, losses.softmax_cross_entropy, damping=float("nan"))
    with pytest.raises(ValueError, match="damping"):
        gnopt.gauss_newton(mlp_apply, losses.softmax_cross_entropy, damping=-1.0)
    params, batch = problem()
    tx = gnopt.gauss_newton(mlp_apply, losses.softmax_cross_entropy, damping=NaNDamping())
    updates, state = tx.update(None, tx.init(params), params, batch=batch)
    assert float(optax.tree_utils.tree_norm(updates)) == 0.0
    assert not bool(find_diagnostics(state)["accepted"])
    assert np.isnan(float(find_diagnostics(state)["damping"]))


@pytest.mark.parametrize("kwargs, message", [
    (dict(learning_rate="0.1"), "gauss_newton: learning_rate must be a finite number >= 0, got '0.1'"),
    (dict(learning_rate=-1.0), "gauss_newton: learning_rate must be"),
    (dict(warm_start=1.5), "gauss_newton: warm_start must be"),
    (dict(loss_chunk_size=0), "gauss_newton: loss_chunk_size must be an integer >= 1"),
])
def test_bad_hyperparameters_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        gnopt.gauss_newton(mlp_apply, losses.softmax_cross_entropy, **kwargs)
