"""K-FAC: exact GN step on one dense layer, factor maths, fallback rule, convergence."""

from typing import Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree

from gnopt import losses
from gnopt.models import MLP, LLaMA, llama_config
from gnopt.transforms import kfac, scale_by_kfac, tapped_call as apply
from gnopt.transforms.kfac import kfac_labels, layer_statistics


class Dense(eqx.Module):
    """Minimal layer following the tap contract: ``y = x @ W (+ b)``, ``tap(name, x, y)``."""

    weight: jax.Array
    bias: Optional[jax.Array]
    name: str = eqx.field(static=True)

    def __call__(self, x, tap=None):
        y = x @ self.weight + (0.0 if self.bias is None else self.bias)
        return y if tap is None else tap(self.name, x, y)


class Net(eqx.Module):
    """Two dense layers around a non-dense elementwise ``scale`` (a fallback leaf)."""

    hidden: Dense
    scale: jax.Array
    out: Dense

    def __call__(self, x, tap=None):
        return self.out(jnp.tanh(self.hidden(x, tap)) * self.scale, tap)


def _dense(key, n_in, n_out, bias, name="layer", dtype=jnp.float32):
    kw, kb = jax.random.split(key)
    return Dense(jax.random.normal(kw, (n_in, n_out), dtype) / np.sqrt(n_in),
                 jax.random.normal(kb, (n_out,), dtype) if bias else None, name)


def _net(key, sizes=(3, 5, 2)):
    k1, k2 = jax.random.split(key)
    return Net(_dense(k1, sizes[0], sizes[1], True, "hidden"), jnp.linspace(0.5, 1.5, sizes[1]),
               _dense(k2, sizes[1], sizes[2], True, "out"))


