"""SOAP: Adam in Shampoo's eigenbasis (Vyas et al. 2024, Algorithm 3).

Step for step the update of the authors' ``soap.py`` (github
nikhilvyas/SOAP, ``master`` at commit a1e5535, 2 Dec 2024; a refactor on an
unmerged branch of that repository starts ``L`` at ``G Gᵀ`` and decays it by
Adam's debiased ``b2`` instead, and is not followed here); the test
``tests/test_soap_official.py`` runs both side by side (a NumPy transcription
of that file in ``tests/soap_reference.py``) through several eigenbasis
refreshes. Per leaf ``G`` with Shampoo factors ``L = EMA(G Gᵀ)``,
``R = EMA(Gᵀ G)`` (decay ``shampoo_beta``; one factor per axis for tensors)
and their eigenbases ``Q_L``, ``Q_R``:

* **first call** (initialisation only): ``L = (1 − β_s) G Gᵀ``,
  ``R = (1 − β_s) Gᵀ G`` (an EMA started from zeros), ``Q = eigh`` by
  decreasing eigenvalue; the update is zero for every leaf, with no weight
  decay, so that the projection never uses the current gradient. Adam's step
  count ``t`` starts at the second call.
* **every later call**, with the bases of the previous call:

  1. ``M ← b1 M + (1 − b1) G`` (kept in the original space and rotated each
     step, ``M' = Q_Lᵀ M Q_R``; the authors keep ``M'`` and rotate it back and
     forth at each step, the same in exact arithmetic);
     ``V ← b2 V + (1 − b2) (Q_Lᵀ G Q_R)²`` in the rotated space;
  2. ``N = Q_L [M' / (√V + eps)] Q_Rᵀ`` (``eps`` added to the square root of
     the *uncorrected* ``V``); with ``normalize_grads``, ``N ← N / rms(N)``;
     then ``N ← N · √(1 − b2ᵗ)/(1 − b1ᵗ)`` (``correct_bias``);
  3. ``L ← β_s L + (1 − β_s) G Gᵀ``, ``R`` likewise; when
     ``t % precondition_frequency == 0`` the bases are refreshed by one power
     iteration and a QR decomposition, ``Q ← qr(L Q)``, the columns of ``Q``
     first sorted by the estimated eigenvalues ``diag(Qᵀ L Q)`` and ``V``'s
     coordinates permuted with them (a diagonal ``V`` cannot be rotated).

  :func:`soap` then takes the step and decays the weights *after* it, as the
  authors do: ``p ← (p − lr·N)(1 − lr·weight_decay)``.

Which leaves are preconditioned follows the authors' code: every axis of a
leaf with two or more axes whose length is at most ``max_precond_dim`` (a
longer axis uses the identity); a vector only with ``precondition_1d`` (and
length ≤ ``max_precond_dim``); scalars never. ``merge_dims`` first reshapes
a leaf of two or more axes by the authors' rule (consecutive axes merged while
their product stays ≤ ``max_precond_dim``). Leaves with no factor run Adam
with the same ``eps`` placement and the same skipped first call.

Remaining differences from the authors' code, none of which changes the
update beyond round-off:

* ``eigh`` of ``L`` rather than of ``L + 1e-30·I`` (the ``1e-30`` is below
  float32 resolution next to any ``L`` of ordinary scale; for ``L = 0`` both
  give an orthonormal basis of a zero matrix, on which the rotated gradients
  are zero);
  no retry in float64 when a float32 ``eigh`` fails (XLA's does not raise);
* the first moment is kept in the original space (above);
* statistics and rotations are float32 whatever the parameters' dtype (the
  authors' are in the gradient's dtype), and so are the moments: in bfloat16
  the first moment's rounding noise, rotated into directions where the second
  moment is ~0, made the first update ~10⁴× too long (found by
  ``gnopt.testing.check_all``'s bf16 edge cases);
* the learning rate is a float or an optax schedule of the call count (the
  initialising call included, as a PyTorch scheduler stepped after every
  ``optimizer.step()``); the authors' ``data_format='channels_last'`` (a
  PyTorch memory layout) has no counterpart.

``precondition=False`` (or ``precondition_frequency=0``), an ablation switch
the authors' code does not have, is exactly ``optax.scale_by_adam`` (optax's
``eps`` placement, ``m̂ / (√v̂ + eps)``), with no initialising call.

References:
  Vyas et al., *SOAP: Improving and stabilizing Shampoo using Adam*, ICLR 2025,
  arXiv:2409.11321, Algorithm 3; code: github.com/nikhilvyas/SOAP, ``soap.py``.
"""

