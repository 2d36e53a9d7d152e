"""The combinators behind ``gauss_newton`` and ``pi_muon``: the aliases are their chains,
the pieces are swappable, and a fused base other than Muon is one line."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu
import pytest

import gnopt
from gnopt import control, curvature, line_search, solvers
from gnopt.losses import softmax_cross_entropy as LOSS
from gnopt.metrics import find_diagnostics
from gnopt.models import MLP

APPLY = lambda model, x: model(x)  # noqa: E731


def problem(seed=0):
    rng = np.random.default_rng(seed)
    model = MLP([3, 8, 4], key=jax.random.key(seed))
    batch = (jnp.asarray(rng.normal(size=(16, 3)), jnp.float32), jnp.asarray(rng.integers(0, 4, 16)))
    return model, batch


def run(tx, params, batch, steps=4, grads=False):
    state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(
        jax.grad(lambda q: LOSS(APPLY(q, batch[0]), batch[1]))(p) if grads else None, s, p,
        batch=batch))
    for _ in range(steps):
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
    return params, state


def same(a, b):
    return all(bool(jnp.all(x == y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("damping", [1e-2, control.nielsen_damping(1e-2)], ids=["fixed", "nielsen"])
def test_gauss_newton_is_its_chain_written_by_hand(damping):
    params, batch = problem()
    solver, ls = solvers.cg(max_iters=4), line_search.grid(3)
    alias = gnopt.gauss_newton(APPLY, LOSS, solver=solver, line_search=ls, learning_rate=0.5,
                               damping=damping)
    adaptive = not isinstance(damping, float)
    chain = gnopt.accept_step(
        optax.chain(gnopt.scale_by_gauss_newton(APPLY, LOSS, solver=solver, curvature=curvature.full(),
                                                damping=0.0 if adaptive else damping),
                    optax.scale(0.5),
                    gnopt.scale_by_line_search(APPLY, LOSS, ls)),
        APPLY, LOSS, controller=damping if adaptive else None)
    (p1, s1), (p2, s2) = run(alias, params, batch), run(chain, params, batch)
    assert same(p1, p2)
    assert find_diagnostics(s1) == pytest.approx(find_diagnostics(s2))


def test_a_rejected_step_restarts_the_direction_from_zero():
    params, batch = problem()
    tx = gnopt.scale_by_gauss_newton(APPLY, LOSS, solver=solvers.cg(max_iters=2),
                                     curvature=curvature.full(), damping=1e-3)
    fresh = tx.init(params)
    first, state = tx.update(None, fresh, params, batch=batch)
    assert float(otu.tree_norm(state.warm_start)) > 0
    warm, _ = tx.update(None, state, params, batch=batch, accepted=jnp.asarray(True))
    cold, _ = tx.update(None, state, params, batch=batch, accepted=jnp.asarray(False))
    assert same(cold, first)  # from zero, as the first solve
    assert not same(warm, first)  # two CG steps from the warm start go further


def test_a_controllers_output_reaches_the_inner_transform():
    """``accept_step`` hands its controller's output on as ``damping=``: with a huge
    δ the GN step shrinks to ``−g/δ``."""
    params, batch = problem()

    class Fixed(control.AbstractController):
        value: float

        def init(self):
            return control.PIState(jnp.zeros(()), jnp.asarray(self.value, jnp.float32),
                                   jnp.zeros((), jnp.int32), jnp.zeros(()))

        def update(self, state, measurement, accept=True):
            return state, jnp.asarray(accept, bool)

        @property
        def rejects(self):
            return False

    direction = gnopt.scale_by_gauss_newton(APPLY, LOSS, solver=solvers.cg(max_iters=20),
                                            curvature=curvature.full())
    tx = gnopt.accept_step(direction, APPLY, LOSS, controller=Fixed(1e6))
    updates, state = tx.update(None, tx.init(params), params, batch=batch)
    grads = jax.grad(lambda q: LOSS(APPLY(q, batch[0]), batch[1]))(params)
    expected = otu.tree_scale(-1e-6, grads)
    for u, e in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
        np.testing.assert_allclose(u, e, rtol=1e-3, atol=1e-12)
    assert float(find_diagnostics(state)["damping"]) == 1e6


def test_accept_step_around_any_transform_drops_non_finite_steps():
    params, batch = problem()
    blow_up = optax.stateless(lambda updates, params: jax.tree.map(lambda g: g / 0.0, updates))
    tx = gnopt.accept_step(optax.chain(optax.sgd(0.1), blow_up))
    grads = jax.grad(lambda q: LOSS(APPLY(q, batch[0]), batch[1]))(params)
    updates, state = tx.update(grads, tx.init(params), params)
    assert float(otu.tree_norm(updates)) == 0.0 and not bool(state.accepted)
    plain = gnopt.accept_step(optax.sgd(0.1))
    updates, state = plain.update(grads, plain.init(params), params)
    assert same(updates, optax.sgd(0.1).update(grads, optax.sgd(0.1).init(params))[0])
    assert bool(state.accepted)


def test_decide_keeps_a_step_only_if_every_controller_accepts():
    pi = control.fusion_weight_controller(kp=0.2, reject_below=0.0)
    lm = control.nielsen_damping(1e-3)
    states = (pi.init(), lm.init())
    (s_pi, s_lm), accept = control.decide((pi, lm), states, jnp.asarray(0.9), True)
    assert bool(accept)
    (s_pi, s_lm), accept = control.decide((pi, lm), states, jnp.asarray(-1.0), True)
    assert not bool(accept)  # the PI controller rejects ρ < 0 ...
    assert float(s_lm.output) > float(states[1].output)  # ... and the damping sees a bad step
    _, accept = control.decide((lm,), (states[1],), jnp.asarray(0.9), False)
    assert not bool(accept)  # the transform's own verdict is never overridden


class ZeroWeight(control.AbstractController):
    """λ ≡ 0, every step kept: the fused step is the base's."""

    def init(self):
        return control.PIState(jnp.zeros(()), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32),
                               jnp.zeros(()))

    def update(self, state, measurement, accept=True):
        return state, jnp.asarray(True)

    @property
    def rejects(self):
        return False


