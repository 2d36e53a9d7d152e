"""SOAP and Shampoo: exact reductions to Adam, inverse roots, convergence."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gnopt.transforms import scale_by_shampoo, scale_by_soap, shampoo, soap, warmup_cosine


def _params():
    return {"w": jnp.ones((4, 3)), "wide": jnp.ones((2, 7)), "b": jnp.zeros(3)}


def _grads(step, params):
    return jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(step), p.shape), params)


def _run_both(tx, ref, steps=4):
    params = _params()
    state, ref_state = tx.init(params), ref.init(params)
    update, ref_update = jax.jit(tx.update), jax.jit(ref.update)
    for step in range(steps):
        grads = _grads(step, params)
        updates, state = update(grads, state, params, batch=jnp.zeros(1))
        expected, ref_state = ref_update(grads, ref_state, params)
        jax.tree.map(np.testing.assert_array_equal, updates, expected)
        params = optax.apply_updates(params, updates)


@pytest.mark.parametrize("off", [dict(precondition=False), dict(precondition_frequency=0)])
def test_soap_without_preconditioning_is_adam(off):
    _run_both(soap(0.01, b1=0.9, b2=0.99, eps=1e-6, **off), optax.adam(0.01, 0.9, 0.99, 1e-6))


def test_shampoo_without_preconditioning_is_its_graft():
    _run_both(shampoo(0.01, b1=0.9, b2=0.99, eps=1e-6, precondition=False),
              optax.adam(0.01, 0.9, 0.99, 1e-6))
    _run_both(shampoo(0.01, b1=0.0, graft="none", precondition=False), optax.sgd(0.01))


def _polar(g):
    u, _, vt = np.linalg.svd(np.asarray(g, np.float64), full_matrices=False)
    return u @ vt


def test_soap_first_call_initialises_then_constant_gradient_gives_polar_factor():
    """Step 1 only sets L = (1 − β)GGᵀ, R = (1 − β)GᵀG (an EMA from zeros, as
    in the authors' code) and their eigenbases; for a constant
    gradient the rotated gradient is diag(σ), Adam's step there is sign(σ),
    so the next direction is the polar factor U Vᵀ of G (up to eps/σ: with a
    tiny eps Adam would blow the round-off off-diagonal of diag(σ) up to ±1)."""
    g = jax.random.normal(jax.random.PRNGKey(3), (4, 6))
    tx = scale_by_soap(eps=1e-3)
    state = tx.init({"w": g})
    zero, state = tx.update({"w": g}, state)
    np.testing.assert_array_equal(zero["w"], 0.0)
    np.testing.assert_array_equal(state.mu["w"], 0.0)
    for basis in (state.factors["w"].basis_left, state.factors["w"].basis_right):
        np.testing.assert_allclose(basis.T @ basis, np.eye(basis.shape[0]), atol=1e-5)
    direction, state = tx.update({"w": g}, state)
    np.testing.assert_allclose(direction["w"], _polar(g), atol=3e-3)


def test_soap_refresh_keeps_orthonormal_bases_and_identity_for_long_sides():
    tx = scale_by_soap(precondition_frequency=2, max_precond_dim=5)
    params = {"w": jnp.ones((4, 3)), "long": jnp.ones((3, 9))}
    state = tx.init(params)
    assert state.factors["long"].right is None and state.factors["long"].left.shape == (3, 3)
    update = jax.jit(tx.update)
    for step in range(5):
        updates, state = update(_grads(step, params), state)
        assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
    q = state.factors["w"].basis_left
    np.testing.assert_allclose(q.T @ q, np.eye(4), atol=1e-5)


_ROOT_B2, _ROOT_EPSILON = 0.9, 1e-3
_ROOT_TXS = {(acc, rel): scale_by_shampoo(b2=_ROOT_B2, accumulate=acc, epsilon=_ROOT_EPSILON,
                                          relative_epsilon=rel)
             for acc in ("sum", "ema") for rel in (False, True)}
_ROOT_UPDATES = {k: jax.jit(tx.update) for k, tx in _ROOT_TXS.items()}


@given(seed=st.integers(0, 1000), accumulate=st.sampled_from(["sum", "ema"]),
       relative=st.booleans())
def test_shampoo_root_is_the_float64_inverse_fourth_root(seed, accumulate, relative):
    b2, epsilon, steps = _ROOT_B2, _ROOT_EPSILON, 6
    params = {"w": jnp.ones((3, 5))}
    state = _ROOT_TXS[accumulate, relative].init(params)
    for step in range(steps):
        _, state = _ROOT_UPDATES[accumulate, relative](_grads(seed * 10 + step, params), state)
    f = state.factors["w"]
    debias = 1.0 if accumulate == "sum" else 1 - b2**steps
    for stat, root in ((f.left, f.root_left), (f.right, f.root_right)):
        lam, vec = np.linalg.eigh(np.asarray(stat, np.float64) / debias)
        lam = np.maximum(lam, 0.0)
        eps = epsilon * lam[-1] if relative else epsilon
        expected = (vec * (lam + eps) ** -0.25) @ vec.T
        np.testing.assert_allclose(root, expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())


def test_shampoo_constant_gradient_is_scaled_polar_factor_and_grafting_keeps_adam_norm():
    """L = tGGᵀ, R = tGᵀG ⇒ L^(−1/4) G R^(−1/4) = U Vᵀ/√t (Gupta et al. 2018)."""
    g = jax.random.normal(jax.random.PRNGKey(5), (4, 4))
    tx = scale_by_shampoo(b1=0.0, accumulate="sum", graft="none")
    state = tx.init({"w": g})
    for _ in range(3):
        direction, state = jax.jit(tx.update)({"w": g}, state)
    np.testing.assert_allclose(direction["w"], _polar(g) / np.sqrt(3), atol=2e-4)
    grafted = scale_by_shampoo()
    adam = optax.scale_by_adam()
    params = _params()
    state, adam_state = grafted.init(params), adam.init(params)
    for step in range(3):
        updates, state = jax.jit(grafted.update)(_grads(step, params), state)
        adam_updates, adam_state = jax.jit(adam.update)(_grads(step, params), adam_state)
    for name in ("w", "wide"):
        np.testing.assert_allclose(jnp.linalg.norm(updates[name]),
                                   jnp.linalg.norm(adam_updates[name]), rtol=1e-5)
    np.testing.assert_array_equal(updates["b"], adam_updates["b"])


def _kronecker_quadratic(seed, m=6, n=4, cond=100.0):
    """``½ tr(Eᵀ P E Q)`` with rotated, ill-conditioned P and Q, plus a diagonal vector term."""
    rng = np.random.default_rng(seed)

    def spd(k):
        q = np.linalg.qr(rng.normal(size=(k, k)))[0]
        return jnp.asarray((q * np.geomspace(1, np.sqrt(cond), k)) @ q.T, jnp.float32)

    p, q = spd(m), spd(n)
    target = jnp.asarray(rng.normal(size=(m, n)), jnp.float32)

    def loss(params):
        e = params["w"] - target
        return (0.5 * jnp.trace(e.T @ p @ e @ q)
                + 0.5 * jnp.sum(jnp.arange(1, n + 1) * (params["b"] - 1.0) ** 2))

    return loss, {"w": jnp.zeros((m, n)), "b": jnp.zeros(n)}


@pytest.mark.parametrize("make", [
    lambda lr: soap(lr), lambda lr: shampoo(lr), lambda lr: shampoo(lr, accumulate="sum"),
    lambda lr: shampoo(lr, graft="none", epsilon=1e-8)])
@pytest.mark.parametrize("seed", [0, 1])
def test_converges_on_a_kronecker_quadratic(make, seed):
    loss, params = _kronecker_quadratic(seed)
    initial, steps = loss(params), 200
    tx = make(warmup_cosine(0.1, steps, final_fraction=0.0))
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        u, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, u), s

    for _ in range(steps):
        params, state = step(params, state)
    assert loss(params) < 1e-3 * initial


@pytest.mark.parametrize("make", [lambda: scale_by_soap(), lambda: scale_by_shampoo()])
def test_bfloat16_params_keep_their_dtype(make):
    params = {"w": jnp.ones((3, 4), jnp.bfloat16), "b": jnp.ones(4, jnp.bfloat16)}
    tx = make()
    state = tx.init(params)
    for step in range(2):
        grads = jax.tree.map(lambda p: p * (step + 1.0), params)
        updates, state = jax.jit(tx.update)(grads, state, params)
    assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))


def test_bad_config_messages():
    with pytest.raises(ValueError, match="precondition_frequency"):
        scale_by_soap(precondition_frequency=-1)
    with pytest.raises(ValueError, match="accumulate"):
        scale_by_shampoo(accumulate="mean")
    with pytest.raises(ValueError, match="graft"):
        scale_by_shampoo(graft="sgd")
    with pytest.raises(ValueError, match="update_frequency"):
        scale_by_shampoo(update_frequency=0)
