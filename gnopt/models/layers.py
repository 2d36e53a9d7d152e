"""Layers shared by the models: a tappable dense layer, an embedding and norms.

Every parameter is an array leaf; names and sizes are static fields, so a model
is its own parameter pytree (``apply_fn = lambda m, x: m(x)``). Parameters stay
float32; a layer casts them to its input's dtype at use, so the compute dtype is
set once, where the activations are made.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import equinox as eqx
import jax
import jax.numpy as jnp

Array = jax.Array
Tap = Callable[[str, Array, Array], Array]
"""``tap(name, x, y) -> y'``: sees a dense layer's input ``x`` and output ``y``
and returns the output to use (e.g. ``y`` plus a zero perturbation whose
cotangent K-FAC reads). The explicit hook replaces graph tagging."""


class Linear(eqx.Module):
    """Dense layer ``y = x @ W (+ b)`` with ``W`` of shape ``(in, out)``.

    Attributes:
      weight: ``(in_features, out_features)``, initialised ``N(0, init_std²)``
        with ``init_std = 1/√in_features`` unless given.
      bias: ``(out_features,)`` zeros, or ``None``.
      name: static, unique within the model (e.g. ``"layers.0.attn.wq"``); the
        name a tap sees.
    """

    weight: Array
    bias: Optional[Array]
    name: str = eqx.field(static=True)

    def __init__(self, in_features: int, out_features: int, *, key: Array, name: str,
                 use_bias: bool = False, init_std: float | None = None):
        std = 1.0 / math.sqrt(in_features) if init_std is None else init_std
        self.weight = std * jax.random.normal(key, (in_features, out_features), jnp.float32)
        self.bias = jnp.zeros((out_features,), jnp.float32) if use_bias else None
        self.name = name

    def __call__(self, x: Array, tap: Tap | None = None) -> Array:
        """Applies the layer to ``x[..., in]``; with a tap, returns ``tap(name, x, y)``."""
        y = x @ self.weight.astype(x.dtype)
        if self.bias is not None:
            y = y + self.bias.astype(x.dtype)
        return y if tap is None else tap(self.name, x, y)


class Embedding(eqx.Module):
    """Token embedding: row ``tokens`` of ``weight [vocab, d]``, ``N(0, init_std²)``."""

    weight: Array

    def __init__(self, vocab_size: int, dim: int, *, key: Array, init_std: float):
        self.weight = init_std * jax.random.normal(key, (vocab_size, dim), jnp.float32)

    def __call__(self, tokens: Array) -> Array:
        return jnp.take(self.weight, tokens, axis=0)


class RMSNorm(eqx.Module):
    """``y = x / √(mean(x²) + eps) · w`` over the last axis (Zhang & Sennrich 2019).

    Computed in float32, returned in the input's dtype; ``w`` starts at ones.
    """

    weight: Array
    eps: float = eqx.field(static=True)

    def __init__(self, dim: int, eps: float = 1e-6):
        self.weight = jnp.ones((dim,), jnp.float32)
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.weight).astype(x.dtype)


class LayerNorm(eqx.Module):
    """``y = (x − mean) / √(var + eps) · w + b`` over the last axis (Ba et al. 2016).

    Computed in float32, returned in the input's dtype; ``w`` ones, ``b`` zeros.
    """

    weight: Array
    bias: Array
    eps: float = eqx.field(static=True)

    def __init__(self, dim: int, eps: float = 1e-6):
        self.weight = jnp.ones((dim,), jnp.float32)
        self.bias = jnp.zeros((dim,), jnp.float32)
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        y = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + self.eps)
        return (y * self.weight + self.bias).astype(x.dtype)
