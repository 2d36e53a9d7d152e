"""Muon: momentum orthogonalised by Newton–Schulz (Jordan et al. 2024).

Per hidden weight matrix ``W`` (our layout: ``(in, out)``, ``y = x @ W``):

1. momentum ``m ← β m + (1 − β) g``; Nesterov mix ``v = β m + (1 − β) g``
   (plain: ``v = m``); no bias correction, as in the reference code;
2. ``O = NS₅(v)``: the quintic Newton–Schulz iteration
   ``X ← a X + (b A + c A²) X``, ``A = X Xᵀ``, ``(a, b, c) = (3.4445, −4.7750,
   2.0315)``, started from ``v / ‖v‖_F``; it maps every singular value of ``v``
   into roughly ``[0.7, 1.2]`` and keeps the singular vectors, so
   ``O ≈ U Vᵀ`` for ``v = U Σ Vᵀ``;
3. direction ``O · √max(1, fan_out / fan_in)`` — the reference's
   ``√max(1, rows/cols)`` for PyTorch's ``(out, in)`` weights, written for our
   ``(in, out)`` layout.

:func:`muon` runs this on hidden matrices and AdamW on everything else
(embedding, LM head, vectors).

Reusing Muon's direction (PI-Muon, GN inner solvers): the whole step
``u = −η · direction`` (AdamW on non-matrix leaves included) is simply the update
of :func:`muon`; wrap that transform and add to its output, and ``λ ≡ 0``
reproduces Muon bit for bit. The per-leaf pieces are public too:
:func:`muon_momentum` (step 1, on trees) and :func:`muon_direction` (steps 2–3,
one matrix); :func:`scale_by_muon` is exactly these two composed, and
:func:`hidden_matrix_labels` is the label rule of :func:`muon`.

References:
  Jordan et al., *Muon: an optimizer for hidden layers in neural networks*,
  2024, https://kellerjordan.github.io/posts/muon/.
  Bernstein & Newhouse, *Old optimizer, new norm: an anthology*, 2024,
  arXiv:2409.20325.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gnopt._checks import check_int, check_learning_rate, check_number

Array = jax.Array
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(G: Array, steps: int = 5, coeffs: tuple[float, float, float] = NS_COEFFS,
                  eps: float = 1e-7, compute_dtype: str = "float32") -> Array:
    """Approximate orthogonalisation ``U Vᵀ`` of a matrix ``G = U Σ Vᵀ``.

    Quintic Newton–Schulz iteration (Jordan et al. 2024): ``X₀ = G/(‖G‖_F + eps)``,
    ``X ← a X + (b A + c A²) X`` with ``A = X Xᵀ``. Tall matrices are transposed
    so that ``A`` is the smaller Gram matrix (``NS(Gᵀ) = NS(G)ᵀ``).

    Args:
      G: a 2-D array of any shape.
      steps: number of iterations.
      coeffs: ``(a, b, c)``.
      eps: added to the Frobenius norm (zero input gives zero output).
      compute_dtype: dtype of the iteration, ``"float32"`` or ``"bfloat16"``.

    Returns:
      An array of ``G``'s shape and dtype.
    """
    if G.ndim != 2:
        raise ValueError(f"newton_schulz needs a 2-D matrix, got shape {G.shape}")
    if compute_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"newton_schulz: compute_dtype must be 'float32' or 'bfloat16', "
                         f"got {compute_dtype!r}")
    a, b, c = coeffs

    def iteration(_, X):
        A = X @ X.T
        return a * X + (b * A + c * (A @ A)) @ X

    transpose = G.shape[0] > G.shape[1]
    X = (G.T if transpose else G).astype(compute_dtype)
    X = jax.lax.fori_loop(0, steps, iteration, X / (jnp.linalg.norm(X) + eps))
    return (X.T if transpose else X).astype(G.dtype)


def muon_momentum(grads, momentum, beta: float = 0.95, nesterov: bool = True):
    """Muon's momentum step on trees: returns ``(new_momentum, mixed)``.

    ``m ← β m + (1 − β) g``; ``mixed = β m + (1 − β) g`` (Nesterov) or ``m``.
    """
    new_m = jax.tree.map(lambda m, g: beta * m + (1 - beta) * g, momentum, grads)
    if not nesterov:
        return new_m, new_m
    return new_m, jax.tree.map(lambda m, g: beta * m + (1 - beta) * g, new_m, grads)


def muon_direction(mixed: Array, ns_steps: int = 5,
                   coeffs: tuple[float, float, float] = NS_COEFFS, eps: float = 1e-7,
                   compute_dtype: str = "float32") -> Array:
    """``NS(mixed) · √max(1, fan_out/fan_in)`` for one ``(in, out)`` matrix."""
    fan_in, fan_out = mixed.shape
    scale = max(1.0, fan_out / fan_in) ** 0.5
    return newton_schulz(mixed, ns_steps, coeffs, eps, compute_dtype) * scale


class ScaleByMuonState(NamedTuple):
    """State of :func:`scale_by_muon`."""

    momentum: Any  # EMA of gradients, one array per matrix leaf


def scale_by_muon(beta: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                  eps: float = 1e-7, coeffs: tuple[float, float, float] = NS_COEFFS,
                  compute_dtype: str = "float32") -> optax.GradientTransformationExtraArgs:
    """Muon's direction for 2-D leaves: momentum, Newton–Schulz, shape scale.

    Every leaf must be a matrix (use :func:`muon` for mixed trees). Extra
    keyword arguments of ``update`` are ignored.
    """

    def init_fn(params):
        for path, leaf in jax.tree_util.tree_leaves_with_path(params):
            if jnp.ndim(leaf) != 2:
                raise ValueError(
                    f"scale_by_muon: leaf {jax.tree_util.keystr(path)} has shape "
                    f"{jnp.shape(leaf)}, Muon needs 2-D matrices (use muon(...) for mixed trees)")
        return ScaleByMuonState(momentum=jax.tree.map(jnp.zeros_like, params))

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        momentum, mixed = muon_momentum(updates, state.momentum, beta, nesterov)
        direction = jax.tree.map(
            lambda v: muon_direction(v, ns_steps, coeffs, eps, compute_dtype), mixed)
        return direction, ScaleByMuonState(momentum=momentum)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _path_names(path) -> list[str]:
    names = []
    for entry in path:
        for attr in ("name", "key", "idx"):
            if hasattr(entry, attr):
                names.append(str(getattr(entry, attr)))
                break
    return names


def default_is_hidden_matrix(path, leaf) -> bool:
    """A 2-D leaf whose path has no entry containing ``embed`` or ``head``."""
    return jnp.ndim(leaf) == 2 and not any(
        "embed" in n.lower() or "head" in n.lower() for n in _path_names(path))


def hidden_matrix_labels(params, is_hidden_matrix: Callable | None = None):
    """Labels ``'muon'`` (hidden matrices) or ``'adam'`` (everything else)."""
    is_hidden_matrix = is_hidden_matrix or default_is_hidden_matrix
    return jax.tree_util.tree_map_with_path(
        lambda p, x: "muon" if is_hidden_matrix(p, x) else "adam", params)


def muon(learning_rate: optax.ScalarOrSchedule, *, beta: float = 0.95,
         nesterov: bool = True, ns_steps: int = 5, weight_decay: float = 0.0,
         adam_learning_rate: optax.ScalarOrSchedule | None = None, adam_b1: float = 0.9,
         adam_b2: float = 0.95, adam_eps: float = 1e-8, adam_weight_decay: float = 0.0,
         compute_dtype: str = "float32",
         is_hidden_matrix: Callable | None = None) -> optax.GradientTransformationExtraArgs:
    """Muon on hidden matrices, AdamW on the rest.

    Hidden matrices: ``−η (direction + λ W)`` (:func:`scale_by_muon`, decoupled
    weight decay ``λ = weight_decay`` scaled by ``η``, as in the reference code).
    Other leaves: ``optax.adamw(adam_learning_rate or η, adam_b1, adam_b2,
    adam_eps, adam_weight_decay)``.

    Args:
      learning_rate: ``η`` for Muon, float or schedule.
      beta, nesterov, ns_steps, compute_dtype: see :func:`scale_by_muon`.
      weight_decay: decoupled weight decay of the Muon leaves.
      adam_learning_rate: AdamW's learning rate (default: ``learning_rate``).
      adam_b1, adam_b2, adam_eps, adam_weight_decay: AdamW's hyper-parameters.
      is_hidden_matrix: ``(path, leaf) -> bool`` choosing the Muon leaves
        (default :func:`default_is_hidden_matrix`; ``None`` keeps it usable
        under ``optax.inject_hyperparams``, which takes callables for schedules;
        :func:`gnopt.hyperparams.inject_hyperparams` keeps it static).
    """
    check_learning_rate("muon", "learning_rate", learning_rate)
    if adam_learning_rate is not None:
        check_learning_rate("muon", "adam_learning_rate", adam_learning_rate)
    for name, value in (("beta", beta), ("adam_b1", adam_b1), ("adam_b2", adam_b2)):
        check_number("muon", name, value, low=0.0, high=1.0)
    check_number("muon", "adam_eps", adam_eps, low=0.0)
    check_number("muon", "weight_decay", weight_decay, low=0.0)
    check_number("muon", "adam_weight_decay", adam_weight_decay, low=0.0)
    check_int("muon", "ns_steps", ns_steps, low=1)
    adam_lr = learning_rate if adam_learning_rate is None else adam_learning_rate
    return optax.partition(
        {"muon": optax.chain(scale_by_muon(beta, nesterov, ns_steps, compute_dtype=compute_dtype),
                             optax.add_decayed_weights(weight_decay),
                             optax.scale_by_learning_rate(learning_rate)),
         "adam": optax.adamw(adam_lr, b1=adam_b1, b2=adam_b2, eps=adam_eps,
                             weight_decay=adam_weight_decay)},
        lambda params: hidden_matrix_labels(params, is_hidden_matrix))


# Arguments that are not hyperparameters (read by gnopt.hyperparams.inject_hyperparams).
muon.static_args = ("ns_steps", "is_hidden_matrix")
