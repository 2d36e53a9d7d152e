"""K-FAC: Kronecker-factored curvature for dense layers (Martens & Grosse 2015).

Dense layers are found through the explicit tap hook of our models: every
dense layer (``gnopt.models.Linear`` or any equinox module with a static string
``name``, a ``(in, out)`` ``weight`` and a ``bias`` field, ``y = x @ W (+ b)``)
calls ``tap(name, x, y)`` and uses its return value. ``apply_fn(params,
inputs, tap)`` must pass the tap on; for our models it is :func:`tapped_call`.

Per layer, with ``x̄ = [x, 1]`` when the layer has a bias and ``n`` tokens:

* ``A = (1/n) Σ_t x̄_t x̄_tᵀ`` (activation factor);
* ``S = Σ_t J_tᵀ H_t J_t`` (output factor), ``J_t = ∂z/∂y_t``, ``H_t`` the
  Hessian of the (mean) loss in the outputs ``z``: the tap adds a zero
  perturbation ``e`` to ``y``, and ``S = Σ_k P_kᵀ P_k`` with
  ``P_k = (∂z/∂e)ᵀ u_k`` for output cotangents ``u_k`` with
  ``E[Σ_k u_k u_kᵀ] = H``:

  - softmax cross-entropy: one Fisher sample per token,
    ``u = √w_t (p_t − onehot(ỹ_t))``, ``ỹ_t ~ softmax(z_t)`` (the MC Fisher,
    equal to the GGN in expectation);
  - mean squared error: the exact GGN factor, ``u_k = e_k/√N`` for each output
    unit ``k`` (``N = z.size``; one vjp per output unit). It is exact when
    tokens do not mix (MLPs); for a single dense layer ``A ⊗ S`` *is* the GGN;
* both factors are EMAs (``ema_decay``; the first step takes the batch's);
* preconditioned gradient ``(A + π√δ I)⁻¹ ∇W̄ (S + √δ/π I)⁻¹`` (factored
  Tikhonov damping, ``W̄ = [W; b]``; ``π² = (tr A/dim A)/(tr S/dim S)`` balances
  the two factors' scales, ``pi_correction=False`` sets ``π = 1``), the inverses
  refreshed every ``inverse_every`` steps and cached.

Cost per step: one extra forward pass and one backward pass per output
cotangent (one for cross-entropy) for the statistics, the factor products,
and every ``inverse_every`` steps one Cholesky inverse per factor.

Rule for other parameters: every leaf that is not the weight or bias of a
tapped dense layer (embeddings, norms, …), and every dense layer with a factor
larger than ``max_factor_dim`` (e.g. an LM head over a 32k vocabulary), is
updated by the ``fallback`` optax transform (default ``optax.adam(lr)``).
Limits: each dense layer must be applied once per forward pass and not inside
``lax.scan``/``vmap`` over layers.

References:
  Martens & Grosse, *Optimizing neural networks with Kronecker-factored
  approximate curvature*, ICML 2015, §3 (factors, bias as a homogeneous
  coordinate), §5 (sampled targets), §6.3 (factored Tikhonov damping).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.scipy.linalg import cho_factor, cho_solve

from gnopt._checks import check_int, check_learning_rate, check_number
from gnopt.requirements import requires
from gnopt import losses
from gnopt.transforms.shampoo import matmul

Array = jax.Array


def tapped_call(model, inputs, tap):
    """The tap-aware ``apply_fn`` of an equinox model of :mod:`gnopt.models`."""
    return model(inputs, tap)


def is_dense(node) -> bool:
    """A tappable dense layer: module with static ``name``, 2-D ``weight``, ``bias``."""
    return (isinstance(node, eqx.Module) and isinstance(getattr(node, "name", None), str)
            and hasattr(node, "bias") and jnp.ndim(getattr(node, "weight", None)) == 2)


def _factor_sizes(layer) -> tuple[int, int]:
    n_in, n_out = jnp.shape(layer.weight)
    return n_in + (layer.bias is not None), n_out


def _factor_dtype(layer):
    """float32, or float64 for float64 weights."""
    return jnp.result_type(layer.weight.dtype, jnp.float32)


def kfac_layers(tree, max_factor_dim: int = 4096) -> dict[str, Any]:
    """The dense layers of ``tree`` that K-FAC preconditions, by name."""
    layers = {}
    for node in jax.tree.leaves(tree, is_leaf=is_dense):
        if not is_dense(node):
            continue
        if node.name in layers:
            raise ValueError(f"kfac: two dense layers share the name {node.name!r}")
        if max(_factor_sizes(node)) <= max_factor_dim:
            layers[node.name] = node
    return layers


def kfac_labels(tree, max_factor_dim: int = 4096):
    """``'kfac'`` for weights and biases of :func:`kfac_layers`, ``'fallback'`` else."""
    names = kfac_layers(tree, max_factor_dim)

    def label(node):
        tag = "kfac" if is_dense(node) and node.name in names else "fallback"
        return jax.tree.map(lambda _: tag, node)

    return jax.tree.map(label, tree, is_leaf=is_dense)


class KfacFactors(NamedTuple):
    """Kronecker factors of one dense layer."""

    activations: Array  # A: EMA of mean x̄ x̄ᵀ, (in(+1), in(+1)), float32 (or float64)
    output_grads: Array  # S: EMA of Σ_t J_tᵀ H_t J_t, (out, out)
    inv_activations: Array  # cached (A + π√δ I)⁻¹
    inv_output_grads: Array  # cached (S + √δ/π I)⁻¹


class ScaleByKfacState(NamedTuple):
    """State of :func:`scale_by_kfac`."""

    count: Array  # steps taken, int32
    key: Array  # PRNG key of the Fisher samples (cross-entropy)
    factors: dict  # layer name -> KfacFactors


def output_cotangents(loss_fn, outputs: Array, targets, key: Array) -> Array:
    """Cotangents ``u_k`` (stacked on axis 0) with ``E[Σ_k u_k u_kᵀ] = ∇²_z loss``."""
    if isinstance(loss_fn, losses.SoftmaxCrossEntropy):
        z = outputs.astype(jnp.float32)
        _, weights = losses.labels_and_weights(targets, z.shape[:-1])
        sampled = jax.random.categorical(key, z)
        u = jax.nn.softmax(z) - jax.nn.one_hot(sampled, z.shape[-1], dtype=z.dtype)
        return (u * jnp.sqrt(weights)[..., None])[None].astype(outputs.dtype)
    if isinstance(loss_fn, losses.MeanSquaredError):
        d = outputs.shape[-1]
        eye = jnp.eye(d, dtype=outputs.dtype).reshape((d,) + (1,) * (outputs.ndim - 1) + (d,))
        scale = jnp.sqrt(outputs.size).astype(outputs.dtype)
        return jnp.broadcast_to(eye, (d,) + outputs.shape) / scale
    raise ValueError(
        "kfac: loss_fn must be gnopt.losses.softmax_cross_entropy or mean_squared_error "
        f"(K-FAC needs samples of the loss Hessian), got {loss_fn!r}")


def layer_statistics(apply_fn: Callable, loss_fn, params, batch, key: Array,
                     layers: dict[str, Any]) -> dict[str, tuple[Array, Array]]:
    """This batch's ``(A, S)`` for each layer of ``layers`` (see the module doc)."""
    inputs, targets = batch

    def forward(perturbations):
        seen = {}

        def tap(name, x, y):
            if name not in layers:
                return y
            if name in seen:
                raise ValueError(f"kfac: dense layer {name!r} was tapped twice in one forward "
                                 "pass; K-FAC needs each layer applied once")
            seen[name] = (x, y)
            return y if perturbations is None else y + perturbations[name]

        outputs = apply_fn(params, inputs, tap)
        missing = sorted(set(layers) - set(seen))
        if missing:
            raise ValueError(f"kfac: dense layers {missing} were never tapped; apply_fn must be "
                             "apply_fn(params, inputs, tap) and pass tap to every layer")
        return outputs, {name: x for name, (x, _) in seen.items()}, seen

    shapes = jax.eval_shape(lambda: forward(None)[2])
    zeros = {name: jnp.zeros(y.shape, y.dtype) for name, (_, y) in shapes.items()}
    outputs, vjp_fn, acts = jax.vjp(lambda e: forward(e)[:2], zeros, has_aux=True)
    cotangent_grads = jax.vmap(lambda u: vjp_fn(u)[0])(
        output_cotangents(loss_fn, outputs, targets, key))

    stats = {}
    for name, layer in layers.items():
        dtype = _factor_dtype(layer)
        x = acts[name].reshape(-1, acts[name].shape[-1]).astype(dtype)
        if layer.bias is not None:
            x = jnp.concatenate([x, jnp.ones((x.shape[0], 1), dtype)], axis=1)
        p = cotangent_grads[name].reshape(-1, cotangent_grads[name].shape[-1]).astype(dtype)
        stats[name] = (matmul(x.T, x) / x.shape[0], matmul(p.T, p))
    return stats