from __future__ import annotations

import functools

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gnopt._checks import check_int, check_learning_rate, check_number
from gnopt.transforms.shampoo import moment, unzip_leaves

Array = jax.Array
_HIGHEST = jax.lax.Precision.HIGHEST


class SoapFactors(NamedTuple):
    """Shampoo statistics of one leaf, one entry per axis of its (merged) shape;
    ``None`` where an axis uses the identity."""

    stats: tuple  # EMA of the axis' Gram matrix (G Gᵀ for axis 0 of a matrix), float32
    bases: tuple  # its eigenbasis, columns by decreasing (estimated) eigenvalue, float32

    @property
    def left(self) -> Array | None:
        """``L`` of a matrix (axis 0), or ``None``."""
        return self.stats[0] if len(self.stats) > 0 else None

    @property
    def right(self) -> Array | None:
        """``R`` of a matrix (axis 1), or ``None``."""
        return self.stats[1] if len(self.stats) > 1 else None

    @property
    def basis_left(self) -> Array | None:
        return self.bases[0] if len(self.bases) > 0 else None

    @property
    def basis_right(self) -> Array | None:
        return self.bases[1] if len(self.bases) > 1 else None


class ScaleBySoapState(NamedTuple):
    """State of :func:`scale_by_soap`."""

    count: Array  # calls so far, int32 (the first one only initialises the bases)
    mu: Any  # Adam's first moment, in the original space
    nu: Any  # Adam's second moment, in the rotated space, in the leaf's (merged) shape
    factors: Any  # SoapFactors per leaf


def merged_shape(shape: tuple[int, ...], max_precond_dim: int) -> tuple[int, ...]:
    """The authors' ``merge_dims`` rule: walk the axes, multiplying consecutive
    lengths while the product stays ≤ ``max_precond_dim``; an axis that would
    push it past starts a new group (or stands alone when the group is empty)."""
    groups: list[int] = []
    run = 1
    for n in shape:
        if run * n <= max_precond_dim:
            run *= n
        elif run > 1:
            groups.append(run)
            run = n
        else:
            groups.append(n)
    if run > 1 or not groups:
        groups.append(run)
    return tuple(groups)


def layout(shape: tuple[int, ...], max_precond_dim: int, precondition_1d: bool = False,
           merge_dims: bool = False) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """The shape SOAP works in and which of its axes get a factor."""
    shape = tuple(shape)
    if len(shape) == 0:
        return shape, ()
    if len(shape) == 1:
        return shape, (bool(precondition_1d) and shape[0] <= max_precond_dim,)
    work = merged_shape(shape, max_precond_dim) if merge_dims else shape
    return work, tuple(n <= max_precond_dim for n in work)


def axis_gram(g: Array, axis: int) -> Array:
    """``Σ g g`` over every axis but ``axis`` (``G Gᵀ`` for axis 0 of a matrix), float32."""
    g = g.astype(jnp.float32)
    others = [k for k in range(g.ndim) if k != axis]
    return jnp.tensordot(g, g, axes=(others, others), precision=_HIGHEST)


def rotate(x: Array, bases: tuple, back: bool = False) -> Array:
    """``x`` with each axis multiplied by ``Qᵀ`` (by ``Q`` when ``back``):
    ``Q_Lᵀ X Q_R`` (``Q_L X Q_Rᵀ``) for a matrix; identity on ``None`` axes."""
    if all(q is None for q in bases):
        return x
    y = x.astype(jnp.float32)
    for axis, q in enumerate(bases):
        if q is not None:
            y = jnp.tensordot(y, q.T if back else q, axes=([axis], [0]), precision=_HIGHEST)
            y = jnp.moveaxis(y, -1, axis)
    return y.astype(x.dtype)