@pytest.mark.parametrize("make_base", [lambda: gnopt.adamw(1e-2), lambda: gnopt.soap(1e-2)],
                         ids=["adamw", "soap"])
@pytest.mark.parametrize("parallel", ["interpolate", "muon"])
def test_fuse_with_zero_weight_is_the_base_optimizer(make_base, parallel):
    """(On the plane, λ = 0 is the base's direction at the model's length instead.)"""
    params, batch = problem()
    fused = gnopt.fuse(make_base(), APPLY, LOSS, fusion=ZeroWeight(), damping=0.0,
                       gradient="given", base_step_length="base", parallel=parallel)
    p1, _ = run(fused, params, batch, grads=True)
    p2, _ = run(make_base(), params, batch, grads=True)
    assert same(p1, p2)


def test_pi_fused_soap_is_one_line_and_lowers_the_loss():
    params, batch = problem()
    tx = gnopt.fuse(gnopt.soap(1e-2), APPLY, LOSS)
    loss = lambda p: float(LOSS(APPLY(p, batch[0]), batch[1]))
    trained, state = run(tx, params, batch, steps=6, grads=True)
    assert loss(trained) < 0.9 * loss(params)
    assert {"lambda", "rho", "accepted", "cg_iterations"} <= set(find_diagnostics(state))


def test_pi_muon_is_fuse_of_muon():
    params, batch = problem()
    solver = solvers.cg(max_iters=3)
    alias = gnopt.pi_muon(APPLY, LOSS, 0.05, solver=solver, parallel="plane")
    by_hand = gnopt.fuse(gnopt.muon(0.05), APPLY, LOSS, solver=solver, parallel="plane")
    assert same(run(alias, params, batch, grads=True)[0], run(by_hand, params, batch, grads=True)[0])


def test_fuse_names_a_bad_choice():
    with pytest.raises(ValueError, match="fuse: parallel must be one of 'interpolate', 'muon', 'plane', got 'sum'"):
        gnopt.fuse(gnopt.adamw(1e-2), APPLY, LOSS, parallel="sum")
    with pytest.raises(ValueError, match="pi_muon: gradient must be one of"):
        gnopt.pi_muon(APPLY, LOSS, gradient="none")
