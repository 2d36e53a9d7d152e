"""Small optimization problems with known structure, for property tests.

Every problem is an equinox module holding initial ``params`` and one
``batch = (inputs, targets)``, with a static ``apply_fn(params, inputs)`` and
``loss_fn(outputs, targets)`` (the library's calling convention), so the same
problem drives first-order optimizers (``jax.grad(problem.loss)``) and
Gauss-Newton transforms (``apply_fn``, ``loss_fn``, ``batch``). Where the
minimiser is known in closed form, ``solution`` holds it in float64 (numpy),
computed from the float32 data exactly as stored.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from gnopt.losses import mean_squared_error, softmax_cross_entropy

Array = jax.Array


def linear_apply(params, inputs):
    """``z = X w (+ b)``: ``params`` is a vector/matrix ``w`` or a dict ``{"w", "b"}``."""
    if isinstance(params, dict):
        return inputs @ params["w"] + params["b"]
    return inputs @ params


def mlp_apply(params, inputs):
    """``tanh`` MLP: ``params`` is a list of ``{"w", "b"}`` layers, the last one linear."""
    x = inputs
    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    return linear_apply(params[-1], x)


class AbstractProblem(eqx.Module):
    """A loss ``L(θ) = loss_fn(apply_fn(θ, inputs), targets)`` on one batch.

    Attributes:
      params: initial parameters ``θ_0`` (float32 pytree).
      inputs: model inputs of the batch.
      targets: targets of the batch.
      solution: exact minimiser in float64 (same pytree as ``params``), or None.
      apply_fn: ``apply_fn(params, inputs) -> outputs`` (static).
      loss_fn: ``loss_fn(outputs, targets) -> scalar`` (static, from gnopt.losses).
    """

    params: eqx.AbstractVar[Any]
    inputs: eqx.AbstractVar[Array]
    targets: eqx.AbstractVar[Array]
    solution: eqx.AbstractVar[Any | None]
    apply_fn: eqx.AbstractClassVar[Callable]
    loss_fn: eqx.AbstractVar[Callable]

    @property
    def batch(self) -> tuple[Array, Array]:
        """``(inputs, targets)``, as passed to ``tx.update(..., batch=batch)``."""
        return self.inputs, self.targets

    def loss(self, params) -> Array:
        """``L(params)`` on the problem's batch."""
        return self.loss_fn(self.apply_fn(params, self.inputs), self.targets)


def _float32(x) -> Array:
    return jnp.asarray(np.asarray(x, np.float32))


