"""Cross-entropy with masks: ignore labels at masked positions, out-of-range labels elsewhere."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, strategies as st

from gnopt import losses
from gnopt.transforms.kfac import output_cotangents

ce = losses.softmax_cross_entropy


@st.composite
def masked_problems(draw):
    """Logits ``[*lead, V]``, valid labels, a random mask and ignore labels for masked positions."""
    # few distinct shapes, so that compiled computations are reused across examples
    lead = draw(st.sampled_from([(4,), (2, 3)]))
    num_classes = draw(st.sampled_from([2, 5]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    logits = 2.0 * rng.normal(size=lead + (num_classes,))
    labels = rng.integers(0, num_classes, size=lead)
    mask = rng.random(size=lead) < draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    ignore = np.array(draw(st.lists(
        st.one_of(st.sampled_from([-100, -1, num_classes, num_classes + 7, 2**31 - 1, -2**31]),
                  st.integers(-2**31, 2**31 - 1)),
        min_size=labels.size, max_size=labels.size))).reshape(lead)
    tangent = rng.normal(size=logits.shape)
    return logits, labels, mask, ignore, tangent


def with_ignored(labels, mask, ignore):
    return np.where(mask, labels, ignore)


def with_zeros(labels, mask):
    return np.where(mask, labels, 0)


def all_parts(logits, targets, tangent):
    """Loss, ``jax.grad``, the closed-form gradient and Hessian product (jax arrays in)."""
    z, u = jnp.asarray(logits), jnp.asarray(tangent)
    targets = jax.tree.map(jnp.asarray, targets)
    return (ce(z, targets), jax.grad(ce)(z, targets), ce.grad(z, targets),
            ce.hvp(z, targets, u))


@given(problem=masked_problems())
def test_masked_positions_ignore_their_labels(problem):
    logits, labels, mask, ignore, tangent = problem
    zeroed = all_parts(logits, (with_zeros(labels, mask), mask), tangent)
    for parts in (all_parts(logits, (with_ignored(labels, mask, ignore), mask), tangent),
                  jax.jit(all_parts)(logits, (with_ignored(labels, mask, ignore), mask), tangent)):
        for got, want in zip(parts, zeroed):
            assert np.all(np.isfinite(got))
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    # host (NumPy) targets take the same path, with no error for masked ignore labels
    np.testing.assert_allclose(ce(jnp.asarray(logits), (with_ignored(labels, mask, ignore), mask)),
                               zeroed[0], rtol=1e-6, atol=1e-7)


@given(problem=masked_problems())
def test_masked_loss_matches_optax_on_the_unmasked_tokens(problem):
    logits, labels, mask, ignore, _ = problem
    loss = ce(jnp.asarray(logits), (jnp.asarray(with_ignored(labels, mask, ignore)),
                                    jnp.asarray(mask)))
    kept = optax.softmax_cross_entropy_with_integer_labels(
        jnp.asarray(logits[mask], jnp.float32), jnp.asarray(labels[mask]))
    expected = float(jnp.mean(kept)) if mask.any() else 0.0
    np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)


@jax.jit
def float64_products(z, labels, mask, clean_labels, u):
    """The closed-form ``hvp`` and gradient with ignore labels, and references to check them."""
    targets = (labels, mask)
    # forward-over-reverse of the loss itself, and the dense Hessian of an independent formula
    fwd_rev = jax.jvp(lambda x: jax.grad(ce)(x, targets), (z,), (u,))[1]
    weights = mask / jnp.maximum(mask.sum(), 1)

    def reference(x):
        picked = jnp.take_along_axis(x, clean_labels[..., None], -1)[..., 0]
        return jnp.sum(weights * (jax.nn.logsumexp(x, axis=-1) - picked))

    dense = jax.hessian(reference)(z).reshape(z.size, z.size)
    return dict(hvp=(ce.hvp(z, targets, u), fwd_rev, (dense @ u.reshape(-1)).reshape(z.shape)),
                loss=(ce(z, targets), reference(z)),
                grad=(ce.grad(z, targets), jax.grad(ce)(z, targets), jax.grad(reference)(z)))


@given(problem=masked_problems())
def test_masked_hvp_matches_jax_hessian_in_float64(x64, problem):
    logits, labels, mask, ignore, tangent = problem
    out = float64_products(jnp.asarray(logits), jnp.asarray(with_ignored(labels, mask, ignore)),
                           jnp.asarray(mask, jnp.float64), jnp.asarray(with_zeros(labels, mask)),
                           jnp.asarray(tangent))
    for name, (got, *references) in out.items():
        assert got.dtype == jnp.float64, name
        for want in references:
            assert np.all(np.isfinite(want)), name
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13, err_msg=name)


def test_all_masked_gives_zero_loss_gradient_and_hvp():
    z = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 5)), jnp.float32)
    targets = (jnp.full((2, 3), -100), jnp.zeros((2, 3)))
    loss, g, g_closed, hu = all_parts(z, targets, jnp.ones_like(z))
    assert float(loss) == 0.0
    for x in (g, g_closed, hu):
        np.testing.assert_array_equal(x, 0.0)
    assert float(jax.jit(ce)(z, targets)) == 0.0


@pytest.mark.parametrize("bad", [-1, -100, 5, 9])
def test_unmasked_out_of_range_label_poisons_the_loss(bad):
    """JAX labels (no host sync): NaN in the loss, its gradients and its Hessian product."""
    z = jnp.asarray(np.random.default_rng(1).normal(size=(4, 5)), jnp.float32)
    labels = jnp.asarray([0, bad, 2, 3])
    for targets in (labels, (labels, jnp.asarray([1, 1, 0, 1]))):
        parts = all_parts(z, targets, jnp.ones_like(z))
        assert np.isnan(parts[0])
        for x in parts[1:]:  # the bad token's row, and only it
            assert np.all(np.isnan(x[1])) and np.all(np.isfinite(np.delete(np.asarray(x), 1, 0)))
        assert np.isnan(jax.jit(ce)(z, targets))


def test_unmasked_out_of_range_numpy_label_raises():
    z = jnp.zeros((4, 5))
    with pytest.raises(ValueError, match=r"label 5 at unmasked position \(1,\) is outside \[0, 5\)"):
        ce(z, np.array([0, 5, 2, 3]))
    with pytest.raises(ValueError, match=r"label -100 at unmasked position \(2,\)"):
        ce.grad(z, (np.array([-100, 1, -100, 3]), np.array([0, 1, 1, 1])))
    with pytest.raises(ValueError, match=r"label -1 at unmasked position \(0,\)"):
        ce.hvp(z, np.array([-1, 1, 2, 3]), z)
    # masked ones are fine
    assert np.isfinite(ce(z, (np.array([-100, 1, 7, 3]), np.array([0, 1, 0, 1]))))


def test_narrow_label_dtypes_do_not_wrap():
    """uint8 labels (byte-level data): 255 is a valid class of 256, and out of range of 200."""
    labels = jnp.asarray([255, 3], jnp.uint8)
    np.testing.assert_allclose(ce(jnp.zeros((2, 256)), labels), np.log(256), rtol=1e-6)
    assert np.isnan(ce(jnp.zeros((2, 200)), labels))
    assert float(ce(jnp.zeros((2, 200)), (labels, jnp.asarray([0, 1])))) == pytest.approx(np.log(200))


def test_weights_sum_to_one_for_any_nonzero_mask():
    _, w = losses.labels_and_weights((jnp.zeros(3, jnp.int32), jnp.asarray([0.25, 0.25, 0.0])), (3,))
    np.testing.assert_allclose(w, [0.5, 0.5, 0.0])
    _, w = losses.labels_and_weights((jnp.zeros(3, jnp.int32), jnp.asarray([True, False, True])), (3,))
    np.testing.assert_allclose(w, [0.5, 0.0, 0.5])
    _, w = losses.labels_and_weights(jnp.zeros(4, jnp.int32), (4,))
    np.testing.assert_allclose(w, 0.25)


def test_kfac_cotangents_ignore_masked_labels():
    """K-FAC's Fisher samples read the CE targets too: ignore labels must not matter."""
    z = jnp.asarray(np.random.default_rng(2).normal(size=(3, 4)), jnp.float32)
    mask = jnp.asarray([1, 0, 1])
    key = jax.random.key(0)
    u_ignored = output_cotangents(ce, z, (jnp.asarray([1, -100, 2]), mask), key)
    u_zeroed = output_cotangents(ce, z, (jnp.asarray([1, 0, 2]), mask), key)
    np.testing.assert_array_equal(u_ignored, u_zeroed)
    assert np.all(np.isfinite(u_ignored))
