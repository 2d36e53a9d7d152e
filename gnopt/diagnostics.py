"""Training diagnostics: the gradient noise scale (McCandlish et al. 2018).

The *simple noise scale* ``B_simple = tr(Σ) / |G|²`` (``G``: the true gradient,
``Σ``: the per-example gradient covariance) estimates the critical batch size:
batches much smaller than it waste steps, batches much larger waste examples.

The gradient ``G_B`` of a batch of ``B`` i.i.d. examples has
``E|G_B|² = |G|² + tr(Σ)/B``, so two batch sizes ``b < B`` give unbiased
estimates (McCandlish et al. 2018, App. A.1)::

    |G|² ≈ (B |G_B|² − b |G_b|²) / (B − b)
    tr Σ ≈ (|G_b|² − |G_B|²) / (1/b − 1/B)

Each estimate is noisy (the first can be negative); :func:`noise_scale` keeps
exponential moving averages of the two separately and reports their ratio.

References:
  McCandlish, Kaplan, Amodei et al., *An empirical model of large-batch
  training*, 2018, arXiv:1812.06162, §2.2 and Appendix A.1.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu


def two_batch_estimates(small_sq_norm, big_sq_norm, small_batch: float, big_batch: float):
    """Unbiased ``(|G|², tr Σ)`` from squared gradient norms at two batch sizes.

    Args:
      small_sq_norm: ``|G_b|²``, squared norm of a mean gradient over ``b`` examples.
      big_sq_norm: ``|G_B|²``, the same over ``B > b`` examples.
      small_batch, big_batch: ``b`` and ``B``.

    Returns:
      ``(|G|² estimate, tr Σ estimate)`` (McCandlish et al. 2018, eqs. A.2–A.3).
    """
    if not 0 < small_batch < big_batch:
        raise ValueError(f"two_batch_estimates needs 0 < small_batch < big_batch, "
                         f"got {small_batch} and {big_batch}")
    sq_norm = (big_batch * big_sq_norm - small_batch * small_sq_norm) / (big_batch - small_batch)
    trace = (small_sq_norm - big_sq_norm) / (1.0 / small_batch - 1.0 / big_batch)
    return sq_norm, trace


class NoiseScaleState(NamedTuple):
    """State of :func:`noise_scale`."""

    count: jax.Array  # steps measured
    sq_norm_ema: jax.Array  # EMA of the |G|² estimates (not bias-corrected)
    trace_ema: jax.Array  # EMA of the tr Σ estimates (not bias-corrected)
    diagnostics: dict  # grad_sq_norm, trace_sigma (bias-corrected EMAs), noise_scale


def noise_scale(apply_fn: Callable, loss_fn: Callable, small_batch_size: int, *,
                decay: float = 0.9) -> optax.GradientTransformationExtraArgs:
    """Measures ``B_simple`` along training; passes the updates through unchanged.

    Each step, ``G_B`` is the incoming ``updates`` (the mean gradient of the
    step's batch of ``B`` examples: put this transform *first* in a chain) and
    ``G_b`` the gradient of the loss on the batch's first ``b =
    small_batch_size`` examples (one extra backward pass on ``b/B`` of the
    batch). The two estimates of :func:`two_batch_estimates` enter separate
    EMAs; ``noise_scale = tr Σ EMA / |G|² EMA`` (NaN while the ``|G|²`` EMA is
    not positive), in units of examples (sequences for a language model).

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs``.
      loss_fn: ``loss_fn(outputs, targets) -> scalar``, a mean over examples.
      small_batch_size: ``b``; must be smaller than the step's batch.
      decay: EMA decay of both estimates.

    Returns:
      An optax transform; ``update`` needs ``params`` and ``batch=(inputs,
      targets)`` and ignores other keyword arguments.
    """
    if not isinstance(small_batch_size, int) or small_batch_size < 1:
        raise ValueError(f"noise_scale: small_batch_size must be a positive int, got {small_batch_size!r}")
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"noise_scale: decay must be in [0, 1), got {decay}")

    def batch_loss(params, batch):
        inputs, targets = batch
        return loss_fn(apply_fn(params, inputs), targets)

    def init_fn(params):
        del params
        zero = jnp.zeros((), jnp.float32)
        diag = {"grad_sq_norm": zero, "trace_sigma": zero, "noise_scale": jnp.full((), jnp.nan, jnp.float32)}
        return NoiseScaleState(jnp.zeros((), jnp.int32), zero, zero, diag)

    def update_fn(updates, state, params=None, *, batch=None, **extra):
        del extra
        if params is None or batch is None:
            raise ValueError("noise_scale.update needs params and batch=(inputs, targets)")
        big = jax.tree.leaves(batch)[0].shape[0]
        if small_batch_size >= big:
            raise ValueError(f"noise_scale: small_batch_size={small_batch_size} must be smaller "
                             f"than the batch size {big}")
        small = jax.tree.map(lambda x: x[:small_batch_size], batch)
        small_grad = jax.grad(batch_loss)(params, small)
        sq = lambda tree: jnp.square(otu.tree_norm(otu.tree_cast(tree, jnp.float32)))
        sq_norm, trace = two_batch_estimates(sq(small_grad), sq(updates), small_batch_size, big)
        count = state.count + 1
        sq_ema = decay * state.sq_norm_ema + (1 - decay) * sq_norm
        trace_ema = decay * state.trace_ema + (1 - decay) * trace
        correction = 1 - decay ** count.astype(jnp.float32)
        diag = {"grad_sq_norm": sq_ema / correction, "trace_sigma": trace_ema / correction,
                "noise_scale": jnp.where(sq_ema > 0, trace_ema / jnp.where(sq_ema > 0, sq_ema, 1.0),
                                         jnp.nan)}
        return updates, NoiseScaleState(count, sq_ema, trace_ema, diag)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
