"""Inner-optimizer solvers: N optax steps on the GN model (Abreu et al. 2025, §3.2).

Each inner step takes a fresh micro-batch of the outer batch, linearises the
model there (one primal pass) and follows the gradient of

* the GN quadratic ``q(Δ) = ℓ(z0) + ∇ℓᵀ JΔ + ½ (JΔ)ᵀ H_z (JΔ)``:
  ``∇q = Jᵀ(∇_z ℓ(z0) + H_z J Δ)`` — one jvp and one transpose; or
* the prox-linear model ``ℓ(z0 + JΔ)`` (the true loss on linearised outputs):
  ``Jᵀ ∇_z ℓ(z0 + JΔ)``,

plus the proximal term ``δ Δ``. Layerwise curvature uses ``J_k Δ_k`` per block.
The whole loop is one ``lax.scan``.
"""

from __future__ import annotations

from typing import Callable, ClassVar, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from gnopt._checks import check_int, check_number
from gnopt.schedules import inner_cosine
from gnopt.solvers.base import AbstractSolver, working_precision
from gnopt.solvers.objectives import OBJECTIVES, AbstractObjective

OptimizerOrFactory = optax.GradientTransformation | Callable[[int], optax.GradientTransformation]


def split_microbatches(batch, inner_batch_size: int):
    """Splits every leaf ``[B, ...]`` into ``N = B // b`` strided micro-batches ``[N, b, ...]``.

    Micro-batch ``k`` holds rows ``k, k + N, k + 2N, …``: with the batch sharded
    over devices, every micro-batch spans all of them (data-parallel inner steps).
    """
    sizes = {x.shape[0] for x in jax.tree.leaves(batch)}
    if len(sizes) != 1:
        raise ValueError(f"batch leaves disagree on the batch dimension: {sorted(sizes)}")
    (size,) = sizes
    if inner_batch_size < 1 or size % inner_batch_size:
        raise ValueError(
            f"inner_batch_size={inner_batch_size} must divide the batch size {size}")
    n = size // inner_batch_size
    return n, jax.tree.map(
        lambda x: x.reshape((inner_batch_size, n) + x.shape[1:]).swapaxes(0, 1), batch)


class InnerOptimizer(AbstractSolver):
    """``N = B / inner_batch_size`` steps of an optax optimizer on the GN model.

    Attributes:
      optimizer: an optax transform, or a factory ``N -> transform`` (so a
        schedule can span exactly the ``N`` inner steps, e.g.
        :func:`gnopt.inner_adamw`). Its state restarts every outer step; the
        iterate ``Δ`` is warm-started.
      inner_batch_size: sequences per inner micro-batch (``b_inner``).
      objective: ``"quadratic"`` (GN) or ``"prox_linear"`` (GN-prox-linear).
    """

    stat_names: ClassVar[tuple[str, ...]] = ("inner_steps", "model_first", "model_last")

    optimizer: OptimizerOrFactory = eqx.field(static=True)
    inner_batch_size: int = eqx.field(static=True)
    objective: Literal["quadratic", "prox_linear"] | AbstractObjective = eqx.field(
        static=True, default="quadratic")

    def __check_init__(self):
        if not (isinstance(self.objective, AbstractObjective) or self.objective in OBJECTIVES):
            raise ValueError(f"objective must be 'quadratic' or 'prox_linear', got {self.objective!r}")

    def _objective(self) -> AbstractObjective:
        obj = self.objective
        return obj if isinstance(obj, AbstractObjective) else OBJECTIVES[obj]()

    def minimise(self, operator, gradient, delta0, damping, num_steps: int = 100):
        """``num_steps`` optax steps on ``gᵀΔ + ½ Δᵀ(C + δI)Δ`` (one operator, no
        micro-batches; the quadratic objective whatever :attr:`objective` says)."""
        opt = self.optimizer
        if not isinstance(opt, optax.GradientTransformation):
            opt = opt(num_steps)
        delta0 = otu.tree_cast_like(delta0, gradient)

        def step(carry, _):
            delta, opt_state = carry
            cd = operator.mv(delta)
            grad = otu.tree_add_scale(otu.tree_add(gradient, cd), damping, delta)
            values = operator.block_vdot(gradient, delta) + 0.5 * operator.block_vdot(delta, cd)
            updates, opt_state = opt.update(grad, opt_state, delta)
            return (optax.apply_updates(delta, updates), opt_state), jnp.sum(values)

        (delta, _), values = jax.lax.scan(step, (delta0, opt.init(delta0)), length=num_steps)
        return delta, {"inner_steps": jnp.asarray(num_steps), "model_first": values[0],
                       "model_last": values[-1]}

    def solve(self, apply_fn, loss_fn, curvature, params, batch, delta0, damping):
        delta, stats, _ = self._run(apply_fn, loss_fn, curvature, params, batch, delta0, damping,
                                    with_gradient=False)
        return delta, stats

    def solve_with_gradient(self, apply_fn, loss_fn, curvature, params, batch, delta0, damping):
        """Also ``g``, the mean of the micro-batch gradients ``J_mᵀ∇_zℓ_m`` (the
        batch gradient for a per-token mean loss on equal-length micro-batches):
        one more transpose per inner step, no extra primal pass."""
        return self._run(apply_fn, loss_fn, curvature, params, batch, delta0, damping,
                         with_gradient=True)

    def _run(self, apply_fn, loss_fn, curvature, params, batch, delta0, damping, *, with_gradient):
        num_steps, micro = split_microbatches(batch, self.inner_batch_size)
        opt = self.optimizer
        if not isinstance(opt, optax.GradientTransformation):
            opt = opt(num_steps)
        delta0 = otu.tree_cast_like(delta0, params)
        objective = self._objective()

        def step(carry, mb):
            delta, opt_state, g_sum = carry
            lin = curvature.linearise(apply_fn, loss_fn, params, mb)
            values, model_grad = objective.terms(lin, delta)
            grad = otu.tree_add_scale(model_grad, damping, delta)
            updates, opt_state = opt.update(grad, opt_state, delta)
            if with_gradient:
                g_sum = otu.tree_add(g_sum, working_precision(lin.gradient()))
            return (optax.apply_updates(delta, updates), opt_state, g_sum), jnp.sum(values)

        g0 = working_precision(otu.tree_zeros_like(params)) if with_gradient else None
        (delta, _, g_sum), values = jax.lax.scan(step, (delta0, opt.init(delta0), g0), micro)
        stats = {
            "inner_steps": jnp.asarray(num_steps),
            "model_first": values[0],
            "model_last": values[-1],
        }
        return delta, stats, (otu.tree_scale(1.0 / num_steps, g_sum) if with_gradient else None)


