"""Matrix-free generalised Gauss-Newton products through one shared linearisation.

For a model ``z = f(θ, x)`` and a loss ``ℓ(z, y)``, at the anchor ``θ0``:

* ``J = ∂f/∂θ (θ0)``, ``g = Jᵀ ∇_z ℓ``, ``G = Jᵀ H_z J`` with ``H_z = ∇²_z ℓ``
  (Martens 2010; Schraudolph 2002; Abreu et al. 2025 eq. for ``G``).
* ``G v = Jᵀ (H_z (J v))``: one ``jax.linearize`` gives ``z0`` and the map
  ``v ↦ J v``; its transpose gives ``c ↦ Jᵀ c``. The primal pass is shared by
  every product, so a product costs a tangent pass plus a transpose pass.
* Layerwise (block-diagonal) ``G``: ``(G v)_k = J_kᵀ H_z J_k v_k`` per block
  ``k`` — each block sees only its own parameters move.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from gnopt.curvature import blocks as _blocks
from gnopt.losses import LossFn, loss_grad, loss_hvp


def _check_batch(batch):
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise ValueError(
            "batch must be a pair (inputs, targets); got "
            f"{type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
    return batch


class LinearisedModel:
    """The model linearised at ``θ0`` on one batch: ``f(θ0) + J Δ``.

    Built once per batch (one primal pass). All products below reuse it.

    Attributes:
      outputs: ``z0 = f(θ0, x)``.
      block_ids: the block of each parameter leaf (all zero for the full GGN).
      num_blocks: number of diagonal blocks.
    """

    def __init__(self, apply_fn: Callable, loss_fn: LossFn, params, batch,
                 blocks=None):
        inputs, self.targets = _check_batch(batch)
        self.loss_fn = loss_fn
        self.params = params
        self.outputs, self._jvp = jax.linearize(lambda p: apply_fn(p, inputs), params)
        self._vjp = jax.linear_transpose(self._jvp, params)
        self.block_ids, self.block_names = _blocks.leaf_block_ids(params, blocks)
        self.num_blocks = len(self.block_names)

    # -- primitive maps -------------------------------------------------
    def jvp(self, v):
        """``J v`` (output space); ``v`` is cast to the parameters' dtypes."""
        return self._jvp(jax.tree.map(lambda x, p: x.astype(p.dtype), v, self.params))

    def vjp(self, c):
        """``Jᵀ c`` (parameter space)."""
        (out,) = self._vjp(c)
        return out

    def loss(self, outputs=None):
        """``ℓ(z, y)`` at ``z0`` or at the given outputs."""
        return self.loss_fn(self.outputs if outputs is None else outputs, self.targets)

    def output_grad(self, outputs=None):
        """``∇_z ℓ`` at ``z0`` or at the given outputs."""
        return loss_grad(self.loss_fn, self.outputs if outputs is None else outputs, self.targets)

    def output_hvp(self, u):
        """``H_z u`` at ``z0``."""
        return loss_hvp(self.loss_fn, self.outputs, self.targets, u)

    # -- derived --------------------------------------------------------
    def gradient(self):
        """``g = Jᵀ ∇_z ℓ(z0)``: the loss gradient, from the shared linearisation."""
        return self.vjp(self.output_grad())

    def block_tangents(self, v) -> list:
        """``[J_k v_k for each block k]`` (one tangent pass per block)."""
        if self.num_blocks == 1:
            return [self.jvp(v)]
        return [self.jvp(_blocks.restrict(v, self.block_ids, k)) for k in range(self.num_blocks)]

    def block_pullback(self, cotangents: list):
        """Merges ``(J_kᵀ c_k)_k`` over blocks: leaf from its own block's pull-back."""
        if self.num_blocks == 1:
            return self.vjp(cotangents[0])
        return _blocks.select([self.vjp(c) for c in cotangents], self.block_ids)

    def ggn_mvp(self, v):
        """``G v`` (block-diagonal ``G`` when the model has several blocks)."""
        return self.block_pullback([self.output_hvp(u) for u in self.block_tangents(v)])

    def block_vdot(self, a, b):
        """Per-block inner products ``⟨a_k, b_k⟩`` (shape ``[num_blocks]``)."""
        return _blocks.block_vdot(a, b, self.block_ids, self.num_blocks)

    def model_terms(self, delta, objective: str = "quadratic"):
        """Per-block model values and output cotangents at ``Δ``, without transposes.

        With ``u_k = J_k Δ_k``:

        * ``"quadratic"``: ``q_k = ∇ℓᵀu_k + ½ u_kᵀ H_z u_k`` and cotangent
          ``∇ℓ + H_z u_k`` (so ``J_kᵀ`` of it is ``∇_k q``);
        * ``"prox_linear"``: ``ℓ(z0 + u_k) − ℓ(z0)`` and ``∇ℓ(z0 + u_k)``.

        Returns ``(values [num_blocks], cotangents list)``.
        """
        tangents = self.block_tangents(delta)
        if objective == "quadratic":
            gz = self.output_grad()
            hus = [self.output_hvp(u) for u in tangents]
            values = [jnp.vdot(gz, u) + 0.5 * jnp.vdot(u, hu) for u, hu in zip(tangents, hus)]
            return jnp.stack(values), [gz + hu for hu in hus]
        loss0 = self.loss()
        shifted = [self.outputs + u for u in tangents]
        return jnp.stack([self.loss(z) - loss0 for z in shifted]), [self.output_grad(z) for z in shifted]

    def along(self, d):
        """``(gᵀd, dᵀGd)`` for the whole GGN (blocks ignored), one tangent pass.

        The model along ``d`` is ``q(αd) = α gᵀd + ½ α² dᵀGd``, minimised at
        ``α* = −gᵀd / dᵀGd`` (Martens & Grosse 2015, §6.4).
        """
        u = self.jvp(d)
        return jnp.vdot(self.output_grad(), u), jnp.vdot(u, self.output_hvp(u))

    def quadratic(self, delta, damping=0.0):
        """Per-block GN model decrease ``q_k(Δ) = g_kᵀΔ_k + ½ Δ_kᵀ(G_kk + δI)Δ_k``.

        The GN quadratic of the whole step is ``ℓ(z0) + Σ_k q_k``. Costs one
        tangent pass per block (``g_kᵀΔ_k = ∇ℓᵀ J_k Δ_k``).
        """
        values, _ = self.model_terms(delta)
        return values + 0.5 * damping * self.block_vdot(delta, delta)