def _damped_inverse(factor: Array, damping) -> Array:
    eye = jnp.eye(factor.shape[0], dtype=factor.dtype)
    return cho_solve(cho_factor(factor + damping * eye), eye)


def _damped_inverses(a: Array, s: Array, damping: float, pi_correction: bool):
    """``((A + π√δ I)⁻¹, (S + √δ/π I)⁻¹)``, ``π² = (tr A/dim A)/(tr S/dim S)``
    (Martens & Grosse 2015, eq. 13) or ``π = 1``."""
    pi = 1.0
    if pi_correction:
        tiny = jnp.finfo(a.dtype).tiny
        pi = jnp.sqrt(jnp.maximum(jnp.trace(a) / a.shape[0], tiny)
                      / jnp.maximum(jnp.trace(s) / s.shape[0], tiny))
    root = damping ** 0.5
    return _damped_inverse(a, pi * root), _damped_inverse(s, root / pi)


def scale_by_kfac(apply_fn: Callable, loss_fn, *, damping: float = 1e-3,
                  ema_decay: float = 0.95, inverse_every: int = 10,
                  max_factor_dim: int = 4096, pi_correction: bool = True,
                  seed: int = 0) -> optax.GradientTransformationExtraArgs:
    """Preconditions dense layers' gradients by ``(A + π√δ I)⁻¹ ∇W̄ (S + √δ/π I)⁻¹``.

    Other leaves pass through unchanged (see :func:`kfac` for their rule).
    ``update`` needs ``params`` and ``batch=(inputs, targets)``.

    Args:
      apply_fn: tap-aware model, ``apply_fn(params, inputs, tap) -> outputs``.
      loss_fn: ``gnopt.losses.softmax_cross_entropy`` or ``mean_squared_error``.
      damping: ``δ``; the factors get ``π√δ I`` and ``√δ/π I`` (0 is allowed when
        both factors are positive definite).
      ema_decay: decay of the factors' EMAs (0: this batch's factors).
      inverse_every: refresh the damped inverses every this many steps.
      max_factor_dim: dense layers with a larger factor are left out.
      pi_correction: balance the damping between the factors (else ``π = 1``).
      seed: PRNG seed of the Fisher samples.
    """
    if inverse_every < 1:
        raise ValueError(f"scale_by_kfac: inverse_every must be >= 1, got {inverse_every}")
    if damping < 0 or not 0 <= ema_decay < 1:
        raise ValueError(f"scale_by_kfac: need damping >= 0 and 0 <= ema_decay < 1, "
                         f"got damping={damping}, ema_decay={ema_decay}")

    def init_fn(params):
        factors = {}
        for name, layer in kfac_layers(params, max_factor_dim).items():
            n_a, n_s = _factor_sizes(layer)
            dtype = _factor_dtype(layer)
            factors[name] = KfacFactors(jnp.zeros((n_a, n_a), dtype), jnp.zeros((n_s, n_s), dtype),
                                        jnp.eye(n_a, dtype=dtype), jnp.eye(n_s, dtype=dtype))
        return ScaleByKfacState(count=jnp.zeros([], jnp.int32), key=jax.random.PRNGKey(seed),
                                factors=factors)

    def update_fn(updates, state, params=None, *, batch=None, **extra_args):
        del extra_args
        if params is None or batch is None:
            raise ValueError("kfac: update needs params and the keyword argument "
                             "batch=(inputs, targets)")
        key, sample_key = jax.random.split(state.key)
        layers = kfac_layers(params, max_factor_dim)
        stats = layer_statistics(apply_fn, loss_fn, params, batch, sample_key, layers)
        first, refresh = state.count == 0, state.count % inverse_every == 0
        factors = {}
        for name, old in state.factors.items():
            a, s = (jnp.where(first, new, ema_decay * f + (1 - ema_decay) * new)
                    for f, new in zip(old[:2], stats[name]))
            inv_a, inv_s = jax.lax.cond(
                refresh, lambda: _damped_inverses(a, s, damping, pi_correction),
                lambda: old[2:])
            factors[name] = KfacFactors(a, s, inv_a, inv_s)

        def precondition(node):
            if not (is_dense(node) and node.name in factors):
                return node
            f = factors[node.name]
            grad = node.weight.astype(f.activations.dtype)
            if node.bias is not None:
                grad = jnp.concatenate([grad, node.bias.astype(grad.dtype)[None]], axis=0)
            nat = matmul(matmul(f.inv_activations, grad), f.inv_output_grads)
            node = eqx.tree_at(lambda m: m.weight, node, nat[:node.weight.shape[0]]
                               .astype(node.weight.dtype))
            if node.bias is not None:
                node = eqx.tree_at(lambda m: m.bias, node, nat[-1].astype(node.bias.dtype))
            return node

        directions = jax.tree.map(precondition, updates, is_leaf=is_dense)
        return directions, ScaleByKfacState(count=optax.safe_increment(state.count), key=key,
                                            factors=factors)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def kfac(apply_fn: Callable, loss_fn, learning_rate: optax.ScalarOrSchedule, *,
         damping: float = 1e-3, ema_decay: float = 0.95, inverse_every: int = 10,
         momentum: float = 0.9, fallback: optax.GradientTransformation | None = None,
         max_factor_dim: int = 4096, pi_correction: bool = True,
         seed: int = 0) -> optax.GradientTransformationExtraArgs:
    """K-FAC on tapped dense layers, ``fallback`` on every other leaf.

    Dense layers: :func:`scale_by_kfac`, heavy-ball momentum ``momentum``
    (``optax.trace``), then ``−learning_rate``. Other leaves: ``fallback``
    (default ``optax.adam(learning_rate)``), which gets the raw gradients.
    ``update`` needs ``params`` and ``batch=(inputs, targets)``.
    """
    check_learning_rate("kfac", "learning_rate", learning_rate)
    check_number("kfac", "damping", damping, low=0.0)
    check_number("kfac", "ema_decay", ema_decay, low=0.0, high=1.0)
    check_number("kfac", "momentum", momentum, low=0.0, high=1.0)
    check_int("kfac", "inverse_every", inverse_every, low=1)
    check_int("kfac", "max_factor_dim", max_factor_dim, low=1)
    fallback = optax.adam(learning_rate) if fallback is None else fallback
    return optax.chain(
        scale_by_kfac(apply_fn, loss_fn, damping=damping, ema_decay=ema_decay,
                      inverse_every=inverse_every, max_factor_dim=max_factor_dim,
                      pi_correction=pi_correction, seed=seed),
        optax.partition(
            {"kfac": optax.chain(optax.trace(momentum),
                                 optax.scale_by_learning_rate(learning_rate)),
             "fallback": fallback},
            lambda tree: kfac_labels(tree, max_factor_dim)))


kfac.static_args = ("apply_fn", "loss_fn", "inverse_every", "max_factor_dim", "seed", "pi_correction",
                    "fallback")
# taps the model on the whole batch; uses the trainer's gradient
requires("apply_fn", "loss_fn", whole_batch=True)(kfac)
