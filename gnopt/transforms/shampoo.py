"""Shampoo with grafting (Gupta et al. 2018; Anil et al. 2020).

Per matrix leaf ``G`` (rows × cols) with first moment ``M`` (EMA of ``G``):

* statistics ``L ← L + G Gᵀ``, ``R ← R + Gᵀ G`` (``accumulate='sum'``) or their
  EMAs with decay ``b2``, bias-corrected (``accumulate='ema'``);
* inverse roots ``L^(−1/p) = U diag((max(λ, 0) + ε)^(−1/p)) Uᵀ`` from a float32
  ``eigh`` of ``L`` (``p = 4`` for matrices, ``exponent_override`` to change),
  recomputed every ``update_frequency`` steps and cached in the state;
  ``ε = epsilon · λ_max(L)`` (``relative_epsilon=True``, the default) or
  ``ε = epsilon`` (absolute). A float32 ``eigh`` resolves eigenvalues only to
  about ``1e-7 · λ_max``, so the default relative ``ε = 1e-6`` keeps round-off
  (e.g. in the null space of the first, low-rank statistics) from being blown
  up by ``(·)^(−1/p)``; ``epsilon=1e-12, relative_epsilon=False`` is the
  classic absolute setting;
* direction ``D = L^(−1/p) M̂ R^(−1/p)``; with ``graft='adam'`` it is rescaled to
  the norm of the Adam direction ``A = M̂ / (√V̂ + eps)`` of the same leaf
  (layer-wise grafting of distributed Shampoo), ``graft='none'`` keeps ``D``.

Leaves Shampoo does not precondition (non-matrices, ``precondition=False``) get
the graft direction itself: Adam's update exactly (``graft='adam'``), or the
bias-corrected momentum ``M̂`` (``graft='none'``; SGD when ``b1 = 0``). A side
longer than ``max_precond_dim`` uses the identity.

References:
  Gupta, Koren & Singer, *Shampoo: Preconditioned stochastic tensor
  optimization*, ICML 2018, Alg. 1.
  Anil et al., *Scalable second order optimization for deep learning*, 2020,
  arXiv:2002.09018, §3 (grafting) and §4 (inverse roots).
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gnopt._checks import check_int, check_learning_rate, check_number

Array = jax.Array


def matmul(a: Array, b: Array) -> Array:
    """A full-precision matmul (no TF32/bf16 passes) for curvature statistics."""
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def zero_statistics(leaf, max_precond_dim: int, precondition: bool = True) -> list:
    """``[L, R]`` zeros for a matrix leaf, ``None`` for a side that uses the identity
    (non-matrix leaves, sides longer than ``max_precond_dim``, no preconditioning)."""
    if not precondition or jnp.ndim(leaf) != 2:
        return [None, None]
    return [jnp.zeros((n, n), jnp.float32) if n <= max_precond_dim else None
            for n in jnp.shape(leaf)]


def gram(g: Array, side: int) -> Array:
    """``G Gᵀ`` (side 0) or ``Gᵀ G`` (side 1) in float32."""
    g = g.astype(jnp.float32)
    return matmul(g, g.T) if side == 0 else matmul(g.T, g)


def moment(g, m, decay: float, order: int, count_inc):
    """An EMA of ``g**order`` and its bias correction, exactly as ``optax.scale_by_adam``."""
    m = (optax.tree.update_moment(g, m, decay, 1) if order == 1
         else optax.tree.update_moment_per_elem_norm(g, m, decay, order))
    return m, optax.tree.bias_correction(m, decay, count_inc)


def unzip_leaves(tree, out) -> tuple:
    """Splits a tree of per-leaf tuples (shaped like ``tree``) into a tuple of trees."""
    treedef = jax.tree.structure(tree)
    return tuple(jax.tree.unflatten(treedef, xs) for xs in zip(*treedef.flatten_up_to(out)))


def inverse_root(stat: Array, exponent: float, epsilon: float, relative: bool) -> Array:
    """``(S + ε I)^(−1/exponent)`` of a PSD ``S`` by a float32 eigendecomposition.

    Negative round-off eigenvalues are clipped to 0; ``ε = epsilon · λ_max``
    when ``relative`` (floored at the smallest normal float so that a zero
    statistic gives a finite root).
    """
    eigvals, eigvecs = jnp.linalg.eigh(stat.astype(jnp.float32))
    eigvals = jnp.maximum(eigvals, 0.0)
    eps = epsilon * eigvals[-1] if relative else jnp.asarray(epsilon, jnp.float32)
    eps = jnp.maximum(eps, jnp.finfo(jnp.float32).tiny)
    return matmul(eigvecs * (eigvals + eps) ** (-1.0 / exponent), eigvecs.T)


class ShampooFactors(NamedTuple):
    """Kronecker factors of one leaf; ``None`` where a side is not preconditioned."""

    left: Array | None  # L: accumulated G Gᵀ, (rows, rows), float32
    right: Array | None  # R: accumulated Gᵀ G, (cols, cols), float32
    root_left: Array | None  # cached L^(−1/p)
    root_right: Array | None  # cached R^(−1/p)


class ScaleByShampooState(NamedTuple):
    """State of :func:`scale_by_shampoo`."""

    count: Array  # steps taken, int32
    mu: Any  # EMA of gradients (b1), like Adam's first moment
    nu: Any  # EMA of squared gradients (b2) for the Adam graft; None for graft='none'
    factors: Any  # ShampooFactors per leaf


def scale_by_shampoo(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, *,
                     accumulate: Literal["sum", "ema"] = "ema", epsilon: float = 1e-6,
                     relative_epsilon: bool = True, update_frequency: int = 1,
                     max_precond_dim: int = 8192, graft: Literal["adam", "none"] = "adam",
                     exponent_override: float | None = None,
                     precondition: bool = True) -> optax.GradientTransformationExtraArgs:
    """Shampoo's direction ``L^(−1/p) M̂ R^(−1/p)`` grafted onto Adam's norm.

    Args:
      b1: decay of the first moment (momentum) ``M``.
      b2: decay of Adam's second moment and, with ``accumulate='ema'``, of L, R.
      eps: Adam's denominator epsilon.
      accumulate: ``'sum'`` (AdaGrad-style, Gupta et al.) or ``'ema'``.
      epsilon: Tikhonov term of the inverse roots (see :func:`inverse_root`).
      relative_epsilon: scale ``epsilon`` by the largest eigenvalue (default).
      update_frequency: recompute the inverse roots every this many steps.
      max_precond_dim: sides longer than this use the identity.
      graft: ``'adam'`` (rescale to Adam's per-leaf norm) or ``'none'``.
      exponent_override: ``p`` of ``L^(−1/p)`` (default 4).
      precondition: ``False`` gives the graft optimizer exactly.
    """
    if accumulate not in ("sum", "ema"):
        raise ValueError(f"scale_by_shampoo: accumulate must be 'sum' or 'ema', got {accumulate!r}")
    if graft not in ("adam", "none"):
        raise ValueError(f"scale_by_shampoo: graft must be 'adam' or 'none', got {graft!r}")
    if isinstance(update_frequency, int) and update_frequency < 1:
        raise ValueError(f"scale_by_shampoo: update_frequency must be >= 1, got {update_frequency}")
    exponent = 4.0 if exponent_override is None else exponent_override

    def init_leaf(p):
        mats = zero_statistics(p, max_precond_dim, precondition)
        eyes = [None if m is None else jnp.eye(m.shape[0], dtype=jnp.float32) for m in mats]
        return ShampooFactors(*mats, *eyes)

    def init_fn(params):
        return ScaleByShampooState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params),
            nu=optax.tree.zeros_like(params) if graft == "adam" else None,
            factors=jax.tree.map(init_leaf, params))

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        count_inc = optax.safe_increment(state.count)
        mu, mu_hat = moment(updates, state.mu, b1, 1, count_inc)
        nu, graft_dir = None, mu_hat
        if graft == "adam":
            nu, nu_hat = moment(updates, state.nu, b2, 2, count_inc)
            graft_dir = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu_hat, nu_hat)

        def leaf(g, m_hat, a, f: ShampooFactors):
            if f.left is None and f.right is None:
                return a, f
            stats = []
            for side, s in enumerate((f.left, f.right)):
                if s is not None:
                    gg = gram(g, side)
                    s = s + gg if accumulate == "sum" else b2 * s + (1 - b2) * gg
                stats.append(s)

            def roots(_):
                debias = 1.0 if accumulate == "sum" else 1 - b2 ** count_inc.astype(jnp.float32)
                return tuple(None if s is None else
                             inverse_root(s / debias, exponent, epsilon, relative_epsilon)
                             for s in stats)

            new_roots = jax.lax.cond(state.count % update_frequency == 0, roots,
                                     lambda _: (f.root_left, f.root_right), None)
            d = m_hat.astype(jnp.float32)
            if new_roots[0] is not None:
                d = matmul(new_roots[0], d)
            if new_roots[1] is not None:
                d = matmul(d, new_roots[1])
            if graft == "adam":
                d_norm = jnp.linalg.norm(d)
                d = d * jnp.where(d_norm > 0, jnp.linalg.norm(a.astype(jnp.float32)) / d_norm, 0.0)
            return d.astype(g.dtype), ShampooFactors(*stats, *new_roots)

        directions, factors = unzip_leaves(
            updates, jax.tree.map(leaf, updates, mu_hat, graft_dir, state.factors))
        return directions, ScaleByShampooState(count=count_inc, mu=mu, nu=nu, factors=factors)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def shampoo(learning_rate: optax.ScalarOrSchedule, *, b1: float = 0.9, b2: float = 0.999,
            eps: float = 1e-8, weight_decay: float = 0.0,
            accumulate: Literal["sum", "ema"] = "ema", epsilon: float = 1e-6,
            relative_epsilon: bool = True, update_frequency: int = 1,
            max_precond_dim: int = 8192, graft: Literal["adam", "none"] = "adam",
            exponent_override: float | None = None,
            precondition: bool = True) -> optax.GradientTransformationExtraArgs:
    """Shampoo (:func:`scale_by_shampoo`), decoupled weight decay scaled by the
    learning rate (as AdamW), then ``−learning_rate``."""
    check_learning_rate("shampoo", "learning_rate", learning_rate)
    for name, value in (("b1", b1), ("b2", b2)):
        check_number("shampoo", name, value, low=0.0, high=1.0)
    for name, value in (("eps", eps), ("epsilon", epsilon), ("weight_decay", weight_decay)):
        check_number("shampoo", name, value, low=0.0)
    check_int("shampoo", "update_frequency", update_frequency, low=1)
    check_int("shampoo", "max_precond_dim", max_precond_dim, low=1)
    return optax.chain(
        scale_by_shampoo(b1, b2, eps, accumulate=accumulate, epsilon=epsilon,
                         relative_epsilon=relative_epsilon, update_frequency=update_frequency,
                         max_precond_dim=max_precond_dim, graft=graft,
                         exponent_override=exponent_override, precondition=precondition),
        optax.add_decayed_weights(weight_decay), optax.scale_by_learning_rate(learning_rate))