def ggn_mvp(apply_fn: Callable, loss_fn: LossFn, params, batch, v, *, blocks=None):
    """Generalised Gauss-Newton-vector product ``G v = Jᵀ H_z J v``.

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs``.
      loss_fn: ``loss_fn(outputs, targets) -> scalar``; closed-form ``H_z`` for
        :mod:`gnopt.losses` losses, autodiff in output space otherwise.
      params: the anchor ``θ0``.
      batch: ``(inputs, targets)``.
      v: a pytree like ``params``.
      blocks: ``None`` for the full GGN; a labelling (callable or pytree, see
        :func:`gnopt.curvature.default_block_labels`) for its block diagonal.

    Returns:
      ``G v``, a pytree like ``params``.
    """
    return LinearisedModel(apply_fn, loss_fn, params, batch, blocks).ggn_mvp(v)


class AbstractCurvature(eqx.Module):
    """Which GGN a Gauss-Newton step uses: full or block-diagonal."""

    def block_fn(self):
        """The block labelling (``None`` for the full GGN)."""
        raise NotImplementedError

    def linearise(self, apply_fn, loss_fn, params, batch) -> LinearisedModel:
        """The model linearised at ``params`` on ``batch``, with this curvature's blocks."""
        return LinearisedModel(apply_fn, loss_fn, params, batch, self.block_fn())


class FullCurvature(AbstractCurvature):
    """The full GGN ``G = Jᵀ H_z J`` (Abreu et al. 2025, "full GN")."""

    def block_fn(self):
        return None


