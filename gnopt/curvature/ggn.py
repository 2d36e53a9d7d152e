"""Matrix-free generalised Gauss-Newton products through one shared linearisation.

For a model ``z = f(θ, x)`` and a loss ``ℓ(z, y)``, at the anchor ``θ0``:

* ``J = ∂f/∂θ (θ0)``, ``g = Jᵀ ∇_z ℓ``, ``G = Jᵀ H_z J`` with ``H_z = ∇²_z ℓ``
  (Martens 2010; Schraudolph 2002; Abreu et al. 2025 eq. for ``G``).
* ``G v = Jᵀ (H_z (J v))``: one ``jax.linearize`` gives ``z0`` and the map
  ``v ↦ J v``; its transpose gives ``c ↦ Jᵀ c``. The primal pass is shared by
  every product, so a product costs a tangent pass plus a transpose pass.
* Layerwise (block-diagonal) ``G``: ``(G v)_k = J_kᵀ H_z J_k v_k`` per block
  ``k`` — each block sees only its own parameters move. Computed with
  restricted passes (:mod:`gnopt.curvature.prune`): block ``k``'s tangent
  starts at block ``k`` and its transpose stops there.

The GN model is an operator pytree (:class:`AbstractOperator`): the GGN is
:class:`LinearisedModel`, the block diagonal of any operator
:class:`BlockDiagonal`; a curvature (:class:`AbstractCurvature`) builds one per
batch. Solvers see only the operator (``gnopt.solvers``).
"""

from __future__ import annotations

import abc
from typing import Any, Callable, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from gnopt.curvature import blocks as _blocks
from gnopt.curvature import prune as _prune
from gnopt.losses import LossFn, loss_grad, loss_hvp


