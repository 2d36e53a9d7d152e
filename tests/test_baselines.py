"""First-order baselines: schedules and the AdamW / Lion aliases."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gnopt.transforms import adamw, constant, lion, warmup_cosine


def test_warmup_cosine_values():
    lr = warmup_cosine(1.0, total_steps=110, warmup_steps=10, final_fraction=0.1)
    values = np.array([float(lr(t)) for t in range(120)])
    np.testing.assert_allclose(values[:10], np.arange(1, 11) / 10, rtol=1e-6)
    np.testing.assert_allclose(values[60], 0.1 + 0.9 * 0.5, rtol=1e-6)  # half-way
    np.testing.assert_allclose(values[110:], 0.1, rtol=1e-6)
    assert np.all(np.diff(values[9:]) <= 1e-7)


def test_constant_with_warmup():
    lr = constant(0.5, warmup_steps=4)
    np.testing.assert_allclose([float(lr(t)) for t in range(6)],
                               [0.125, 0.25, 0.375, 0.5, 0.5, 0.5], rtol=1e-6)
    assert float(constant(0.5)(0)) == 0.5


@pytest.mark.parametrize("bad", [
    dict(peak=-1.0, total_steps=10, warmup_steps=1),
    dict(peak=1.0, total_steps=5, warmup_steps=5),
    dict(peak=1.0, total_steps=10, warmup_steps=1, final_fraction=2.0)])
def test_warmup_cosine_rejects_bad_config(bad):
    with pytest.raises(ValueError, match="warmup_cosine"):
        warmup_cosine(**bad)


@pytest.mark.parametrize("make", [adamw, lion])
def test_aliases_accept_schedules_and_match_optax(make):
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    grads = {"w": jnp.full((3, 2), 0.5), "b": jnp.ones(2)}
    schedule = warmup_cosine(1e-2, total_steps=20, warmup_steps=2)
    tx = make(schedule, weight_decay=0.1)
    ref = (optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.1) if make is adamw
           else optax.lion(schedule, b1=0.9, b2=0.99, weight_decay=0.1))
    state, ref_state = tx.init(params), ref.init(params)
    for _ in range(3):
        updates, state = jax.jit(tx.update)(grads, state, params, batch=jnp.ones(2))
        ref_updates, ref_state = jax.jit(ref.update)(grads, ref_state, params)
        jax.tree.map(np.testing.assert_array_equal, updates, ref_updates)
