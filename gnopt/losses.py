"""Losses on model outputs, with their output-space Hessians in closed form.

A loss is called as ``loss(outputs, targets) -> scalar``. The GGN product needs
``H_z u`` where ``H_z = ∇²_z loss``. The losses here give it in closed form
(:meth:`AbstractLoss.hvp`); any other callable falls back to
:func:`loss_hvp`, a forward-over-reverse product in output space (cheap: it does
not touch the model).

Targets for cross-entropy are integer labels ``[...]`` or a pair
``(labels, mask)``; the loss is the mean over the tokens where ``mask`` is
non-zero (Martens 2010; Abreu et al. 2025 §3), and 0 when no token is.

Labels at masked positions are ignored whatever their value (an ignore label
such as −100, or anything ≥ the number of classes): they affect neither the
loss, nor its gradient, nor its Hessian product. A label outside
``[0, num_classes)`` at an unmasked position is an error: when labels (and the
mask) are NumPy arrays it raises ``ValueError`` at once; otherwise (JAX arrays,
under ``jit``) it cannot be checked without a host sync, and the loss, its
gradient and its Hessian product are NaN instead — the trainer then skips the
step rather than training on a silently wrong class.
"""

from __future__ import annotations

import abc
from typing import Any, Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
LossFn = Callable[[Any, Any], Array]