def _check_batch(batch):
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise ValueError(
            "batch must be a pair (inputs, targets); got "
            f"{type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
    return batch


def _cast_like(v, params):
    return jax.tree.map(lambda x, p: x.astype(p.dtype), v, params)


def _vdot(a, b):
    return _blocks.block_vdot(a, b, [0] * len(jax.tree.leaves(a)), 1)[0]


class AbstractOperator(eqx.Module):
    """A GN model as an operator pytree: ``q(Δ) = ℓ + gᵀΔ + ½ ΔᵀCΔ`` with ``C`` PSD.

    A curvature's :meth:`AbstractCurvature.linearise` returns one. Solvers use
    only :meth:`mv`, :meth:`gradient` and the block structure (one block unless
    a subclass says otherwise); :class:`Quadratic` also uses
    :meth:`quadratic_terms`, which subclasses may fuse. A new curvature is a
    subclass defining ``params`` (the anchor), :meth:`mv`, :meth:`gradient` and
    :meth:`loss`; :class:`BlockDiagonal` of it works at once.
    """

    # subclasses provide ``params``: the anchor (a field or a property)

    @abc.abstractmethod
    def mv(self, v):
        """``C v`` (a pytree like ``params``)."""

    @abc.abstractmethod
    def gradient(self):
        """``g``, the loss gradient at the anchor."""

    @abc.abstractmethod
    def loss(self):
        """``ℓ`` at the anchor."""

    # -- block structure (one block) ------------------------------------
    @property
    def block_ids(self) -> tuple[int, ...]:
        """The block of each parameter leaf (in ``jax.tree.leaves`` order)."""
        return (0,) * len(jax.tree.leaves(self.params))

    @property
    def num_blocks(self) -> int:
        return 1 + max(self.block_ids, default=0)

    def block_vdot(self, a, b):
        """Per-block inner products ``⟨a_k, b_k⟩`` (shape ``[num_blocks]``)."""
        return _blocks.block_vdot(a, b, self.block_ids, self.num_blocks)

    def block_scale(self, scales, tree):
        """Each leaf times ``scales[block of the leaf]``."""
        return _blocks.block_scale(scales, tree, self.block_ids)

    # -- derived (override to fuse) -------------------------------------
    def quadratic_terms(self, delta):
        """Per-block model values ``q_k(Δ) − ℓ = g_kᵀΔ_k + ½ Δ_kᵀ(CΔ)_k`` and ``∇q(Δ) = g + CΔ``."""
        g, cd = self.gradient(), self.mv(delta)
        return (self.block_vdot(g, delta) + 0.5 * self.block_vdot(delta, cd),
                jax.tree.map(jnp.add, g, cd))

    def along(self, d):
        """``(gᵀd, dᵀCd)``: the model along ``d`` is ``α gᵀd + ½ α² dᵀCd``."""
        return _vdot(self.gradient(), d), _vdot(d, self.mv(d))

    def block_diagonal_mv(self, v, ids, num_blocks):
        """``Σ_k P_k C P_k v`` (``P_k``: keep block ``k``): the block diagonal of ``C``.

        This default costs ``num_blocks`` products on zero-filled vectors;
        :class:`LinearisedModel` overrides it with restricted passes.
        """
        return _blocks.select([self.mv(_blocks.restrict(v, ids, k)) for k in range(num_blocks)], ids)

    def block_quadratic_terms(self, delta, ids, num_blocks):
        """:meth:`quadratic_terms` of the block-diagonal model."""
        g, cd = self.gradient(), self.block_diagonal_mv(delta, ids, num_blocks)
        return (_blocks.block_vdot(g, delta, ids, num_blocks)
                + 0.5 * _blocks.block_vdot(delta, cd, ids, num_blocks),
                jax.tree.map(jnp.add, g, cd))


class LinearisedModel(AbstractOperator):
    """The GGN operator: the model linearised at ``θ0`` on one batch, ``f(θ0) + J Δ``.

    Built once per batch (one primal pass, ``jax.linearize``); every product
    reuses it. ``C = G = Jᵀ H_z J``. ``blocks`` (legacy) makes it the
    block-diagonal GGN, as :class:`BlockDiagonal` of the full one does.

    Attributes:
      outputs: ``z0 = f(θ0, x)``.
      block_ids: the block of each parameter leaf (all zero for the full GGN).
      num_blocks: number of diagonal blocks.
    """

    params: Any
    targets: Any
    outputs: Any
    loss_fn: LossFn = eqx.field(static=True)
    _jvp: Any  # jax.tree_util.Partial: v -> J v
    _ids: tuple = eqx.field(static=True)
    block_names: tuple = eqx.field(static=True)

    def __init__(self, apply_fn: Callable, loss_fn: LossFn, params, batch, blocks=None):
        inputs, self.targets = _check_batch(batch)
        self.loss_fn = loss_fn
        self.params = params
        self.outputs, self._jvp = jax.linearize(lambda p: apply_fn(p, inputs), params)
        ids, names = _blocks.leaf_block_ids(params, blocks)
        self._ids, self.block_names = tuple(ids), tuple(names)

    @property
    def block_ids(self) -> tuple[int, ...]:
        return self._ids

    @property
    def num_blocks(self) -> int:
        return len(self.block_names)

    # -- primitive maps -------------------------------------------------
    def jvp(self, v):
        """``J v`` (output space); ``v`` is cast to the parameters' dtypes."""
        return self._jvp(_cast_like(v, self.params))

    def vjp(self, c):
        """``Jᵀ c`` (parameter space)."""
        (out,) = jax.linear_transpose(self._jvp, self.params)(c)
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

    # -- restricted passes ----------------------------------------------
    def block_maps(self, ids, num_blocks) -> list:
        """``[(J_k, merge_k)]``: ``J_k`` maps block ``k``'s leaves (a list) to ``J_k v_k``
        computing only what depends on them (symbolic zeros elsewhere, see
        :mod:`gnopt.curvature.prune`), so ``jax.vjp`` of it is ``J_kᵀ`` down to
        block ``k`` only. With one block: the whole ``J``."""
        if num_blocks == 1:
            return [self.jvp]
        closed, out_tree = _prune.linear_jaxpr(self._jvp, self.params)
        return [_prune.restrict_linear(closed, out_tree, [i == k for i in ids])
                for k in range(num_blocks)]

    def _per_block(self, v, ids, num_blocks, cotangent_fn):
        """For each block: ``u_k = J_k v_k``, ``(value_k, c_k) = cotangent_fn(u_k)``,
        ``J_kᵀ c_k``. Returns ``(values [K], merged pull-backs)``."""
        v = _cast_like(v, self.params)
        leaves, treedef = jax.tree.flatten(v)
        values, out = [], list(leaves)
        for k, jk in enumerate(self.block_maps(ids, num_blocks)):
            if num_blocks == 1:
                u, pull = jax.vjp(jk, v)
            else:
                u, pull = jax.vjp(jk, [x for x, i in zip(leaves, ids) if i == k])
            value, cot = cotangent_fn(u)
            (back,) = pull(cot)
            values.append(value)
            if num_blocks == 1:
                return jnp.stack(values), back
            back = iter(back)
            out = [next(back) if i == k else x for x, i in zip(out, ids)]
        return jnp.stack(values), treedef.unflatten(out)

    # -- derived --------------------------------------------------------
    def gradient(self):
        """``g = Jᵀ ∇_z ℓ(z0)``: the loss gradient, from the shared linearisation."""
        return self.vjp(self.output_grad())

    def mv(self, v):
        """``G v`` (block-diagonal ``G`` when built with several blocks)."""
        return self.block_diagonal_mv(v, self._ids, self.num_blocks)

    def ggn_mvp(self, v):
        """``G v`` (block-diagonal ``G`` when the model has several blocks)."""
        return self.mv(v)

    def block_diagonal_mv(self, v, ids, num_blocks):
        """``(G v)_k = J_kᵀ H_z J_k v_k``: per block a tangent from block ``k`` on and
        a transpose down to it."""
        return self._per_block(v, ids, num_blocks,
                               lambda u: (jnp.zeros(()), self.output_hvp(u)))[1]

    def _terms(self, delta, ids, num_blocks, objective: str):
        if objective == "quadratic":
            gz = self.output_grad()

            def cot(u):
                hu = self.output_hvp(u)
                return jnp.vdot(gz, u) + 0.5 * jnp.vdot(u, hu), gz + hu
        elif objective == "prox_linear":
            loss0 = self.loss()

            def cot(u):
                z = self.outputs + u
                return self.loss(z) - loss0, self.output_grad(z)
        else:
            raise ValueError(f"objective must be 'quadratic' or 'prox_linear', got {objective!r}")
        return self._per_block(delta, ids, num_blocks, cot)

    def quadratic_terms(self, delta):
        return self._terms(delta, self._ids, self.num_blocks, "quadratic")

    def block_quadratic_terms(self, delta, ids, num_blocks):
        return self._terms(delta, ids, num_blocks, "quadratic")

    def prox_linear_terms(self, delta, ids=None, num_blocks=None):
        """Per-block ``ℓ(z0 + J_kΔ_k) − ℓ(z0)`` and their gradients ``J_kᵀ∇ℓ(z0 + J_kΔ_k)``."""
        if ids is None:
            ids, num_blocks = self._ids, self.num_blocks
        return self._terms(delta, ids, num_blocks, "prox_linear")

    def model_terms(self, delta, objective: str = "quadratic"):
        """Per-block model values at ``Δ`` and the gradient of the model (legacy form:
        ``(values, [gradient])``, so ``block_pullback`` of the list is the gradient).

        * ``"quadratic"``: ``q_k = ∇ℓᵀu_k + ½ u_kᵀ H_z u_k``, ``u_k = J_k Δ_k``;
        * ``"prox_linear"``: ``ℓ(z0 + u_k) − ℓ(z0)``.
        """
        values, grad = self._terms(delta, self._ids, self.num_blocks, objective)
        return values, [grad]

    def block_pullback(self, cotangents: list):
        """The gradient of :meth:`model_terms` (its list holds it already)."""
        (grad,) = cotangents
        return grad

    def block_tangents(self, v) -> list:
        """``[J_k v_k for each block k]`` (restricted passes)."""
        v = _cast_like(v, self.params)
        leaves = jax.tree.leaves(v)
        maps = self.block_maps(self._ids, self.num_blocks)
        if self.num_blocks == 1:
            return [maps[0](v)]
        return [jk([x for x, i in zip(leaves, self._ids) if i == k]) for k, jk in enumerate(maps)]

    def along(self, d):
        """``(gᵀd, dᵀGd)`` for the whole GGN (blocks ignored), one tangent pass.

        The model along ``d`` is ``q(αd) = α gᵀd + ½ α² dᵀGd``, minimised at
        ``α* = −gᵀd / dᵀGd`` (Martens & Grosse 2015, §6.4).
        """
        u = self.jvp(d)
        return jnp.vdot(self.output_grad(), u), jnp.vdot(u, self.output_hvp(u))

    def quadratic(self, delta, damping=0.0):
        """Per-block GN model decrease ``q_k(Δ) = g_kᵀΔ_k + ½ Δ_kᵀ(G_kk + δI)Δ_k``."""
        values, _ = self.quadratic_terms(delta)
        return values + 0.5 * damping * self.block_vdot(delta, delta)


class BlockDiagonal(AbstractOperator):
    """The block diagonal of any operator: ``Σ_k P_k C P_k`` (layerwise GN).

    Attributes:
      operator: the whole operator ``C``.
      block_ids: the block of each parameter leaf; ``block_names`` their labels.
    """

    operator: AbstractOperator
    _ids: tuple = eqx.field(static=True)
    block_names: tuple = eqx.field(static=True)

    @property
    def params(self):
        return self.operator.params

    @property
    def block_ids(self) -> tuple[int, ...]:
        return self._ids

    @property
    def num_blocks(self) -> int:
        return len(self.block_names)

    def mv(self, v):
        return self.operator.block_diagonal_mv(v, self._ids, self.num_blocks)

    ggn_mvp = mv

    def gradient(self):
        return self.operator.gradient()

    def loss(self):
        return self.operator.loss()

    def quadratic_terms(self, delta):
        return self.operator.block_quadratic_terms(delta, self._ids, self.num_blocks)

    def prox_linear_terms(self, delta):
        if not isinstance(self.operator, LinearisedModel):
            raise TypeError(f"prox-linear needs the linearised model's outputs; "
                            f"{type(self.operator).__name__} has none")
        return self.operator.prox_linear_terms(delta, self._ids, self.num_blocks)

    def along(self, d):
        """The whole operator's ``(gᵀd, dᵀCd)`` (blocks ignored, as the trust ratio wants)."""
        return self.operator.along(d)

    def model_terms(self, delta, objective: str = "quadratic"):
        """Legacy form, see :meth:`LinearisedModel.model_terms`."""
        terms = self.quadratic_terms if objective == "quadratic" else self.prox_linear_terms
        values, grad = terms(delta)
        return values, [grad]

    def block_pullback(self, cotangents: list):
        (grad,) = cotangents
        return grad


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
    """Which curvature a Gauss-Newton step uses: builds its operator on a batch."""

    def block_fn(self):
        """The block labelling (``None``: one block)."""
        return None

    def linearise(self, apply_fn, loss_fn, params, batch) -> AbstractOperator:
        """The GN model at ``params`` on ``batch``: an :class:`AbstractOperator`.

        This default is the GGN (:class:`LinearisedModel`), block-diagonal
        (:class:`BlockDiagonal`) when :meth:`block_fn` gives a labelling.
        """
        return block_diagonal(LinearisedModel(apply_fn, loss_fn, params, batch), self.block_fn())


def block_diagonal(operator: AbstractOperator, blocks) -> AbstractOperator:
    """``operator`` itself for ``blocks=None``, else :class:`BlockDiagonal` of it by the labelling."""
    if blocks is None:
        return operator
    ids, names = _blocks.leaf_block_ids(operator.params, blocks)
    return BlockDiagonal(operator, tuple(ids), tuple(names))


class FullCurvature(AbstractCurvature):
    """The full GGN ``G = Jᵀ H_z J`` (Abreu et al. 2025, "full GN")."""


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
                model: LinearisedModel | None = None, along: tuple | None = None) -> TrustRatio:
    """``ρ = (L(θ) − L(θ + Δ)) / (q(0) − q(Δ))`` on one batch (Moré 1983; Martens 2010 §4.1).

    ``q(0) − q(Δ) = −(gᵀΔ + ½ ΔᵀGΔ)`` is the full-GGN model's predicted
    decrease. Cost: one tangent pass (``model``: the linearisation at
    ``params`` on ``batch``, built here if not given; building it is one
    forward) and one extra forward at ``θ + Δ``; no transpose. ``along``:
    ``(gᵀΔ, ΔᵀGΔ)`` on ``model``'s batch where the caller has them (PI-Muon's
    plane, from its 2×2 model), which saves the tangent pass.

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
    slope, curv = model.along(step) if along is None else along
    predicted = -(slope + 0.5 * curv)
    moved = jax.tree.map(jnp.add, params, step)
    loss0 = model.loss()
    actual = loss0 - loss_fn(apply_fn(moved, inputs), targets)
    res = 32 * jnp.finfo(jnp.result_type(loss0)).eps * jnp.abs(loss0)
    resolved = jnp.abs(predicted) > res
    rho = jnp.where(resolved, actual / jnp.where(resolved, predicted, 1.0),
                    jnp.where(actual >= -res, 1.0, -jnp.inf))
    return TrustRatio(rho, actual, predicted, curv)