def _eigenbasis(stat: Array) -> Array:
    """Eigenvectors of a symmetric matrix, by decreasing eigenvalue."""
    return jnp.linalg.eigh(stat)[1][:, ::-1]


def _refresh(stat: Array, basis: Array, nu: Array, axis: int) -> tuple[Array, Array]:
    """Sort ``basis`` by ``diag(Qᵀ S Q)`` (``nu`` along), one power-iteration step, QR."""
    power = jnp.matmul(stat, basis, precision=_HIGHEST)
    order = jnp.argsort(-jnp.sum(basis * power, axis=0))
    return jnp.linalg.qr(power[:, order])[0], jnp.take(nu, order, axis=axis)


def _is_traced(value) -> bool:
    """A hyper-parameter passed as an array (``optax.inject_hyperparams``)."""
    return isinstance(value, jax.Array)


def _check_beta(where: str, name: str, value) -> None:
    check_number(where, name, value, low=0.0, high=1.0, high_open=True)


def _check_flag(where: str, name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{where}: {name} must be True or False, got {value!r} "
                         f"({type(value).__name__})")


def _check_soap_args(where: str, b1, b2, eps, precondition_frequency, max_precond_dim,
                     shampoo_beta, flags: dict) -> None:
    _check_beta(where, "b1", b1)
    _check_beta(where, "b2", b2)
    if shampoo_beta is not None:
        _check_beta(where, "shampoo_beta", shampoo_beta)
    check_number(where, "eps", eps, low=0.0, low_open=True)
    check_int(where, "precondition_frequency", precondition_frequency, low=0)
    check_int(where, "max_precond_dim", max_precond_dim, low=0)
    for name, value in flags.items():
        _check_flag(where, name, value)


def _normalized(d: Array) -> Array:
    return d / (1e-30 + jnp.sqrt(jnp.mean(jnp.square(d))))


def _adam_only(updates, state, b1, b2, eps, correct_bias: bool, normalize_grads: bool):
    """``precondition=False``: optax's Adam (``normalize_grads``/``correct_bias`` honoured)."""
    count_inc = optax.safe_increment(state.count)
    if correct_bias:
        mu, mu_hat = moment(updates, state.mu, b1, 1, count_inc)
        nu, nu_hat = moment(updates, state.nu, b2, 2, count_inc)
    else:
        mu = mu_hat = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = nu_hat = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    directions = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu_hat, nu_hat)
    if normalize_grads:
        directions = jax.tree.map(_normalized, directions)
    return directions, ScaleBySoapState(count_inc, mu, nu, state.factors)


def _first_factors(g, v, f: SoapFactors, *, beta_s) -> SoapFactors:
    """One leaf's first factors ``(1 − β_s)·gram`` and their eigenbases."""
    gw = g.reshape(v.shape)
    stats = tuple(None if s is None else (1 - beta_s) * axis_gram(gw, axis)
                  for axis, s in enumerate(f.stats))
    return SoapFactors(stats, tuple(None if s is None else _eigenbasis(s) for s in stats))


