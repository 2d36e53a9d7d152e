"""Small dense models for toy problems and tests: :class:`MLP` and :class:`LinearModel`."""

from __future__ import annotations

from typing import Sequence

import equinox as eqx
import jax

from gnopt.models.layers import Array, Linear, Tap

_ACTIVATIONS = {"tanh": jax.nn.tanh, "relu": jax.nn.relu, "gelu": jax.nn.gelu}


class MLP(eqx.Module):
    """``x → W_L σ(… σ(W_1 x + b_1) …) + b_L``: ``len(sizes) − 1`` dense layers.

    Layers are named ``"layers.{i}"`` and initialised ``N(0, 1/fan_in)``, biases 0.
    """

    layers: tuple[Linear, ...]
    activation: str = eqx.field(static=True)

    def __init__(self, sizes: Sequence[int], *, key: Array, activation: str = "tanh",
                 use_bias: bool = True):
        sizes = tuple(sizes)
        if len(sizes) < 2 or any(not isinstance(s, int) or s <= 0 for s in sizes):
            raise ValueError(f"MLP sizes must be at least two positive ints, got {sizes}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown MLP activation {activation!r}; expected one of "
                             f"{sorted(_ACTIVATIONS)}")
        keys = jax.random.split(key, len(sizes) - 1)
        self.layers = tuple(
            Linear(n_in, n_out, key=k, name=f"layers.{i}", use_bias=use_bias)
            for i, (n_in, n_out, k) in enumerate(zip(sizes[:-1], sizes[1:], keys)))
        self.activation = activation

    def __call__(self, x: Array, tap: Tap | None = None) -> Array:
        """Applies the network to ``x[..., sizes[0]]``; ``tap`` goes to every layer."""
        for layer in self.layers[:-1]:
            x = _ACTIVATIONS[self.activation](layer(x, tap))
        return self.layers[-1](x, tap)


class LinearModel(eqx.Module):
    """``x → W x + b``: one dense layer named ``"linear"``."""

    linear: Linear

    def __init__(self, in_features: int, out_features: int, *, key: Array):
        self.linear = Linear(in_features, out_features, key=key, name="linear", use_bias=True)

    def __call__(self, x: Array, tap: Tap | None = None) -> Array:
        return self.linear(x, tap)
