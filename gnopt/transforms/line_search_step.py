"""``scale_by_line_search``: the step length ``α`` by a line search on the true loss.

The second link of the ``gauss_newton`` chain: the incoming updates are a
step ``d``; the output is ``α d`` with ``α`` chosen by an
:class:`gnopt.line_search.AbstractLineSearch` on ``L(θ + α d)`` over the
``line_search_batch`` (a fresh batch; default the step's batch). Abreu et al.
2025 (§3) score the paper's 5 candidates ``2^(−i/2)`` this way.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from gnopt._checks import check_int
from gnopt.line_search import AbstractLineSearch
from gnopt.solvers import split_microbatches
from gnopt.transforms.gn_direction import require_batch


def tree_loss(apply_fn, loss_fn, params, batch, chunk_size: int | None = None):
    """``L(θ) = ℓ(f(θ, x), y)`` on a batch.

    With ``chunk_size``, the mean of the loss over strided chunks of that many
    sequences, one chunk in memory at a time (``lax.map``): the batch mean for
    a per-token mean loss with equal tokens per chunk.
    """
    def loss(chunk):
        inputs, targets = chunk
        return loss_fn(apply_fn(params, inputs), targets)

    if chunk_size is None:
        return loss(batch)
    _, chunks = split_microbatches(batch, chunk_size)
    return jnp.mean(jax.lax.map(loss, chunks))


class LineSearchState(NamedTuple):
    """State of :func:`scale_by_line_search`."""

    diagnostics: dict  # loss_before, step_size (α) and the line search's own scalars


def scale_by_line_search(
    apply_fn: Callable,
    loss_fn: Callable,
    line_search: AbstractLineSearch,
    *,
    loss_chunk_size: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """``d ↦ α d``, ``α`` from ``line_search`` on the true loss.

    ``update(updates, state, params, *, batch, line_search_batch=None)``;
    other keyword arguments are ignored. ``α = 0`` (no candidate lowered the
    loss) gives a zero update, which :func:`accept_step` counts as a rejection.

    Args:
      apply_fn, loss_fn: model and loss (static).
      line_search: e.g. :func:`gnopt.line_search.grid` or ``backtracking()``.
      loss_chunk_size: evaluate the losses over chunks of this many sequences
        (memory of one chunk; static).
    """
    if not isinstance(line_search, AbstractLineSearch):
        raise TypeError("line_search must be a gnopt.line_search.AbstractLineSearch, got "
                        f"{type(line_search).__name__}")
    if loss_chunk_size is not None:
        check_int("scale_by_line_search", "loss_chunk_size", loss_chunk_size, low=1)
    names = ("loss_before", "step_size") + line_search.stat_names

    def loss_of(params, batch):
        return tree_loss(apply_fn, loss_fn, params, batch, loss_chunk_size)

    def init_fn(params):
        del params
        return LineSearchState({name: jnp.zeros((), jnp.float32) for name in names})

    def update_fn(updates, state, params=None, *, batch=None, line_search_batch=None, **extra):
        del extra
        ls_batch = batch if line_search_batch is None else line_search_batch
        require_batch("scale_by_line_search", params, ls_batch)
        loss0 = loss_of(params, ls_batch)
        alpha, stats = line_search.search(
            lambda a: loss_of(otu.tree_add_scale(params, a, updates), ls_batch), loss0,
            lambda: otu.tree_vdot(jax.grad(loss_of)(params, ls_batch), updates))
        diag = {"loss_before": loss0, "step_size": alpha, **stats}
        diag = {k: jnp.asarray(diag[k], jnp.float32) for k in names}
        return otu.tree_scale(alpha, updates), LineSearchState(diag)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
