"""Gradient noise scale (McCandlish et al. 2018): estimator maths and the transform."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gnopt import losses
from gnopt.diagnostics import noise_scale, two_batch_estimates


def test_estimates_exact_without_noise():
    # Σ = 0: every batch has the true gradient, so |G_b|² = |G_B|² = |G|².
    sq_norm, trace = two_batch_estimates(2.5, 2.5, 4, 32)
    assert sq_norm == pytest.approx(2.5) and trace == pytest.approx(0.0)


def test_estimates_invert_the_expected_norms():
    # E|G_B|² = |G|² + trΣ/B is inverted exactly.
    g2, tr = 1.7, 40.0
    sq_norm, trace = two_batch_estimates(g2 + tr / 8, g2 + tr / 64, 8, 64)
    assert sq_norm == pytest.approx(g2) and trace == pytest.approx(tr)


def test_estimates_are_unbiased_on_random_gradients():
    # Per-example gradients G + ε, ε ~ N(0, diag σ²): averages over many batches.
    rng = np.random.default_rng(0)
    g = rng.normal(size=6)
    sigma = rng.uniform(0.5, 2.0, size=6)
    small, big, trials = 4, 32, 4000
    eps = rng.normal(size=(trials, big, 6)) * sigma
    grads = g + eps
    small_sq = np.sum(grads[:, :small].mean(1) ** 2, -1)
    big_sq = np.sum(grads.mean(1) ** 2, -1)
    sq_norm, trace = two_batch_estimates(small_sq, big_sq, small, big)
    assert np.mean(sq_norm) == pytest.approx(np.sum(g ** 2), rel=0.1)
    assert np.mean(trace) == pytest.approx(np.sum(sigma ** 2), rel=0.05)


def test_estimates_reject_bad_batch_sizes():
    with pytest.raises(ValueError, match="small_batch < big_batch"):
        two_batch_estimates(1.0, 1.0, 8, 8)


def test_transform_measures_the_noise_scale_of_least_squares():
    # y = x·w* + e, x ~ N(0, I_d), e ~ N(0, s²); loss ½ mean (x·w − y)². At w,
    # with v = w − w*: G = v, tr Σ = (d+1)|v|² + d s² (Gaussian fourth moments).
    d, s, small, big = 4, 0.5, 8, 64
    w_star = jnp.arange(1.0, d + 1)
    w = w_star + 0.4
    v2 = float(jnp.sum((w - w_star) ** 2))
    expected = ((d + 1) * v2 + d * s ** 2) / v2
    apply_fn = lambda p, x: x @ p
    tx = noise_scale(apply_fn, losses.mean_squared_error, small, decay=0.99)
    batch_loss = lambda p, b: losses.mean_squared_error(apply_fn(p, b[0]), b[1])

    @jax.jit
    def step(state, key):
        kx, ke = jax.random.split(key)
        x = jax.random.normal(kx, (big, d))
        y = x @ w_star + s * jax.random.normal(ke, (big,))
        grads = jax.grad(batch_loss)(w, (x, y))
        out, state = tx.update(grads, state, w, batch=(x, y), unused_extra=1)
        return state, jnp.max(jnp.abs(out - grads))

    state = tx.init(w)
    for key in jax.random.split(jax.random.PRNGKey(0), 400):
        state, changed = step(state, key)
        assert float(changed) == 0.0  # updates pass through unchanged
    diag = state.diagnostics
    assert set(diag) == {"grad_sq_norm", "trace_sigma", "noise_scale"}
    assert float(diag["grad_sq_norm"]) == pytest.approx(v2, rel=0.3)
    assert float(diag["noise_scale"]) == pytest.approx(expected, rel=0.25)
    assert step._cache_size() == 1


def test_transform_rejects_small_batch_not_smaller():
    tx = noise_scale(lambda p, x: x @ p, losses.mean_squared_error, 8)
    w = jnp.zeros(3)
    with pytest.raises(ValueError, match="small_batch_size=8 must be smaller than the batch size 8"):
        tx.update(w, tx.init(w), w, batch=(jnp.ones((8, 3)), jnp.ones(8)))
    with pytest.raises(ValueError, match="small_batch_size"):
        noise_scale(lambda p, x: x, losses.mean_squared_error, 0)


def test_transform_chains_before_an_optimizer():
    apply_fn = lambda p, x: x @ p
    tx = optax.chain(noise_scale(apply_fn, losses.mean_squared_error, 2), optax.sgd(0.1))
    w = jnp.ones(3)
    x, y = jnp.eye(3).repeat(2, axis=0), jnp.zeros(6)
    grads = jax.grad(lambda p: losses.mean_squared_error(apply_fn(p, x), y))(w)
    updates, state = tx.update(grads, tx.init(w), w, batch=(x, y))
    np.testing.assert_allclose(updates, -0.1 * grads)
    assert np.isfinite(float(state[0].diagnostics["trace_sigma"]))