def _check_optimizer(where: str, optimizer, inner_batch_size) -> None:
    if not (isinstance(optimizer, optax.GradientTransformation) or callable(optimizer)):
        raise TypeError(f"{where}: optimizer must be an optax transform or a factory N -> transform, "
                        f"got {type(optimizer).__name__}")
    check_int(where, "inner_batch_size", inner_batch_size, low=1)


def inner_optimizer(optimizer: OptimizerOrFactory, inner_batch_size: int) -> InnerOptimizer:
    """The paper's solver: an optax optimizer run on the GN quadratic."""
    _check_optimizer("inner_optimizer", optimizer, inner_batch_size)
    return InnerOptimizer(optimizer, inner_batch_size, "quadratic")


def prox_linear(optimizer: OptimizerOrFactory, inner_batch_size: int) -> InnerOptimizer:
    """GN-prox-linear: the same inner loop on the true loss of the linearised model."""
    _check_optimizer("prox_linear", optimizer, inner_batch_size)
    return InnerOptimizer(optimizer, inner_batch_size, "prox_linear")


def _check_inner(where: str, learning_rate, b1, b2, clip, warmup_fraction, **more) -> None:
    check_number(where, "learning_rate", learning_rate, low=0.0)
    check_number(where, "b1", b1, low=0.0, high=1.0)
    check_number(where, "b2", b2, low=0.0, high=1.0)
    if clip is not None:
        check_number(where, "clip", clip, low=0.0, low_open=True)
    check_number(where, "warmup_fraction", warmup_fraction, low=0.0, high=1.0)
    for name, value in more.items():
        check_number(where, name, value, low=0.0, high=1.0 if name == "beta" else None)


def _inner_schedule(learning_rate, schedule: str, warmup_fraction: float, num_steps: int):
    if schedule == "inner_cosine":
        return inner_cosine(learning_rate, num_steps, warmup_fraction)
    if schedule == "constant":
        return learning_rate
    raise ValueError(f"schedule must be 'inner_cosine' or 'constant', got {schedule!r}")


def inner_adamw(learning_rate: float = 1e-2, *, b1: float = 0.9, b2: float = 0.999,
                clip: float | None = 1.0, schedule: str = "inner_cosine",
                warmup_fraction: float = 0.1) -> Callable[[int], optax.GradientTransformation]:
    """Inner AdamW factory (paper: betas (0.9, 0.999), clip 1.0, inner cosine)."""
    _check_inner("inner_adamw", learning_rate, b1, b2, clip, warmup_fraction)
    _inner_schedule(learning_rate, schedule, warmup_fraction, 1)

    def make(num_steps: int):
        lr = _inner_schedule(learning_rate, schedule, warmup_fraction, num_steps)
        parts = [optax.clip_by_global_norm(clip)] if clip else []
        return optax.chain(*parts, optax.adam(lr, b1=b1, b2=b2))

    return make


def inner_muon(learning_rate: float = 1e-2, *, adam_learning_rate: float | None = None,
               beta: float = 0.95, b1: float = 0.9, b2: float = 0.999,
               clip: float | None = 1.0, schedule: str = "inner_cosine",
               warmup_fraction: float = 0.1) -> Callable[[int], optax.GradientTransformation]:
    """Inner Muon factory: Muon on hidden matrices, Adam on the rest (the paper's default)."""
    from gnopt.transforms.muon import muon

    extra = {"beta": beta} | ({} if adam_learning_rate is None else {"adam_learning_rate": adam_learning_rate})
    _check_inner("inner_muon", learning_rate, b1, b2, clip, warmup_fraction, **extra)
    _inner_schedule(learning_rate, schedule, warmup_fraction, 1)

    def make(num_steps: int):
        lr = _inner_schedule(learning_rate, schedule, warmup_fraction, num_steps)
        adam_lr = lr if adam_learning_rate is None else _inner_schedule(
            adam_learning_rate, schedule, warmup_fraction, num_steps)
        parts = [optax.clip_by_global_norm(clip)] if clip else []
        return optax.chain(*parts, muon(lr, beta=beta, adam_learning_rate=adam_lr,
                                        adam_b1=b1, adam_b2=b2))

    return make