def _float(x) -> Array:
    """``x`` in at least float32 (float64 stays float64)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _split_targets(targets):
    """``(labels, mask or None)`` of cross-entropy targets, as given."""
    if isinstance(targets, (tuple, list)):
        if len(targets) != 2:
            raise ValueError(
                "cross-entropy targets must be labels or a pair (labels, mask); "
                f"got a sequence of length {len(targets)}")
        return targets[0], targets[1]
    return targets, None


def labels_and_weights(targets, shape, dtype=jnp.float32) -> tuple[Array, Array]:
    """Splits CE targets into labels and per-token weights summing to one.

    The weights are ``mask / Σ mask`` (all zero when the mask is), or uniform
    without a mask, in ``dtype`` (or the mask's wider float type). The labels
    are returned as given: masked positions may hold anything (see
    :func:`_ce_parts` for the labels the losses use).
    """
    labels, mask = _split_targets(targets)
    labels = jnp.asarray(labels)
    if labels.shape != shape:
        raise ValueError(
            f"cross-entropy labels have shape {labels.shape}, expected the logits' "
            f"leading shape {shape}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"cross-entropy labels must be integers, got {labels.dtype}")
    if mask is None:
        weights = jnp.full(shape, 1.0 / max(1, labels.size), dtype)
    else:
        mask = jnp.asarray(mask)
        if mask.shape != shape:
            raise ValueError(f"mask has shape {mask.shape}, expected {shape}")
        mask = mask.astype(jnp.promote_types(mask.dtype, dtype))
        total = mask.sum()
        weights = mask / jnp.where(total > 0, total, 1.0)
    return labels, weights


def _check_host_labels(targets, num_classes: int) -> None:
    """Raises on an unmasked label outside ``[0, num_classes)`` if it is free to check.

    Only NumPy labels (and mask) are checked: they are on the host already. JAX
    arrays are left to the in-graph NaN of :func:`_ce_parts` (no host sync).
    """
    labels, mask = _split_targets(targets)
    if not isinstance(labels, np.ndarray) or not (mask is None or isinstance(mask, np.ndarray)):
        return
    bad = (labels < 0) | (labels >= num_classes)
    if mask is not None:
        bad &= mask != 0
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"cross-entropy label {labels[index]} at unmasked position {index} "
                         f"is outside [0, {num_classes})")


def _ce_parts(outputs, targets) -> tuple[Array, Array, Array]:
    """``(z, labels, w)`` for cross-entropy on logits ``outputs``.

    ``labels`` are safe to gather (masked or invalid ones replaced by 0), and
    ``w`` are the token weights, NaN where an unmasked label is outside
    ``[0, num_classes)`` (0 where masked, whatever the label).
    """
    z = _float(outputs)
    num_classes = z.shape[-1]
    _check_host_labels(targets, num_classes)
    labels, w = labels_and_weights(targets, z.shape[:-1], z.dtype)
    if labels.dtype.itemsize < 4:  # uint8 < 256 would wrap 256 to 0
        labels = labels.astype(jnp.int32)
    valid = (labels >= 0) & (labels < num_classes)
    w = jnp.where(valid | (w == 0), w, jnp.nan)
    return z, jnp.where(valid, labels, 0), w


class AbstractLoss(eqx.Module):
    """A loss on outputs whose Hessian-vector product is known in closed form."""

    @abc.abstractmethod
    def __call__(self, outputs, targets) -> Array:
        """The scalar loss."""

    @abc.abstractmethod
    def hvp(self, outputs, targets, u) -> Any:
        """``∇²_z loss(z, y) · u`` at ``z = outputs``."""

    def grad(self, outputs, targets) -> Any:
        """``∇_z loss(z, y)``."""
        return jax.grad(self.__call__)(outputs, targets)


class SoftmaxCrossEntropy(AbstractLoss):
    """Mean softmax cross-entropy over tokens (optionally masked).

    ``ℓ = Σ_t w_t (logsumexp(z_t) − z_t[y_t])`` with ``w_t = m_t / Σ m``.
    Per token the Hessian is ``w_t (diag(p_t) − p_t p_tᵀ)``, ``p_t = softmax(z_t)``,
    so ``H u = w_t (p ⊙ u − p Σ(p ⊙ u))`` — PSD, never materialised.
    Tokens with ``m_t = 0`` drop out of all three whatever their label ``y_t``.
    """

    def __call__(self, outputs, targets):
        z, labels, w = _ce_parts(outputs, targets)
        logz = jax.nn.logsumexp(z, axis=-1)
        picked = jnp.take_along_axis(z, labels[..., None], axis=-1)[..., 0]
        return jnp.sum(w * (logz - picked))

    def grad(self, outputs, targets):
        z, labels, w = _ce_parts(outputs, targets)
        p = jax.nn.softmax(z, axis=-1)
        onehot = jax.nn.one_hot(labels, z.shape[-1], dtype=p.dtype)
        return ((p - onehot) * w[..., None]).astype(outputs.dtype)

    def hvp(self, outputs, targets, u):
        z, _, w = _ce_parts(outputs, targets)
        p = jax.nn.softmax(z, axis=-1)
        pu = p * _float(u)
        hu = pu - p * jnp.sum(pu, axis=-1, keepdims=True)
        return (hu * w[..., None]).astype(u.dtype)


class MeanSquaredError(AbstractLoss):
    """``ℓ = ½ mean((z − y)²)`` over all elements; ``H = I / size``."""

    def __call__(self, outputs, targets):
        targets = jnp.asarray(targets)
        if targets.shape != outputs.shape:
            raise ValueError(
                f"MSE targets have shape {targets.shape}, outputs {outputs.shape}")
        return 0.5 * jnp.mean((outputs - targets) ** 2)

    def grad(self, outputs, targets):
        return (outputs - targets) / outputs.size

    def hvp(self, outputs, targets, u):
        return u / outputs.size


softmax_cross_entropy = SoftmaxCrossEntropy()
mean_squared_error = MeanSquaredError()


def loss_grad(loss_fn: LossFn, outputs, targets):
    """``∇_z loss`` (closed form where the loss provides it)."""
    if isinstance(loss_fn, AbstractLoss):
        return loss_fn.grad(outputs, targets)
    return jax.grad(loss_fn)(outputs, targets)


def loss_hvp(loss_fn: LossFn, outputs, targets, u):
    """``∇²_z loss · u`` (closed form where the loss provides it).

    For a generic loss this is forward-over-reverse in output space; it is the
    GGN only if the loss is convex in the outputs.
    """
    if isinstance(loss_fn, AbstractLoss):
        return loss_fn.hvp(outputs, targets, u)
    return jax.jvp(lambda z: jax.grad(loss_fn)(z, targets), (outputs,), (u,))[1]
