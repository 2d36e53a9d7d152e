"""Line searches on the true loss along a GN direction (Abreu et al. 2025, §4).

A search picks ``α`` for ``θ0 + α Δ`` given ``loss_at(α)``, the true loss on
(ideally fresh) data. Neither search returns a point worse than ``α = 0``
unless ``allow_increase=True``: the step is then skipped (``α = 0``).

Step sizes and constants (``scale``, ``init``, ``shrink``, ``c``) are ordinary
fields (pytree leaves): changing them never recompiles and they may be traced
(``jax.vmap``); counts (``num``, ``max_evals``) and flags are static.
"""

from __future__ import annotations

import abc
from typing import Callable, ClassVar

import equinox as eqx

from gnopt._checks import check_int, check_number, is_traced
import jax
import jax.numpy as jnp


class AbstractLineSearch(eqx.Module):
    """Chooses a step size along a direction."""

    stat_names: ClassVar[tuple[str, ...]] = ("line_search_loss", "line_search_evals")

    @abc.abstractmethod
    def search(self, loss_at: Callable[[jax.Array], jax.Array], loss0,
               slope: Callable[[], jax.Array]) -> tuple[jax.Array, dict]:
        """Returns ``(α, stats)``.

        Args:
          loss_at: ``α ↦`` true loss at ``θ0 + α Δ``.
          loss0: ``loss_at(0)``.
          slope: ``() ↦`` directional derivative ``gᵀΔ`` at ``α = 0``; called
            only by searches that need it (it costs a gradient).
        """


class GridLineSearch(AbstractLineSearch):
    """Best of ``α ∈ {scale · 2^(−i/2) : i = 0..num−1}`` (the paper: num 5, 10 for layerwise).

    All candidates are evaluated (``lax.map``: one loss evaluation each), or,
    with ``stop_at_rise``, from the largest down until the loss first rises
    (``lax.while_loop``). For a loss that is unimodal in ``α`` both pick the same
    candidate: past the rise the loss only grows towards ``α = 0``. The early
    stop costs ``min(k + 2, num)`` evaluations for a best candidate ``k``
    instead of ``num``; where noise breaks unimodality it may keep an earlier
    candidate than the full grid would.
    """

    num: int = eqx.field(static=True, default=5)
    scale: float = 1.0  # data: a new scale does not retrace
    allow_increase: bool = eqx.field(static=True, default=False)
    stop_at_rise: bool = eqx.field(static=True, default=False)

    def candidates(self) -> jax.Array:
        return self.scale * 2.0 ** (-jnp.arange(self.num) / 2.0)

    def _losses_until_rise(self, loss_at, alphas) -> tuple[jax.Array, jax.Array]:
        """Losses (``inf`` where not evaluated) and the number evaluated."""
        def cond(carry):
            i, losses = carry
            rose = (i >= 2) & (losses[i - 1] > losses[jnp.maximum(i - 2, 0)])
            return (i < self.num) & ~rose

        def body(carry):
            i, losses = carry
            loss = loss_at(alphas[i])
            return i + 1, losses.at[i].set(jnp.where(jnp.isfinite(loss), loss, jnp.inf))

        losses = jnp.full(self.num, jnp.inf, dtype=jnp.result_type(alphas))
        evals, losses = jax.lax.while_loop(cond, body, (jnp.asarray(0), losses))
        return losses, evals

    def search(self, loss_at, loss0, slope):
        alphas = self.candidates()
        if self.stop_at_rise:
            losses, evals = self._losses_until_rise(loss_at, alphas)
        else:
            losses, evals = jax.lax.map(loss_at, alphas), jnp.asarray(self.num)
            losses = jnp.where(jnp.isfinite(losses), losses, jnp.inf)
        best = jnp.argmin(losses)
        alpha, loss = alphas[best], losses[best]
        accept = (loss < loss0) | self.allow_increase & jnp.isfinite(loss)
        return jnp.where(accept, alpha, 0.0), {
            "line_search_loss": jnp.where(accept, loss, loss0),
            "line_search_evals": evals,
        }


class BacktrackingLineSearch(AbstractLineSearch):
    """Armijo backtracking: shrink ``α`` until ``L(α) ≤ L(0) + c α gᵀΔ``."""

    init: float = 1.0  # init, shrink and c are data: new values do not retrace
    shrink: float = 0.5
    c: float = 1e-4
    max_evals: int = eqx.field(static=True, default=10)
    allow_increase: bool = eqx.field(static=True, default=False)

    def __check_init__(self):
        if not is_traced(self.shrink) and not 0.0 < self.shrink < 1.0:
            raise ValueError(f"backtracking shrink must be in (0, 1), got {self.shrink}")

    def search(self, loss_at, loss0, slope):
        slope = slope()

        def armijo(alpha, loss):
            return jnp.isfinite(loss) & (loss <= loss0 + self.c * alpha * jnp.minimum(slope, 0.0))

        def cond(carry):
            i, alpha, loss = carry
            return (i < self.max_evals) & ~armijo(alpha, loss)

        def body(carry):
            i, alpha, _ = carry
            alpha = alpha * self.shrink
            return i + 1, alpha, loss_at(alpha)

        alpha0 = jnp.asarray(self.init, jnp.result_type(float))
        evals, alpha, loss = jax.lax.while_loop(cond, body, (jnp.asarray(1), alpha0, loss_at(alpha0)))
        accept = armijo(alpha, loss) & ((loss < loss0) | self.allow_increase)
        return jnp.where(accept, alpha, 0.0), {
            "line_search_loss": jnp.where(accept, loss, loss0),
            "line_search_evals": evals,
        }


def grid(num: int = 5, scale: float = 1.0, allow_increase: bool = False,
         stop_at_rise: bool = False) -> GridLineSearch:
    """The paper's grid ``{2^(−i/2)}``, ``i < num`` (``stop_at_rise``: see :class:`GridLineSearch`)."""
    check_int("line_search.grid", "num", num, low=1)
    check_number("line_search.grid", "scale", scale, low=0.0, low_open=True)
    return GridLineSearch(num, scale, allow_increase, stop_at_rise)


def backtracking(init: float = 1.0, shrink: float = 0.5, c: float = 1e-4, max_evals: int = 10,
                 allow_increase: bool = False) -> BacktrackingLineSearch:
    """Armijo backtracking from ``init``."""
    where = "line_search.backtracking"
    check_number(where, "init", init, low=0.0, low_open=True)
    check_number(where, "shrink", shrink, low=0.0, low_open=True, high=1.0)
    check_number(where, "c", c, low=0.0, high=1.0)
    check_int(where, "max_evals", max_evals, low=1)
    return BacktrackingLineSearch(init, shrink, c, max_evals, allow_increase)