def _lstsq(design: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Float64 least-squares solution of ``design @ w ≈ targets`` on the float32 data."""
    design64, targets64 = (np.asarray(a, np.float32).astype(np.float64) for a in (design, targets))
    return np.linalg.lstsq(design64, targets64, rcond=None)[0]


class Quadratic(AbstractProblem):
    """``L(x) = ½ xᵀAx − bᵀx + c₀`` written as a linear model with MSE.

    ``apply_fn(x, R) = R x``, ``loss = ½ mean((R x − c)²)`` with square ``R``, so
    ``A = RᵀR / d`` (also the Gauss–Newton matrix, exactly), ``b = Rᵀc / d`` and
    ``x* = R⁻¹ c``. :meth:`random` draws ``A``'s eigenvalues log-spaced in
    ``[1/condition, 1]`` (largest curvature ``L = 1``).

    With ``outputs=q`` the parameters are a ``(dim, q)`` matrix ``X`` and the
    targets ``(dim, q)``: ``L(X) = ½ mean((R X − C)²)``, the same quadratic in
    each column (Hessian ``I_q ⊗ A``, eigenvalues still in ``[1/condition, 1]``),
    so matrix preconditioners (Muon, SOAP, Shampoo, K-FAC) see a matrix leaf.
    """

    params: Array
    inputs: Array
    targets: Array
    solution: np.ndarray
    apply_fn: ClassVar[Callable] = staticmethod(linear_apply)
    loss_fn: ClassVar[Callable] = mean_squared_error

    @classmethod
    def random(cls, seed: int, dim: int = 4, condition: float = 10.0,
               outputs: int | None = None) -> Quadratic:
        """A random quadratic in ``dim`` variables (``dim × outputs`` with ``outputs``)."""
        if dim < 1 or not condition >= 1 or (outputs is not None and outputs < 1):
            raise ValueError(f"Quadratic: need dim >= 1, condition >= 1 and outputs >= 1, got "
                             f"{dim}, {condition}, {outputs}")
        rng = np.random.default_rng(seed)
        basis, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
        eigenvalues = np.logspace(0.0, -np.log10(condition), dim)
        design = np.sqrt(dim * (outputs or 1) * eigenvalues)[:, None] * basis.T
        shape = (dim,) if outputs is None else (dim, outputs)
        targets = rng.standard_normal(shape)
        return cls(
            params=_float32(rng.standard_normal(shape)), inputs=_float32(design),
            targets=_float32(targets), solution=_lstsq(design, targets))

    def hessian(self) -> Array:
        """``A = RᵀR / (d q)`` (``q = 1`` for a vector ``x``): the Hessian of each column."""
        outputs = 1 if self.targets.ndim == 1 else self.targets.shape[1]
        return self.inputs.T @ self.inputs / (self.inputs.shape[0] * outputs)


def dense_apply(params, inputs, tap=None):
    """``apply_fn`` of :class:`DenseQuadratic`: its dense layer, tap-aware (for K-FAC)."""
    return params(inputs, tap)


class DenseQuadratic(AbstractProblem):
    """A matrix :class:`Quadratic` whose ``X`` is the weight of a dense layer.

    ``params`` is a :class:`gnopt.models.layers.Linear` named ``"dense"``
    (no bias) and ``apply_fn`` is :func:`dense_apply`, which passes K-FAC's tap
    on (``gnopt.kfac(gnopt.testing.dense_apply, ...)``): optimizers that find
    dense layers in an equinox model see one here. Same loss, Hessian and
    solution as the :class:`Quadratic` it is made from.
    """

    params: Any
    inputs: Array
    targets: Array
    solution: Any
    apply_fn: ClassVar[Callable] = staticmethod(dense_apply)
    loss_fn: ClassVar[Callable] = mean_squared_error

    @classmethod
    def from_quadratic(cls, problem: Quadratic) -> DenseQuadratic:
        """The same problem with ``X`` (``(dim, q)``, ``outputs`` given) in a dense layer."""
        from gnopt.models.layers import Linear

        if problem.params.ndim != 2:
            raise ValueError("DenseQuadratic: needs a matrix Quadratic (Quadratic.random(..., "
                             f"outputs=q)), got params of shape {problem.params.shape}")
        layer = Linear(*problem.params.shape, key=jax.random.key(0), name="dense")
        at = lambda weight: eqx.tree_at(lambda m: m.weight, layer, weight)
        return cls(params=at(problem.params), inputs=problem.inputs, targets=problem.targets,
                   solution=at(problem.solution))

    def hessian(self) -> Array:
        """``A = RᵀR / (d q)``, the Hessian of each column of the weight."""
        return self.inputs.T @ self.inputs / self.targets.size


class LeastSquares(AbstractProblem):
    """Linear regression ``z = X w + b`` with ``½ mean((z − y)²)``; exact ``lstsq`` solution."""

    params: dict
    inputs: Array
    targets: Array
    solution: dict
    apply_fn: ClassVar[Callable] = staticmethod(linear_apply)
    loss_fn: ClassVar[Callable] = mean_squared_error

    @classmethod
    def random(cls, seed: int, num_features: int = 4, num_outputs: int = 1,
               num_examples: int | None = None, noise: float = 0.1) -> LeastSquares:
        """Data ``y = X w_true + b_true + noise``; ``num_examples`` defaults to ``2(d + 1)``."""
        num_examples = num_examples or 2 * (num_features + 1)
        if num_examples < num_features + 1:
            raise ValueError(
                f"LeastSquares: num_examples={num_examples} < num_features + 1 = "
                f"{num_features + 1}: the minimiser would not be unique")
        rng = np.random.default_rng(seed)
        inputs = rng.standard_normal((num_examples, num_features))
        teacher = rng.standard_normal((num_features + 1, num_outputs))
        design = np.concatenate([inputs, np.ones((num_examples, 1))], axis=1)
        targets = design @ teacher + noise * rng.standard_normal((num_examples, num_outputs))
        exact = _lstsq(design, targets)
        return cls(
            params={"w": _float32(rng.standard_normal((num_features, num_outputs))),
                    "b": _float32(np.zeros(num_outputs))},
            inputs=_float32(inputs), targets=_float32(targets),
            solution={"w": exact[:-1], "b": exact[-1]})


class Logistic(AbstractProblem):
    """Multinomial logistic regression ``z = X w + b`` with softmax cross-entropy.

    Convex but with no closed-form minimiser (``solution`` is None).
    """

    params: dict
    inputs: Array
    targets: Array
    solution: None
    apply_fn: ClassVar[Callable] = staticmethod(linear_apply)
    loss_fn: ClassVar[Callable] = softmax_cross_entropy

    @classmethod
    def random(cls, seed: int, num_features: int = 4, num_classes: int = 3,
               num_examples: int = 16) -> Logistic:
        """Labels sampled from a random linear teacher's softmax (not separable in general)."""
        rng = np.random.default_rng(seed)
        inputs = rng.standard_normal((num_examples, num_features))
        logits = inputs @ rng.standard_normal((num_features, num_classes))
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        labels = (probs.cumsum(axis=1) > rng.random((num_examples, 1))).argmax(axis=1)
        return cls(
            params={"w": _float32(0.1 * rng.standard_normal((num_features, num_classes))),
                    "b": _float32(np.zeros(num_classes))},
            inputs=_float32(inputs), targets=jnp.asarray(labels, jnp.int32), solution=None)


class SmallMLP(AbstractProblem):
    """A ``tanh`` MLP on random data: regression (MSE) or classification (CE).

    Non-convex; ``solution`` is None. Targets come from a random teacher MLP of the
    same architecture (argmax of its outputs for classification).
    """

    params: list
    inputs: Array
    targets: Array
    solution: None
    loss_fn: Callable = eqx.field(static=True)
    apply_fn: ClassVar[Callable] = staticmethod(mlp_apply)

    @classmethod
    def random(cls, seed: int, num_features: int = 4, hidden: tuple[int, ...] = (8,),
               num_outputs: int = 3, num_examples: int = 16, loss: str = "mse") -> SmallMLP:
        """``loss`` is ``"mse"`` (regression) or ``"ce"`` (classification)."""
        losses = {"mse": mean_squared_error, "ce": softmax_cross_entropy}
        if loss not in losses:
            raise ValueError(f"SmallMLP: loss must be one of {sorted(losses)}, got {loss!r}")
        rng = np.random.default_rng(seed)
        sizes = (num_features, *hidden, num_outputs)

        def layers():
            return [{"w": _float32(rng.standard_normal((m, n)) / np.sqrt(m)),
                     "b": _float32(np.zeros(n))} for m, n in zip(sizes[:-1], sizes[1:])]

        inputs = _float32(rng.standard_normal((num_examples, num_features)))
        outputs = mlp_apply(layers(), inputs)
        targets = outputs if loss == "mse" else jnp.argmax(outputs, axis=-1).astype(jnp.int32)
        return cls(params=layers(), inputs=inputs, targets=targets, solution=None,
                   loss_fn=losses[loss])