class LayerwiseCurvature(AbstractCurvature):
    """Block-diagonal GGN: each block solved with the others frozen at ``θ0``.

    Attributes:
      blocks: ``params -> labels`` (default :func:`default_block_labels`).
    """

    blocks: Callable[[Any], Any] = eqx.field(static=True, default=_blocks.default_block_labels)

    def block_fn(self):
        return self.blocks


def full() -> FullCurvature:
    """The full GGN."""
    return FullCurvature()


def layerwise(blocks: Callable[[Any], Any] | None = None) -> LayerwiseCurvature:
    """The block-diagonal GGN, blocks from ``blocks(params)`` (default: per layer)."""
    return LayerwiseCurvature(blocks or _blocks.default_block_labels)


class TrustRatio(NamedTuple):
    """What :func:`trust_ratio` measured along a step ``Δ`` (all scalars)."""

    rho: jax.Array  # ρ = actual / predicted (with the float-resolution guard)
    actual: jax.Array  # L(θ) − L(θ + Δ)
    predicted: jax.Array  # q(0) − q(Δ) = −(gᵀΔ + ½ ΔᵀGΔ)
    curvature: jax.Array  # ΔᵀGΔ

    @property
    def slope(self):
        """``gᵀΔ``, the loss's directional derivative (exact: ``∇_zℓᵀ JΔ``)."""
        return -(self.predicted + 0.5 * self.curvature)

    @property
    def loss_curvature(self):
        """``c``: the curvature of the parabola ``L(θ) + t gᵀΔ + ½ t² c`` through
        ``L(θ + Δ)`` at ``t = 1``, i.e. ``ΔᵀGΔ + 2(predicted − actual)``."""
        return self.curvature + 2 * (self.predicted - self.actual)

    @property
    def curvature_ratio(self):
        """``r = c / ΔᵀGΔ``: the loss's curvature along ``Δ`` over the model's.
        ``r < 1``: the loss curves less than the GGN predicts along ``Δ`` (its
        1-D minimiser lies ``1/r`` times further out than the model's)."""
        return self.loss_curvature / self.curvature


def trust_ratio(apply_fn: Callable, loss_fn: LossFn, params, batch, step, *,
                model: LinearisedModel | None = None) -> TrustRatio:
    """``ρ = (L(θ) − L(θ + Δ)) / (q(0) − q(Δ))`` on one batch (Moré 1983; Martens 2010 §4.1).

    ``q(0) − q(Δ) = −(gᵀΔ + ½ ΔᵀGΔ)`` is the full-GGN model's predicted
    decrease. Cost: one tangent pass (``model``: the linearisation at
    ``params`` on ``batch``, built here if not given; building it is one
    forward) and one extra forward at ``θ + Δ``; no transpose.

    ``ρ`` measures the model's accuracy, so a step the model predicts to
    *raise* the loss (possible for steps that are not the model's minimiser,
    e.g. PI-Muon's fused step) still gives ``ρ ≈ 1`` when the loss does rise as
    predicted. Near a minimum both changes fall below the float resolution of
    the loss (``res = 32·eps·|L(θ)|``): a prediction with ``|q(0) − q(Δ)| ≤ res``
    gives ``ρ = 1`` when the loss did not rise by more than ``res`` (model and
    loss agree to working precision) and ``ρ = −inf`` when it did.
    """
    inputs, targets = _check_batch(batch)
    model = LinearisedModel(apply_fn, loss_fn, params, batch) if model is None else model
    step = jax.tree.map(lambda s, p: s.astype(p.dtype), step, params)
    slope, curv = model.along(step)
    predicted = -(slope + 0.5 * curv)
    moved = jax.tree.map(jnp.add, params, step)
    loss0 = model.loss()
    actual = loss0 - loss_fn(apply_fn(moved, inputs), targets)
    res = 32 * jnp.finfo(jnp.result_type(loss0)).eps * jnp.abs(loss0)
    resolved = jnp.abs(predicted) > res
    rho = jnp.where(resolved, actual / jnp.where(resolved, predicted, 1.0),
                    jnp.where(actual >= -res, 1.0, -jnp.inf))
    return TrustRatio(rho, actual, predicted, curv)
