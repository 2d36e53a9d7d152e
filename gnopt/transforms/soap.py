"""SOAP: Adam in Shampoo's eigenbasis (Vyas et al. 2024, Algorithm 3).

Per matrix leaf ``G`` (rows × cols), with ``Q_L``, ``Q_R`` the eigenbases of
``L = EMA(G Gᵀ)``, ``R = EMA(Gᵀ G)`` (decay ``shampoo_beta``):

1. rotate: ``G' = Q_Lᵀ G Q_R``;
2. Adam there: ``M ← b1 M + (1 − b1) G`` is kept in the *original* space and
   rotated each step (``M' = Q_Lᵀ M Q_R``), so it follows every basis change
   exactly; ``V ← b2 V + (1 − b2) G'²`` lives in the rotated space;
3. rotate back: ``N = Q_L [M̂' / (√V̂ + eps)] Q_Rᵀ`` (bias corrections as Adam);
4. then update ``L``, ``R`` with ``G`` and, every ``precondition_frequency``
   Adam steps, refresh the bases by one power-iteration step and a QR
   decomposition, ``Q ← qr(L Q)``, columns sorted by the estimated eigenvalues
   ``diag(Qᵀ L Q)``; ``V``'s coordinates are permuted along with their
   eigenvectors (a diagonal ``V`` cannot be rotated exactly).

As in the authors' code, the first call only initialises ``L = G Gᵀ``,
``R = Gᵀ G`` and their bases by ``eigh`` (so that the projection never uses the
current gradient) and returns a zero update; Adam's step count starts at the
second call. Sides longer than ``max_precond_dim`` use the identity; leaves
that are not matrices run plain Adam. ``precondition=False`` (or
``precondition_frequency=0``) is exactly ``optax.scale_by_adam``, with no
initialisation step.

References:
  Vyas et al., *SOAP: Improving and stabilizing Shampoo using Adam*, ICLR 2025,
  arXiv:2409.11321, Algorithm 3.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gnopt.transforms.shampoo import gram, matmul, moment, unzip_leaves, zero_statistics

Array = jax.Array


class SoapFactors(NamedTuple):
    """Shampoo statistics of one leaf; ``None`` where a side uses the identity."""

    left: Array | None  # L = EMA(G Gᵀ), (rows, rows), float32
    right: Array | None  # R = EMA(Gᵀ G), (cols, cols), float32
    basis_left: Array | None  # Q_L, eigenvectors of L by decreasing eigenvalue
    basis_right: Array | None  # Q_R, eigenvectors of R by decreasing eigenvalue


class ScaleBySoapState(NamedTuple):
    """State of :func:`scale_by_soap`."""

    count: Array  # calls so far, int32 (the first one only initialises the bases)
    mu: Any  # Adam's first moment, in the original space
    nu: Any  # Adam's second moment, in the rotated space
    factors: Any  # SoapFactors per leaf


def rotate(x: Array, f: SoapFactors, back: bool = False) -> Array:
    """``Q_Lᵀ x Q_R`` (or ``Q_L x Q_Rᵀ`` when ``back``), identity on missing sides."""
    if f.basis_left is None and f.basis_right is None:
        return x
    y = x.astype(jnp.float32)
    if f.basis_left is not None:
        y = matmul(f.basis_left if back else f.basis_left.T, y)
    if f.basis_right is not None:
        y = matmul(y, f.basis_right.T if back else f.basis_right)
    return y.astype(x.dtype)


def _eigenbasis(stat: Array) -> Array:
    """Eigenvectors of a symmetric matrix, by decreasing eigenvalue."""
    return jnp.linalg.eigh(stat)[1][:, ::-1]


def _refresh(stat: Array, basis: Array, nu: Array, axis: int) -> tuple[Array, Array]:
    """One power-iteration step + QR; sorts by ``diag(Qᵀ S Q)`` and permutes ``nu``."""
    power = matmul(stat, basis)
    order = jnp.argsort(-jnp.sum(basis * power, axis=0))
    return jnp.linalg.qr(power[:, order])[0], jnp.take(nu, order, axis=axis)


def scale_by_soap(b1: float = 0.95, b2: float = 0.95, eps: float = 1e-8,
                  precondition_frequency: int = 10, max_precond_dim: int = 10000,
                  shampoo_beta: float | None = None,
                  precondition: bool = True) -> optax.GradientTransformationExtraArgs:
    """SOAP's direction (no learning rate).

    Args:
      b1, b2, eps: Adam's hyper-parameters (in the rotated space).
      precondition_frequency: refresh the eigenbases every this many Adam
        steps; ``0`` turns preconditioning off (exactly Adam).
      max_precond_dim: sides longer than this use the identity.
      shampoo_beta: decay of ``L``, ``R`` (default ``b2``).
      precondition: ``False`` gives exactly Adam.
    """
    if isinstance(precondition_frequency, int):  # traced under optax.inject_hyperparams
        if precondition_frequency < 0:
            raise ValueError(f"scale_by_soap: precondition_frequency must be >= 0, "
                             f"got {precondition_frequency}")
        precondition = precondition and precondition_frequency > 0
    beta_s = b2 if shampoo_beta is None else shampoo_beta

    def init_leaf(p):
        mats = zero_statistics(p, max_precond_dim, precondition)
        return SoapFactors(*mats, *mats)

    def init_fn(params):
        return ScaleBySoapState(count=jnp.zeros([], jnp.int32),
                                mu=optax.tree.zeros_like(params),
                                nu=optax.tree.zeros_like(params),
                                factors=jax.tree.map(init_leaf, params))

    def adam_step(updates, state, count_inc):
        """Steps 1–3 on every leaf, in the state's bases."""
        mu, mu_hat = moment(updates, state.mu, b1, 1, count_inc)
        rotated = jax.tree.map(rotate, updates, state.factors)
        nu, nu_hat = moment(rotated, state.nu, b2, 2, count_inc)
        directions = jax.tree.map(
            lambda m, v, f: rotate(rotate(m, f) / (jnp.sqrt(v) + eps), f, back=True),
            mu_hat, nu_hat, state.factors)
        return directions, mu, nu

    def update_stats(g, nu, f: SoapFactors, refresh):
        """Step 4 on one leaf: EMA of L, R; refresh the bases when ``refresh``."""
        stats = [None if s is None else beta_s * s + (1 - beta_s) * gram(g, side)
                 for side, s in enumerate(f[:2])]

        def new_bases(nu):
            bases = list(f[2:])
            for side, s in enumerate(stats):
                if s is not None:
                    bases[side], nu = _refresh(s, bases[side], nu, side)
            return tuple(bases), nu

        bases, nu = jax.lax.cond(refresh, new_bases, lambda nu: (tuple(f[2:]), nu), nu)
        return nu, SoapFactors(*stats, *bases)

    def first_call(updates, state):
        """Initialise L, R and their eigenbases; zero update."""
        def leaf(g, f: SoapFactors):
            stats = [None if s is None else gram(g, side) for side, s in enumerate(f[:2])]
            return SoapFactors(*stats, *(None if s is None else _eigenbasis(s) for s in stats))
        factors = jax.tree.map(leaf, updates, state.factors)
        return optax.tree.zeros_like(updates), state._replace(factors=factors)

    def later_call(updates, state):
        steps = state.count  # Adam steps taken, this one included
        directions, mu, nu = adam_step(updates, state, steps)
        refresh = steps % precondition_frequency == 0
        nu, factors = unzip_leaves(updates, jax.tree.map(
            lambda g, v, f: update_stats(g, v, f, refresh), updates, nu, state.factors))
        return directions, ScaleBySoapState(count=state.count, mu=mu, nu=nu, factors=factors)

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        count_inc = optax.safe_increment(state.count)
        if not precondition:
            directions, mu, nu = adam_step(updates, state, count_inc)
            return directions, ScaleBySoapState(count_inc, mu, nu, state.factors)
        directions, state = jax.lax.cond(state.count == 0, first_call, later_call, updates, state)
        return directions, state._replace(count=count_inc)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def soap(learning_rate: optax.ScalarOrSchedule, *, b1: float = 0.95, b2: float = 0.95,
         eps: float = 1e-8, weight_decay: float = 0.0, precondition_frequency: int = 10,
         max_precond_dim: int = 10000, shampoo_beta: float | None = None,
         precondition: bool = True) -> optax.GradientTransformationExtraArgs:
    """SOAP (:func:`scale_by_soap`), decoupled weight decay scaled by the learning
    rate (as AdamW), then ``−learning_rate``."""
    return optax.chain(
        scale_by_soap(b1, b2, eps, precondition_frequency, max_precond_dim, shampoo_beta,
                      precondition),
        optax.add_decayed_weights(weight_decay), optax.scale_by_learning_rate(learning_rate))