def _soap_leaf(g, m, v, f: SoapFactors, *, b1, b2, eps, beta_s, normalize_grads: bool, scale,
               refresh):
    """One leaf of a SOAP step after the first: ``(direction, μ, ν, factors)`` (the module's
    steps 1–4; the eigenbases refreshed when ``refresh``)."""
    gw = g.reshape(v.shape).astype(jnp.float32)
    m = (b1 * m.astype(jnp.float32) + (1 - b1) * g.astype(jnp.float32)).astype(m.dtype)
    rotated = rotate(gw, f.bases)
    vw = (b2 * v.astype(jnp.float32) + (1 - b2) * jnp.square(rotated)).astype(v.dtype)
    m_rot = rotate(m.reshape(v.shape).astype(jnp.float32), f.bases)
    d = rotate(m_rot / (jnp.sqrt(vw.astype(jnp.float32)) + eps), f.bases, back=True)
    if normalize_grads:
        d = _normalized(d)
    d = (d * scale).reshape(g.shape).astype(g.dtype)

    stats = tuple(None if s is None else beta_s * s + (1 - beta_s) * axis_gram(gw, axis)
                  for axis, s in enumerate(f.stats))

    def new_bases(vw):
        bases = list(f.bases)
        for axis, s in enumerate(stats):
            if s is not None:
                bases[axis], vw = _refresh(s, bases[axis], vw, axis)
        return tuple(bases), vw

    if any(s is not None for s in stats):
        bases, vw = jax.lax.cond(refresh, new_bases, lambda vw: (f.bases, vw), vw)
    else:
        bases = f.bases
    return d, m, vw, SoapFactors(stats, bases)


