"""GGN products against the explicitly materialised ``Jᵀ H J`` (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st
from jax.flatten_util import ravel_pytree

import gnopt
from gnopt import losses
from gnopt.curvature import default_block_labels, leaf_block_ids


def mlp_apply(params, x):
    for i, layer in enumerate(params["layers"]):
        x = x @ layer["w"] + layer["b"]
        if i < len(params["layers"]) - 1:
            x = jnp.tanh(x)
    return x


def make_mlp(rng, sizes):
    return {"layers": tuple(
        {"w": jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a)), "b": jnp.asarray(0.1 * rng.normal(size=(b,)))}
        for a, b in zip(sizes[:-1], sizes[1:]))}


def dense_ggn(apply_fn, loss_fn, params, batch):
    """``Jᵀ H J`` materialised with ``jax.jacfwd`` and ``jax.hessian``."""
    inputs, targets = batch
    flat, unravel = ravel_pytree(params)
    z0 = apply_fn(params, inputs)
    jac = jax.jacfwd(lambda f: apply_fn(unravel(f), inputs).reshape(-1))(flat)
    hess = jax.hessian(lambda z: loss_fn(z.reshape(z0.shape), targets))(z0.reshape(-1))
    return jac.T @ hess @ jac, flat, unravel


def mlp_problem(seed, loss_name, masked=False):
    rng = np.random.default_rng(seed)
    sizes = [3, 4, 5] if loss_name == "ce" else [3, 4, 2]
    params = make_mlp(rng, sizes)
    x = jnp.asarray(rng.normal(size=(6, 3)))
    if loss_name == "ce":
        labels = jnp.asarray(rng.integers(0, sizes[-1], size=6))
        targets = (labels, jnp.asarray(rng.integers(0, 2, size=6)).at[0].set(1)) if masked else labels
        return params, (x, targets), losses.softmax_cross_entropy
    return params, (x, jnp.asarray(rng.normal(size=(6, 2)))), losses.mean_squared_error


@given(seed=st.integers(0, 2**31 - 1), loss_name=st.sampled_from(["ce", "ce_mask", "mse"]))
def test_ggn_mvp_matches_dense_mlp(x64, seed, loss_name):
    params, batch, loss_fn = mlp_problem(seed, loss_name[:3].rstrip("_"), masked=loss_name == "ce_mask")
    g_dense, flat, unravel = dense_ggn(mlp_apply, loss_fn, params, batch)
    v = jnp.asarray(np.random.default_rng(seed + 1).normal(size=flat.shape))
    gv = gnopt.ggn_mvp(mlp_apply, loss_fn, params, batch, unravel(v))
    np.testing.assert_allclose(ravel_pytree(gv)[0], g_dense @ v, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(g_dense, g_dense.T, atol=1e-12)
    assert np.linalg.eigvalsh(np.asarray(g_dense)).min() > -1e-10


@given(seed=st.integers(0, 2**31 - 1), loss_name=st.sampled_from(["ce", "mse"]))
def test_layerwise_is_block_diagonal_of_full(x64, seed, loss_name):
    params, batch, loss_fn = mlp_problem(seed, loss_name)
    g_dense, flat, unravel = dense_ggn(mlp_apply, loss_fn, params, batch)
    ids, names = leaf_block_ids(params, default_block_labels)
    assert names == ["layers.0", "layers.1"]
    block_of_entry = ravel_pytree(jax.tree.unflatten(
        jax.tree.structure(params),
        [jnp.full(x.shape, i, jnp.float64) for x, i in zip(jax.tree.leaves(params), ids)]))[0]
    same = np.asarray(block_of_entry)[:, None] == np.asarray(block_of_entry)[None, :]
    v = jnp.asarray(np.random.default_rng(seed + 2).normal(size=flat.shape))
    gv = gnopt.ggn_mvp(mlp_apply, loss_fn, params, batch, unravel(v), blocks=default_block_labels)
    np.testing.assert_allclose(ravel_pytree(gv)[0], np.where(same, g_dense, 0.0) @ v,
                               rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("masked", [False, True])
def test_ggn_mvp_matches_dense_tiny_transformer(x64, masked):
    from gnopt.models import LLaMA, llama_config

    cfg = llama_config("tiny", vocab_size=7, d_model=8, n_layers=1, n_heads=2, d_ff=12, seq_len=4)
    model = jax.tree.map(lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                         LLaMA(cfg, key=jax.random.key(0)))
    rng = np.random.default_rng(3)
    tokens = jnp.asarray(rng.integers(0, 7, size=(2, 4)), jnp.int32)
    labels = jnp.asarray(rng.integers(0, 7, size=(2, 4)), jnp.int32)
    targets = (labels, jnp.asarray([[1, 1, 0, 1], [0, 1, 1, 1]])) if masked else labels
    apply_fn = lambda m, x: m(x)
    g_dense, flat, unravel = dense_ggn(apply_fn, losses.softmax_cross_entropy, model, (tokens, targets))
    v = jnp.asarray(rng.normal(size=flat.shape))
    gv = gnopt.ggn_mvp(apply_fn, losses.softmax_cross_entropy, model, (tokens, targets), unravel(v))
    np.testing.assert_allclose(ravel_pytree(gv)[0], g_dense @ v, rtol=1e-8, atol=1e-11)
    assert np.linalg.eigvalsh(np.asarray(g_dense)).min() > -1e-9
    blocks = gnopt.ggn_mvp(apply_fn, losses.softmax_cross_entropy, model, (tokens, targets),
                           unravel(v), blocks=default_block_labels)
    ids, names = leaf_block_ids(model, default_block_labels)
    assert names[0] == "embed" and "layers.0" in names and names[-1] == "head"
    labels_flat = np.asarray(ravel_pytree(jax.tree.unflatten(
        jax.tree.structure(model),
        [jnp.full(x.shape, i, jnp.float64) for x, i in zip(jax.tree.leaves(model), ids)]))[0])
    mask = labels_flat[:, None] == labels_flat[None, :]
    np.testing.assert_allclose(ravel_pytree(blocks)[0], np.where(mask, g_dense, 0.0) @ v,
                               rtol=1e-8, atol=1e-11)


def test_generic_loss_uses_autodiff_hessian(x64):
    """A plain callable loss gets ``H_z`` by forward-over-reverse."""
    params, batch, _ = mlp_problem(0, "mse")
    huber = lambda z, y: jnp.mean(jnp.sqrt(1.0 + (z - y) ** 2))
    g_dense, flat, unravel = dense_ggn(mlp_apply, huber, params, batch)
    v = jnp.ones_like(flat)
    gv = gnopt.ggn_mvp(mlp_apply, huber, params, batch, unravel(v))
    np.testing.assert_allclose(ravel_pytree(gv)[0], g_dense @ v, rtol=1e-9)


@given(seed=st.integers(0, 2**31 - 1), loss_name=st.sampled_from(["ce", "mse"]))
def test_trust_ratio_and_curvature_ratio_match_exact_maths(x64, seed, loss_name):
    """``ρ``, the model's decrease, ``ΔᵀGΔ`` and the parabola's curvature ratio
    against jax.grad, the dense GGN and two loss evaluations."""
    params, batch, loss_fn = mlp_problem(seed, loss_name)
    g_dense, flat, unravel = dense_ggn(mlp_apply, loss_fn, params, batch)
    step = 0.3 * jnp.asarray(np.random.default_rng(seed + 2).normal(size=flat.shape))
    loss = lambda f: loss_fn(mlp_apply(unravel(f), batch[0]), batch[1])
    slope = jax.grad(loss)(flat) @ step
    actual = loss(flat) - loss(flat + step)
    measured = gnopt.curvature.trust_ratio(mlp_apply, loss_fn, params, batch, unravel(step))
    curvature = step @ g_dense @ step
    predicted = -(slope + 0.5 * curvature)
    np.testing.assert_allclose(measured.curvature, curvature, rtol=1e-9)
    np.testing.assert_allclose(measured.predicted, predicted, rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(measured.actual, actual, rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(measured.rho, actual / predicted, rtol=1e-8)
    parabola = 2 * (loss(flat + step) - loss(flat) - slope)  # c with L(1) = L(0) + slope + c/2
    np.testing.assert_allclose(measured.curvature_ratio, parabola / curvature, rtol=1e-7)


def test_curvature_ratio_is_one_where_the_model_is_the_loss(x64):
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(3, 2))), "b": jnp.zeros(2)}
    batch = (jnp.asarray(rng.normal(size=(5, 3))), jnp.asarray(rng.normal(size=(5, 2))))
    apply_fn = lambda p, x: x @ p["w"] + p["b"]
    step = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), params)
    measured = gnopt.curvature.trust_ratio(apply_fn, losses.mean_squared_error, params, batch, step)
    assert float(measured.curvature_ratio) == pytest.approx(1.0, abs=1e-10)
    assert float(measured.rho) == pytest.approx(1.0, abs=1e-10)


def test_bad_batch_and_labels_are_clear_errors():
    params, (x, y), _ = mlp_problem(0, "ce")
    with pytest.raises(ValueError, match="pair"):
        gnopt.ggn_mvp(mlp_apply, losses.softmax_cross_entropy, params, x, params)
    with pytest.raises(ValueError, match="labels have shape"):
        gnopt.ggn_mvp(mlp_apply, losses.softmax_cross_entropy, params, (x, y[:3]), params)
    with pytest.raises(ValueError, match="structure"):
        gnopt.ggn_mvp(mlp_apply, losses.softmax_cross_entropy, params, (x, y), params, blocks={"a": 1})