def _gn_step_vs_kfac(seed, n_in, n_out, n, bias, lr=0.7):
    """(K-FAC update, −lr·G⁻¹g) for one random float64 dense layer + MSE, flattened."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    layer = _dense(k1, n_in, n_out, bias, dtype=jnp.float64)
    x = jax.random.normal(k2, (n, n_in), jnp.float64)
    y = jax.random.normal(k3, (n, n_out), jnp.float64)
    loss = lambda m: losses.mean_squared_error(m(x), y)
    tx = kfac(apply, losses.mean_squared_error, lr, damping=0.0, ema_decay=0.0,
              inverse_every=1, momentum=0.0)
    updates, _ = tx.update(jax.grad(loss)(layer), tx.init(layer), layer, batch=(x, y))
    flat, unravel = ravel_pytree(layer)
    ggn = jax.hessian(lambda v: loss(unravel(v)))(flat)  # the model is linear: Hessian = GGN
    grad = ravel_pytree(jax.grad(loss)(layer))[0]
    return ravel_pytree(updates)[0], -lr * jnp.linalg.solve(ggn, grad)


_GN_CHECKS = {}


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("n_in, n_out, n", [(1, 1, 3), (3, 2, 6), (4, 3, 9)])
@given(seed=st.integers(0, 2**16))
def test_single_dense_layer_mse_gives_the_exact_gn_step(x64, n_in, n_out, n, bias, seed):
    """One linear layer + MSE: the GGN is (X̄ᵀX̄/n) ⊗ (I/d_out), exactly Kronecker, so
    K-FAC (damping → 0, factors of this batch) is the GN step −lr·G⁻¹g."""
    key = (n_in, n_out, n, bias)
    if key not in _GN_CHECKS:
        _GN_CHECKS[key] = jax.jit(lambda s: _gn_step_vs_kfac(s, n_in, n_out, n, bias))
    update, expected = _GN_CHECKS[key](seed)
    assert update.dtype == jnp.float64
    np.testing.assert_allclose(update, expected, rtol=1e-6, atol=1e-8 * np.abs(expected).max())


def test_factors_are_emas_and_inverses_are_cached():
    model = _net(jax.random.PRNGKey(0))
    tx = scale_by_kfac(apply, losses.mean_squared_error, ema_decay=0.5, inverse_every=3)
    state = tx.init(model)
    inverses, acts = [], []
    for step in range(4):
        x = jax.random.normal(jax.random.PRNGKey(step), (6, 3))
        y = jnp.zeros((6, 2))
        _, state = jax.jit(tx.update)(model, state, model, batch=(x, y))
        xbar = np.concatenate([np.asarray(x), np.ones((6, 1))], axis=1)
        acts.append(xbar.T @ xbar / 6)
        inverses.append(state.factors["hidden"].inv_activations)
    expected = acts[0]
    for a in acts[1:]:
        expected = 0.5 * expected + 0.5 * a
    np.testing.assert_allclose(state.factors["hidden"].activations, expected, rtol=1e-5)
    np.testing.assert_array_equal(inverses[0], inverses[1])
    np.testing.assert_array_equal(inverses[0], inverses[2])
    assert not np.allclose(inverses[2], inverses[3])  # refreshed at step 3


def test_cross_entropy_fisher_samples_are_unbiased_for_the_ggn_factor():
    """E[S] = Σ_t w_t (diag p_t − p_t p_tᵀ) for one dense layer (J = I)."""
    layer = _dense(jax.random.PRNGKey(0), 3, 4, False)
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 3))
    labels = jnp.arange(8) % 4
    mask = jnp.array([1, 1, 1, 0, 1, 1, 0, 1])
    sampled = jax.vmap(lambda k: layer_statistics(
        apply, losses.softmax_cross_entropy, layer, (x, (labels, mask)), k,
        {"layer": layer})["layer"][1])(jax.random.split(jax.random.PRNGKey(2), 4000))
    p = jax.nn.softmax(x @ layer.weight)
    w = mask / mask.sum()
    exact = jnp.einsum("t,ti,ij->ij", w, p, jnp.eye(4)) - jnp.einsum("t,ti,tj->ij", w, p, p)
    np.testing.assert_allclose(sampled.mean(0), exact, atol=0.01)


def test_non_dense_leaves_follow_the_fallback():
    model = _net(jax.random.PRNGKey(0))
    x, y = jax.random.normal(jax.random.PRNGKey(1), (7, 3)), jnp.zeros((7, 2))
    grads = jax.grad(lambda m: losses.mean_squared_error(m(x), y))(model)
    assert kfac_labels(model) == Net(Dense("kfac", "kfac", "hidden"), "fallback",
                                     Dense("kfac", "kfac", "out"))
    for fallback, reference in ((None, optax.adam(0.1)), (optax.sgd(0.5), optax.sgd(0.5))):
        tx = kfac(apply, losses.mean_squared_error, 0.1, fallback=fallback)
        updates, _ = jax.jit(tx.update)(grads, tx.init(model), model, batch=(x, y))
        expected, _ = reference.update(grads.scale, reference.init(model.scale))
        np.testing.assert_allclose(updates.scale, expected, rtol=1e-6)
    # A layer with a factor above max_factor_dim is left to the fallback too.
    small = kfac_labels(model, max_factor_dim=5)  # factors: hidden (4, 5), out (6, 2)
    assert (small.hidden.weight, small.out.weight, small.out.bias) == ("kfac", "fallback",
                                                                       "fallback")


def test_kfac_trains_an_mlp_regression_faster_than_sgd():
    model = MLP([4, 16, 3], key=jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (64, 4))
    teacher = MLP([4, 8, 3], key=jax.random.PRNGKey(2))
    y = teacher(x)
    loss = lambda m: losses.mean_squared_error(m(x), y)

    def train(tx, steps=60):
        m, state = model, tx.init(model)

        @jax.jit
        def step(m, state):
            updates, state = tx.update(jax.grad(loss)(m), state, m, batch=(x, y))
            return optax.apply_updates(m, updates), state

        for _ in range(steps):
            m, state = step(m, state)
        return float(loss(m))

    initial = float(loss(model))
    kfac_loss = train(kfac(apply, losses.mean_squared_error, 0.3, damping=1e-2,
                           inverse_every=5))
    sgd_loss = train(optax.sgd(0.3, momentum=0.9))
    assert kfac_loss < 1e-2 * initial
    assert kfac_loss < sgd_loss


@pytest.mark.slow
def test_kfac_reduces_cross_entropy_of_a_tiny_llama():
    cfg = llama_config("tiny", n_layers=1, d_model=32, d_ff=64, vocab_size=64)
    model = LLaMA(cfg, key=jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 17), 0, cfg.vocab_size)
    batch = (tokens[:, :-1], tokens[:, 1:])
    loss = lambda m: losses.softmax_cross_entropy(m(batch[0]), batch[1])
    tx = kfac(apply, losses.softmax_cross_entropy, 1e-2, damping=1e-1)
    state = tx.init(model)
    assert set(state[0].factors) == {"layers.0.attn.wq", "layers.0.attn.wk", "layers.0.attn.wv",
                                     "layers.0.attn.wo", "layers.0.mlp.up", "layers.0.mlp.down",
                                     "head"}

    @jax.jit
    def step(m, state):
        updates, state = tx.update(jax.grad(loss)(m), state, m, batch=batch)
        return optax.apply_updates(m, updates), state

    m = model
    for _ in range(10):
        m, state = step(m, state)
    assert float(loss(m)) < 0.7 * float(loss(model))


def test_clear_errors():
    model = _net(jax.random.PRNGKey(0))
    x, y = jnp.ones((4, 3)), jnp.zeros((4, 2))
    tx = kfac(apply, losses.mean_squared_error, 0.1)
    state = tx.init(model)
    with pytest.raises(ValueError, match="batch"):
        tx.update(model, state, model)
    untapped = kfac(lambda m, x, tap: m(x), losses.mean_squared_error, 0.1)
    with pytest.raises(ValueError, match="never tapped"):
        untapped.update(model, untapped.init(model), model, batch=(x, y))
    twice = kfac(lambda m, x, tap: m(x, tap) + m(x, tap), losses.mean_squared_error, 0.1)
    with pytest.raises(ValueError, match="tapped twice"):
        twice.update(model, twice.init(model), model, batch=(x, y))
    hinge = kfac(apply, lambda z, t: jnp.mean(jnp.maximum(0, 1 - z * t)), 0.1)
    with pytest.raises(ValueError, match="loss_fn"):
        hinge.update(model, hinge.init(model), model, batch=(x, y))
