"""Muon: Newton–Schulz orthogonalisation, the direction's pieces, the partitioned alias."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gnopt.transforms import (hidden_matrix_labels, muon, muon_direction, muon_momentum,
                              newton_schulz, scale_by_muon)


def _matrix_with_spectrum(seed, m, n, low, high):
    """``U diag(s) Vᵀ`` with singular values ``s ~ U(low, high)`` and its factors."""
    rng = np.random.default_rng(seed)
    k = min(m, n)
    u = np.linalg.qr(rng.normal(size=(m, k)))[0]
    v = np.linalg.qr(rng.normal(size=(n, k)))[0]
    s = rng.uniform(low, high, size=k)
    return (u * s) @ v.T, u, v


@given(seed=st.integers(0, 2**31 - 1), m=st.integers(1, 16), n=st.integers(1, 16))
def test_newton_schulz_singular_values_near_one(seed, m, n):
    g, u, v = _matrix_with_spectrum(seed, m, n, 0.2, 1.0)  # condition number <= 5
    out = np.asarray(newton_schulz(jnp.asarray(g, jnp.float32)), np.float64)
    sv = np.linalg.svd(out, compute_uv=False)
    assert sv.min() > 0.65 and sv.max() < 1.2, sv
    # Same singular vectors: Uᵀ NS(G) V is diagonal.
    core = u.T @ out @ v
    np.testing.assert_allclose(core - np.diag(np.diag(core)), 0.0, atol=1e-4)


def test_newton_schulz_transpose_zero_and_bf16():
    g = jnp.asarray(_matrix_with_spectrum(0, 9, 4, 0.2, 1.0)[0], jnp.float32)
    assert newton_schulz(g).shape == (9, 4)
    np.testing.assert_array_equal(newton_schulz(g.T), newton_schulz(g).T)
    np.testing.assert_array_equal(newton_schulz(jnp.zeros((3, 5))), 0.0)
    low = newton_schulz(g.astype(jnp.bfloat16), compute_dtype="bfloat16")
    assert low.dtype == jnp.bfloat16
    np.testing.assert_allclose(low.astype(jnp.float32), newton_schulz(g), atol=0.05)
    with pytest.raises(ValueError, match="2-D"):
        newton_schulz(jnp.ones((2, 2, 2)))
    with pytest.raises(ValueError, match="compute_dtype"):
        newton_schulz(g, compute_dtype="float16")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_scale_by_muon_shapes_dtypes_and_shape_scale(dtype):
    params = {"up": jnp.ones((2, 8), dtype), "down": jnp.ones((8, 2), dtype)}
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(1), p.shape, dtype),
                         params)
    tx = scale_by_muon()
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params, batch=jnp.ones(3))
    for name in params:
        assert updates[name].shape == params[name].shape
        assert updates[name].dtype == dtype
        assert state.momentum[name].dtype == dtype
    # First step: momentum (1−β)g, Nesterov mix (1−β)(1+β)g; NS is scale-free.
    ns = lambda g: newton_schulz(g)
    np.testing.assert_allclose(updates["up"].astype(jnp.float32),
                               2.0 * ns(grads["up"]).astype(jnp.float32), rtol=0.02, atol=0.02)
    np.testing.assert_allclose(updates["down"].astype(jnp.float32),
                               ns(grads["down"]).astype(jnp.float32), rtol=0.02, atol=0.02)


def test_scale_by_muon_rejects_non_matrices():
    with pytest.raises(ValueError, match=r"\['b'\].*2-D"):
        scale_by_muon().init({"w": jnp.ones((2, 2)), "b": jnp.ones(3)})


def _model_params():
    k = iter(jax.random.split(jax.random.PRNGKey(0), 8))
    return {
        "embed": {"weight": jax.random.normal(next(k), (10, 4))},
        "blocks": [{"w1": jax.random.normal(next(k), (4, 6)), "norm": jnp.ones(4)},
                   {"w1": jax.random.normal(next(k), (6, 4)), "norm": jnp.ones(6)}],
        "lm_head": jax.random.normal(next(k), (4, 10)),
    }


def test_default_labels():
    labels = hidden_matrix_labels(_model_params())
    assert labels == {"embed": {"weight": "adam"},
                      "blocks": [{"w1": "muon", "norm": "adam"}, {"w1": "muon", "norm": "adam"}],
                      "lm_head": "adam"}


def test_muon_equals_its_pieces_and_adamw_elsewhere():
    """muon(...) = −η(direction + λW) on hidden matrices (from the public pieces,
    bit for bit: PI-Muon relies on it) and optax.adamw on the other leaves."""
    params = _model_params()
    lr, wd, adam_lr = 0.02, 0.1, 0.003
    tx = muon(lr, weight_decay=wd, adam_learning_rate=adam_lr, adam_weight_decay=0.01)
    ref = optax.adamw(adam_lr, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.01)
    state, ref_state = tx.init(params), ref.init(params)
    momentum = [jnp.zeros_like(b["w1"]) for b in params["blocks"]]
    p = params
    for step in range(3):
        grads = jax.tree.map(
            lambda x: jax.random.normal(jax.random.PRNGKey(step), x.shape), p)
        updates, state = jax.jit(tx.update)(grads, state, p, batch=None)
        ref_updates, ref_state = jax.jit(ref.update)(grads, ref_state, p)
        for i, block in enumerate(grads["blocks"]):
            (momentum[i],), (mixed,) = muon_momentum([block["w1"]], [momentum[i]], 0.95)
            expected = -lr * (muon_direction(mixed) + wd * p["blocks"][i]["w1"])
            np.testing.assert_allclose(updates["blocks"][i]["w1"], expected, rtol=1e-6, atol=1e-7)
            np.testing.assert_array_equal(updates["blocks"][i]["norm"],
                                          ref_updates["blocks"][i]["norm"])
        np.testing.assert_array_equal(updates["embed"]["weight"], ref_updates["embed"]["weight"])
        np.testing.assert_array_equal(updates["lm_head"], ref_updates["lm_head"])
        p = optax.apply_updates(p, updates)


def test_muon_minimises_a_matrix_quadratic():
    target = jnp.asarray(_matrix_with_spectrum(3, 6, 4, 0.5, 2.0)[0], jnp.float32)
    loss = lambda w: 0.5 * jnp.sum((w["w"] - target) ** 2)
    params = {"w": jnp.zeros((6, 4))}
    tx = muon(optax.cosine_decay_schedule(0.3, 150))
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        u, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, u), s

    for _ in range(150):
        params, state = step(params, state)
    assert loss(params) < 1e-2 * loss({"w": jnp.zeros((6, 4))})