def scale_by_soap(b1: float = 0.95, b2: float = 0.95, eps: float = 1e-8,
                  precondition_frequency: int = 10, max_precond_dim: int = 10000,
                  shampoo_beta: float | None = None, precondition: bool = True, *,
                  precondition_1d: bool = False, merge_dims: bool = False,
                  normalize_grads: bool = False,
                  correct_bias: bool = True) -> optax.GradientTransformationExtraArgs:
    """SOAP's direction ``N`` (no learning rate, no weight decay; see the module).

    Args:
      b1, b2, eps: Adam's hyper-parameters (in the rotated space).
      precondition_frequency: refresh the eigenbases every this many Adam
        steps; ``0`` turns preconditioning off (exactly ``optax.scale_by_adam``).
      max_precond_dim: axes longer than this use the identity.
      shampoo_beta: decay of the factors ``L``, ``R`` (default ``b2``).
      precondition: ``False`` gives exactly ``optax.scale_by_adam``.
      precondition_1d: give vectors a factor too (the authors' option).
      merge_dims: merge axes of tensors first (the authors' option).
      normalize_grads: divide each leaf's direction by its RMS before the bias
        correction (the authors' option).
      correct_bias: Adam's bias correction ``√(1 − b2ᵗ)/(1 − b1ᵗ)``.
    """
    where = "scale_by_soap"
    _check_soap_args(where, b1, b2, eps, precondition_frequency, max_precond_dim, shampoo_beta,
                     dict(precondition=precondition, precondition_1d=precondition_1d,
                          merge_dims=merge_dims, normalize_grads=normalize_grads,
                          correct_bias=correct_bias))
    if not _is_traced(precondition_frequency):
        precondition = precondition and precondition_frequency > 0
    beta_s = b2 if shampoo_beta is None else shampoo_beta

    # The layout is fixed at init (``max_precond_dim`` may be an array under
    # ``optax.inject_hyperparams``, a tracer in ``update``): ``update`` reads
    # the (merged) shape off ``nu`` and the axes with a factor off ``factors``.
    def leaf_layout(p):
        if not precondition:
            return jnp.shape(p), ()
        return layout(jnp.shape(p), max_precond_dim, precondition_1d, merge_dims)

    def init_leaf(p):
        work, sides = leaf_layout(p)
        mats = tuple(jnp.zeros((n, n), jnp.float32) if side else None
                     for n, side in zip(work, sides))
        return SoapFactors(mats, mats)

    def init_fn(params):
        return ScaleBySoapState(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params),
            nu=jax.tree.map(lambda p: jnp.zeros(leaf_layout(p)[0], jnp.float32), params),
            factors=jax.tree.map(init_leaf, params))

    def first_call(updates, state):
        """Initialise the factors to ``(1 − β_s)·gram`` and their eigenbases; zero update."""
        factors = jax.tree.map(functools.partial(_first_factors, beta_s=beta_s),
                               updates, state.nu, state.factors)
        return optax.tree.zeros_like(updates), state._replace(factors=factors)

    def later_call(updates, state):
        t = state.count  # Adam steps taken, this one included
        tf = t.astype(jnp.float32)
        leaf = functools.partial(
            _soap_leaf, b1=b1, b2=b2, eps=eps, beta_s=beta_s, normalize_grads=normalize_grads,
            scale=jnp.sqrt(1 - b2**tf) / (1 - b1**tf) if correct_bias else 1.0,
            refresh=t % precondition_frequency == 0)
        directions, mu, nu, factors = unzip_leaves(
            updates, jax.tree.map(leaf, updates, state.mu, state.nu, state.factors))
        return directions, ScaleBySoapState(count=state.count, mu=mu, nu=nu, factors=factors)

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        if not precondition:
            return _adam_only(updates, state, b1, b2, eps, correct_bias, normalize_grads)
        directions, state = jax.lax.cond(state.count == 0, first_call, later_call, updates, state)
        return directions, state._replace(count=optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class StepThenDecayState(NamedTuple):
    """State of :func:`step_then_decay`."""

    count: Array  # calls so far, int32 (the schedule's argument)


def step_then_decay(learning_rate: optax.ScalarOrSchedule, weight_decay: float = 0.0,
                    skip_first: bool = False) -> optax.GradientTransformation:
    """The authors' parameter update: ``p ← (p − lr·N)(1 − lr·weight_decay)``,
    i.e. the update ``−lr·N − lr·weight_decay·(p − lr·N)``. With ``skip_first``
    the first call (SOAP's initialisation) leaves the parameters alone."""

    def init_fn(params):
        del params
        return StepThenDecayState(jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        decays = not (isinstance(weight_decay, (int, float)) and weight_decay == 0)
        if decays and params is None:
            raise ValueError("soap: weight_decay needs params in update")

        def leaf(u, p=None):
            step = jnp.asarray(-lr, u.dtype) * u
            if not decays:
                return step
            shrink = jnp.asarray(lr * weight_decay, jnp.float32)
            if skip_first:
                shrink = jnp.where(state.count == 0, 0.0, shrink)
            return (step.astype(jnp.float32)
                    - shrink * (p.astype(jnp.float32) + step.astype(jnp.float32))).astype(u.dtype)

        new = jax.tree.map(leaf, updates, params) if decays else jax.tree.map(leaf, updates)
        return new, StepThenDecayState(optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


def soap(learning_rate: optax.ScalarOrSchedule, *, b1: float = 0.95, b2: float = 0.95,
         eps: float = 1e-8, weight_decay: float = 0.0, precondition_frequency: int = 10,
         max_precond_dim: int = 10000, shampoo_beta: float | None = None,
         precondition: bool = True, precondition_1d: bool = False, merge_dims: bool = False,
         normalize_grads: bool = False,
         correct_bias: bool = True) -> optax.GradientTransformationExtraArgs:
    """SOAP as the authors' optimizer: :func:`scale_by_soap`, the step
    ``−learning_rate·N``, then decoupled weight decay on the stepped weights,
    ``p ← (p − lr·N)(1 − lr·weight_decay)``, skipped (like the step) on the
    initialising first call."""
    where = "soap"
    if not _is_traced(learning_rate):
        check_learning_rate(where, "learning_rate", learning_rate)
    if not _is_traced(weight_decay):
        check_number(where, "weight_decay", weight_decay, low=0.0)
    _check_soap_args(where, b1, b2, eps, precondition_frequency, max_precond_dim, shampoo_beta,
                     dict(precondition=precondition, precondition_1d=precondition_1d,
                          merge_dims=merge_dims, normalize_grads=normalize_grads,
                          correct_bias=correct_bias))
    initialises = precondition and not (
        not _is_traced(precondition_frequency) and precondition_frequency == 0)
    return optax.chain(
        scale_by_soap(b1, b2, eps, precondition_frequency, max_precond_dim, shampoo_beta,
                      precondition, precondition_1d=precondition_1d, merge_dims=merge_dims,
                      normalize_grads=normalize_grads, correct_bias=correct_bias),
        step_then_decay(learning_rate, weight_decay, skip_first=initialises))
