"""Numbers are data (architecture.md): learning rates, damping, gains and
line-search constants are traced, so ``inject_hyperparams`` works on gnopt's
builders, changing a number never retraces, and a sweep can be ``vmap``-ped."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gnopt
from gnopt.metrics import find_diagnostics
from gnopt import losses
from gnopt.control import PIController, damping_controller, fusion_weight_controller, nielsen_damping
from gnopt.hyperparams import inject_hyperparams, static_args_of
from gnopt.line_search import grid
from tests.test_ggn import make_mlp, mlp_apply

LOSS = losses.softmax_cross_entropy


def problem(seed=0):
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda p: p.astype(jnp.float32), make_mlp(rng, [3, 8, 4]))
    batch = (jnp.asarray(rng.normal(size=(16, 3)), jnp.float32), jnp.asarray(rng.integers(0, 4, size=16)))
    return params, batch


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def zeros(params):
    """Gradients for PI-Muon, which computes its own (``gradient="solver"``)."""
    return jax.tree.map(jnp.zeros_like, params)


def f32(x):
    return jnp.asarray(x, jnp.float32)


def test_static_args_of_builders():
    assert static_args_of(gnopt.gauss_newton) == ("apply_fn", "loss_fn", "loss_chunk_size")
    assert set(static_args_of(gnopt.pi_muon)) == {"apply_fn", "loss_fn", "trust_batch_size", "ns_steps",
                                                  "is_hidden_matrix"}
    assert static_args_of(functools.partial(gnopt.gauss_newton, mlp_apply, LOSS)) == ("loss_chunk_size",)
    assert static_args_of(optax.adam) == ()


def test_inject_hyperparams_gauss_newton_changes_numbers_without_retrace():
    params, batch = problem()
    common = dict(solver=gnopt.solvers.cg(max_iters=5), line_search=grid(3))
    tx = inject_hyperparams(gnopt.gauss_newton)(mlp_apply, LOSS, learning_rate=0.5, damping=1e-2, **common)
    state = tx.init(params)
    assert set(state.hyperparams) == {"learning_rate", "damping", "warm_start"}
    traces = []

    @jax.jit
    def step(params, state):
        traces.append(1)
        return tx.update(None, state, params, batch=batch)

    first, state = step(params, state)
    plain = gnopt.gauss_newton(mlp_apply, LOSS, learning_rate=0.5, damping=1e-2, **common)
    assert_trees_close(first, plain.update(None, plain.init(params), params, batch=batch)[0])

    params = optax.apply_updates(params, first)
    state.hyperparams["learning_rate"] = f32(0.25)
    state.hyperparams["damping"] = f32(0.1)
    second, new_state = step(params, state)
    assert len(traces) == 1
    assert float(new_state.hyperparams["learning_rate"]) == 0.25
    changed = gnopt.gauss_newton(mlp_apply, LOSS, learning_rate=0.25, damping=0.1, **common)
    expected, _ = changed.update(None, state.inner_state, params, batch=batch)
    assert_trees_close(second, expected)


def test_optax_inject_hyperparams_with_the_functions_bound():
    """With optax alone: bind apply_fn and loss_fn first, or name them static."""
    params, batch = problem()
    solver = gnopt.solvers.cg(max_iters=3)
    for make in (optax.inject_hyperparams(functools.partial(gnopt.gauss_newton, mlp_apply, LOSS)),
                 functools.partial(optax.inject_hyperparams(
                     gnopt.gauss_newton, static_args=gnopt.gauss_newton.static_args), mlp_apply, LOSS)):
        tx = make(learning_rate=0.5, damping=1e-2, solver=solver)
        state = tx.init(params)
        updates, state = jax.jit(lambda p, s: tx.update(None, s, p, batch=batch))(params, state)
        assert float(state.hyperparams["learning_rate"]) == 0.5
        assert np.isfinite(float(optax.tree.norm(updates)))


def test_inject_hyperparams_pi_muon_learning_rate_without_retrace():
    params, batch = problem()
    solver = gnopt.solvers.cg(max_iters=3)
    tx = inject_hyperparams(gnopt.pi_muon)(mlp_apply, LOSS, learning_rate=0.02, solver=solver)
    state = tx.init(params)
    assert {"learning_rate", "beta", "weight_decay", "gn_warm_start"} <= set(state.hyperparams)
    traces = []

    @jax.jit
    def step(params, state):
        traces.append(1)
        return tx.update(zeros(params), state, params, batch=batch)

    first, state = step(params, state)
    plain = gnopt.pi_muon(mlp_apply, LOSS, 0.02, solver=solver)
    expected, _ = plain.update(zeros(params), plain.init(params), params, batch=batch)
    assert_trees_close(first, expected, rtol=1e-4)
    params = optax.apply_updates(params, first)
    state.hyperparams["learning_rate"] = f32(0.05)
    second, _ = step(params, state)
    assert len(traces) == 1
    changed = gnopt.pi_muon(mlp_apply, LOSS, 0.05, solver=solver)
    expected, _ = changed.update(zeros(params), state.inner_state, params, batch=batch)
    # the plane's 2×2 solve rounds differently in the jitted and the eager program
    assert_trees_close(second, expected, rtol=1e-4, atol=1e-5)


def test_pi_muon_fusion_gain_changed_with_tree_at_does_not_retrace():
    params, batch = problem()
    solver = gnopt.solvers.cg(max_iters=3)
    traces = []

    @jax.jit
    def step(fusion, params, state):
        traces.append(1)
        tx = gnopt.pi_muon(mlp_apply, LOSS, 0.02, solver=solver, fusion=fusion)
        return tx.update(zeros(params), state, params, batch=batch)

    fusion = fusion_weight_controller(kp=0.2, reject_below=0.0)
    state = gnopt.pi_muon(mlp_apply, LOSS, 0.02, solver=solver, fusion=fusion).init(params)
    outputs = []
    for kp in (0.2, 0.0, 1.0):
        changed = eqx.tree_at(lambda c: c.kp, fusion, kp)
        _, new_state = step(changed, params, state)
        outputs.append(float(new_state.fusion.output))
        plain = gnopt.pi_muon(mlp_apply, LOSS, 0.02, solver=solver, fusion=changed)
        expected = plain.update(zeros(params), state, params, batch=batch)[1].fusion.output
        np.testing.assert_allclose(outputs[-1], float(expected), rtol=1e-5)
    assert len(traces) == 1
    assert len(set(outputs)) == 3  # the gain reached the controller


@pytest.mark.parametrize("make", [
    lambda: damping_controller(reject_below=0.0),
    lambda: fusion_weight_controller(reject_below=0.0),
    lambda: nielsen_damping(1e-2),
], ids=["damping_controller", "fusion_weight_controller", "nielsen_damping"])
def test_controller_numbers_are_leaves(make):
    controller = make()
    traces = []

    @jax.jit
    def update(controller, state, m):
        traces.append(1)
        return controller.update(state, m)

    leaves = jax.tree.leaves(controller)
    assert leaves and all(isinstance(x, float) for x in leaves)
    outputs = []
    for scale in (1.0, 0.5, 2.0):
        changed = jax.tree.map(lambda x: x * scale, controller)
        if isinstance(changed, PIController):
            changed = eqx.tree_at(lambda c: c.output0, changed, controller.output0)
        state, _ = update(changed, changed.init(), jnp.float32(0.3))
        outputs.append(float(state.output))
    assert len(traces) == 1
    assert len(set(outputs)) == 3  # the new numbers reached the update


def test_vmap_over_learning_rates_matches_separate_runs():
    params, batch = problem()
    common = dict(solver=gnopt.solvers.cg(max_iters=5), line_search=grid(3),
                  damping=damping_controller())

    def run(learning_rate):
        tx = gnopt.gauss_newton(mlp_apply, LOSS, learning_rate=learning_rate, **common)

        def body(carry, _):
            p, s = carry
            updates, s = tx.update(None, s, p, batch=batch)
            return (optax.apply_updates(p, updates), s), find_diagnostics(s)["loss_before"]

        (p, _), losses_seen = jax.lax.scan(body, (params, tx.init(params)), length=3)
        return p, losses_seen

    rates = jnp.asarray([0.25, 0.5, 1.0], jnp.float32)
    swept = jax.jit(jax.vmap(run))(rates)
    for i, rate in enumerate([0.25, 0.5, 1.0]):
        alone = jax.jit(run)(rate)
        assert_trees_close(jax.tree.map(lambda x: x[i], swept), alone, rtol=1e-4, atol=1e-5)
    assert not np.allclose(swept[1][0, -1], swept[1][2, -1])  # the rates made a difference


def test_vmap_over_controller_gains_and_grid_scale():
    values = jnp.asarray([0.9, -0.4, 0.2, np.nan, 0.6], jnp.float32)

    def run(ki, scale):
        controller = damping_controller(ki=ki, reject_below=0.0)  # ki traced: integral_limit too

        def body(state, m):
            state, accept = controller.update(state, m)
            return state, state.output

        _, outputs = jax.lax.scan(body, controller.init(), values)
        alpha, _ = grid(4, scale=scale).search(lambda a: (a - 0.3) ** 2, jnp.float32(0.09), None)
        return outputs, alpha

    kis, scales = [0.5, 1.5, 3.0], [1.0, 0.5, 0.25]
    swept = jax.vmap(run)(jnp.asarray(kis), jnp.asarray(scales))
    for i, (ki, scale) in enumerate(zip(kis, scales)):
        assert_trees_close(jax.tree.map(lambda x: x[i], swept), run(ki, scale), rtol=1e-5)


def test_line_search_numbers_are_leaves():
    traces = []

    @jax.jit
    def search(line_search):
        traces.append(1)
        return line_search.search(lambda a: (a - 0.3) ** 2, jnp.float32(0.09),
                                  lambda: jnp.float32(-0.6))[0]

    alphas = [float(search(grid(4, scale=s))) for s in (1.0, 0.5)]
    assert alphas == pytest.approx([1.0 / 2 ** 1.5, 0.5 / 2])  # the candidates nearest 0.3
    assert len(traces) == 1
    backtracks = [float(search(gnopt.line_search.backtracking(init=i, shrink=0.5))) for i in (1.0, 0.4)]
    assert backtracks == pytest.approx([0.5, 0.4])
    assert len(traces) == 2


def test_concrete_numbers_are_still_checked():
    with pytest.raises(ValueError, match="kp"):
        damping_controller(kp=-1.0)
    with pytest.raises(ValueError, match="output0"):
        PIController(setpoint=0.5, kp=0.1, ki=0.1, output0=2.0, output_min=0.0, output_max=1.0,
                     integral_limit=1.0, error_limit=1.0)
    with pytest.raises(ValueError, match="damping_min"):
        nielsen_damping(1e-3, damping_min=1.0)
    with pytest.raises(ValueError, match="scale"):
        grid(3, scale=0.0)
    with pytest.raises(ValueError, match="shrink"):
        gnopt.line_search.BacktrackingLineSearch(shrink=1.5)


def test_kfac_counts_stay_static_under_inject_hyperparams():
    from gnopt.hyperparams import static_args_of
    assert {"inverse_every", "max_factor_dim", "seed", "apply_fn", "loss_fn"} <= set(
        static_args_of(gnopt.kfac))
