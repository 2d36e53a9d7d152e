"""Tests of gnopt.models: shapes, causality, RoPE, forward-mode AD, taps, sizes."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gnopt.models import (LLaMA, MLP, PRESETS, LLaMAConfig, LinearModel, apply_rope,
                          count_params, describe, llama_config)

MICRO = LLaMAConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, d_ff=24, seq_len=16)
VARIANTS = {
    "swiglu-default": MICRO,
    "gelu-qknorm-paper": dataclasses.replace(MICRO, mlp="gelu", qk_norm=True, init="paper"),
}


_call = eqx.filter_jit(lambda model, tokens, tap=None: model(tokens, tap))
"""Jitted forward (compiling once is faster on CPU than op-by-op dispatch)."""


def _tokens(batch=2, length=12, vocab=32, seed=0):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, vocab, jnp.int32)


@pytest.fixture(params=list(VARIANTS), ids=list(VARIANTS))
def micro(request):
    return LLaMA(VARIANTS[request.param], key=jax.random.key(1))


def test_llama_shapes_and_jit(micro):
    tokens = _tokens()
    logits = _call(micro, tokens)
    assert logits.shape == (2, 12, 32) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    np.testing.assert_allclose(micro(tokens), logits, rtol=1e-5, atol=1e-6)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(micro))


def test_llama_is_causal(micro):
    tokens = _tokens(batch=1)
    changed_at = 7
    other = tokens.at[0, changed_at].set((tokens[0, changed_at] + 1) % 32)
    before, after = _call(micro, tokens), _call(micro, other)
    np.testing.assert_allclose(before[:, :changed_at], after[:, :changed_at], rtol=0, atol=1e-6)
    assert float(jnp.max(jnp.abs(before[:, changed_at:] - after[:, changed_at:]))) > 1e-4


def test_rope_scores_depend_on_relative_position_only():
    q, k = jax.random.normal(jax.random.key(2), (2, 8))
    length = 10
    rq = apply_rope(jnp.broadcast_to(q, (length, 1, 8)), 1e4)[:, 0]
    rk = apply_rope(jnp.broadcast_to(k, (length, 1, 8)), 1e4)[:, 0]
    scores = rq @ rk.T  # scores[m, n] = <R_m q, R_n k>
    for shift in (1, 3):
        np.testing.assert_allclose(scores[shift:, shift:], scores[:-shift, :-shift], atol=1e-5)
    assert not np.allclose(scores[0, 0], scores[0, 2])  # positions do matter
    np.testing.assert_allclose(jnp.linalg.norm(rq, axis=-1), jnp.linalg.norm(q), rtol=1e-5)
    np.testing.assert_allclose(apply_rope(q.reshape(1, 1, 8), 1e4)[0, 0], q, atol=1e-7)


def test_llama_forward_mode_and_transpose(micro):
    tokens = _tokens()
    f = lambda m: m(tokens)

    @jax.jit
    def products(model, direction, cotangent):
        _, jvp_fn = jax.linearize(f, model)
        (transposed,) = jax.linear_transpose(jvp_fn, model)(cotangent)
        (pulled_back,) = jax.vjp(f, model)[1](cotangent)
        return jvp_fn(direction), transposed, pulled_back

    # A direction on the scale of each parameter, so a small step stays local.
    direction = jax.tree.map(lambda x: jax.random.normal(jax.random.key(3), x.shape)
                             * jnp.maximum(jnp.sqrt(jnp.mean(x * x)), 1e-3), micro)
    cotangent = jax.random.normal(jax.random.key(4), (2, 12, 32))
    tangent, transposed, pulled_back = products(micro, direction, cotangent)
    eps = 1e-2
    shifted = lambda s: jax.tree.map(lambda p, d: p + s * eps * d, micro, direction)
    finite_diff = (_call(shifted(1), tokens) - _call(shifted(-1), tokens)) / (2 * eps)
    rel = jnp.linalg.norm(tangent - finite_diff) / jnp.linalg.norm(tangent)
    assert float(rel) < 2e-2, float(rel)
    # The GGN product transposes the linearisation: it must agree with reverse mode.
    for a, b in zip(jax.tree.leaves(transposed), jax.tree.leaves(pulled_back)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_llama_bfloat16_compute():
    config = dataclasses.replace(MICRO, compute_dtype="bfloat16")
    model = LLaMA(config, key=jax.random.key(1))
    reference = _call(LLaMA(MICRO, key=jax.random.key(1)), _tokens())
    logits = _call(model, _tokens())
    assert logits.dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(model))
    scale = float(jnp.max(jnp.abs(reference)))
    assert float(jnp.max(jnp.abs(logits - reference))) < 0.1 * scale
    jax.linearize(jax.jit(lambda m: m(_tokens())), model)  # forward mode works in bf16 too


def _expected_count(c: LLaMAConfig) -> int:
    mlp_matrices = 3 if c.mlp == "swiglu" else 2
    per_layer = 4 * c.d_model**2 + mlp_matrices * c.d_model * c.d_ff + 2 * c.d_model
    per_layer += 4 * c.d_model if c.qk_norm else 0
    return 2 * c.vocab_size * c.d_model + c.n_layers * per_layer + c.d_model


@pytest.mark.parametrize("name", ["45m", "150m"])
@pytest.mark.parametrize("mlp, qk_norm", [("gelu", True), ("swiglu", False)])
def test_preset_parameter_counts(name, mlp, qk_norm):
    config = llama_config(name, mlp=mlp, qk_norm=qk_norm)
    shapes = eqx.filter_eval_shape(LLaMA, config, key=jax.random.key(0))
    assert count_params(shapes) == _expected_count(config)


def test_paper_presets_match_reference_sizes():
    counts = {name: count_params(eqx.filter_eval_shape(LLaMA, llama_config(name),
                                                       key=jax.random.key(0)))
              for name in ("45m", "150m")}
    assert abs(counts["45m"] / 45e6 - 1) < 0.03
    # The reference code's "150M" (GELU MLP, d_ff 3072, vocab 32000) has 134.1M.
    assert abs(counts["150m"] / 134.14e6 - 1) < 0.001


def test_tap_sees_every_linear_once_with_its_input():
    model = LLaMA(llama_config("tiny", mlp="swiglu"), key=jax.random.key(0))
    seen = []

    def tap(name, x, y):
        seen.append((name, x.shape[-1], y.shape[-1]))
        return y

    tokens = _tokens(length=8, vocab=256)
    np.testing.assert_allclose(_call(model, tokens, tap), _call(model, tokens), atol=1e-6)
    expected = [f"layers.{i}.{part}" for i in range(2)
                for part in ("attn.wq", "attn.wk", "attn.wv", "attn.wo",
                             "mlp.up", "mlp.gate", "mlp.down")] + ["head"]
    assert sorted(name for name, _, _ in seen) == sorted(expected)
    dims = {name: (n_in, n_out) for name, n_in, n_out in seen}
    assert dims["layers.1.mlp.down"] == (256, 64) and dims["head"] == (64, 256)
    shifted = _call(model, tokens, lambda name, x, y: y + 1.0 if name == "head" else y)
    np.testing.assert_allclose(shifted, _call(model, tokens) + 1.0, atol=1e-5)


def test_linear_names_are_unique_and_top_level_blocks_are_plain():
    model = LLaMA(PRESETS["tiny"], key=jax.random.key(0))
    names = [leaf.name for leaf in jax.tree.leaves(
        model, is_leaf=lambda x: hasattr(x, "name") and hasattr(x, "weight"))
        if hasattr(leaf, "name")]
    assert len(names) == len(set(names)) == 2 * 6 + 1
    assert [f.name for f in dataclasses.fields(model)] == ["embed", "layers", "norm", "head",
                                                           "config"]
    assert isinstance(model.layers, tuple) and len(model.layers) == 2
    assert model.embed.weight.shape == (256, 64) and model.head.weight.shape == (64, 256)
    np.testing.assert_array_equal(model.norm.weight, np.ones(64))


def test_paper_init_scales():
    model = eqx.filter_eval_shape(LLaMA, llama_config("tiny"), key=jax.random.key(0))
    assert model.layers[0].mlp.gate is None and model.layers[0].attn.q_norm is not None
    real = LLaMA(llama_config("tiny"), key=jax.random.key(0))
    np.testing.assert_allclose(jnp.std(real.embed.weight), 0.02, rtol=0.05)
    np.testing.assert_allclose(jnp.std(real.layers[0].mlp.down.weight), 0.02 / 16, rtol=0.05)
    default = LLaMA(llama_config("tiny", init="default"), key=jax.random.key(0))
    np.testing.assert_allclose(jnp.std(default.layers[0].attn.wq.weight), 1 / 8, rtol=0.05)


def test_config_errors():
    with pytest.raises(ValueError, match=r"unknown LLaMA config 'huge'.*'150m', '45m', 'tiny'"):
        llama_config("huge")
    with pytest.raises(ValueError, match="unknown LLaMAConfig field.*d_mdoel"):
        llama_config("tiny", d_mdoel=3)
    with pytest.raises(ValueError, match="d_model=60 must split into n_heads=8"):
        llama_config("tiny", d_model=60, n_heads=8)
    with pytest.raises(ValueError, match="compute_dtype='float16'"):
        llama_config("tiny", compute_dtype="float16")
    with pytest.raises(ValueError, match="n_layers must be a positive int"):
        llama_config("tiny", n_layers=0)
    model = LLaMA(MICRO, key=jax.random.key(0))
    with pytest.raises(ValueError, match="exceeds config.seq_len=16"):
        model(jnp.zeros((1, 17), jnp.int32))
    with pytest.raises(ValueError, match=r"integer tokens \[batch, time\]"):
        model(jnp.zeros((17,), jnp.int32))


def test_mlp_and_linear_model():
    mlp = MLP([3, 5, 2], key=jax.random.key(0), activation="relu")
    x = jax.random.normal(jax.random.key(1), (4, 3))
    w0, b0, w1, b1 = mlp.layers[0].weight, mlp.layers[0].bias, mlp.layers[1].weight, mlp.layers[1].bias
    np.testing.assert_allclose(mlp(x), jax.nn.relu(x @ w0 + b0) @ w1 + b1, rtol=1e-6)
    assert count_params(mlp) == 3 * 5 + 5 + 5 * 2 + 2
    assert describe(mlp) == "MLP: 32 parameters"
    seen = []
    mlp(x, tap=lambda name, a, y: seen.append(name) or y)
    assert seen == ["layers.0", "layers.1"]
    assert MLP([3, 2], key=jax.random.key(0), use_bias=False).layers[0].bias is None
    linear = LinearModel(3, 2, key=jax.random.key(0))
    np.testing.assert_allclose(linear(x), x @ linear.linear.weight + linear.linear.bias)
    assert linear.linear.name == "linear" and count_params(linear) == 8
    with pytest.raises(ValueError, match="unknown MLP activation 'sigmoid'"):
        MLP([3, 2], key=jax.random.key(0), activation="sigmoid")
    with pytest.raises(ValueError, match="at least two positive ints"):
        MLP([3], key=jax.random.key(0))


def test_describe_llama_is_one_line():
    line = describe(LLaMA(MICRO, key=jax.random.key(0)))
    assert "\n" not in line and line.startswith(f"LLaMA: {_expected_count(MICRO):,} parameters")
