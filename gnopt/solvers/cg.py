"""Conjugate gradient on the damped GN system, blockwise (Martens 2010, §4).

Solves ``(G_kk + δI) s_k = −g_k`` for every block ``k`` at once: the
recurrences run per block with their own step sizes, sharing one block-diagonal
GGN product per iteration, so layerwise GN is exactly independent CG per layer
and the full GGN is the one-block case.
"""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from gnopt._checks import check_int, check_number
from gnopt.curvature import blocks as _blocks
from gnopt.solvers.base import AbstractSolver, working_precision


class ConjugateGradient(AbstractSolver):
    """Hessian-free CG with warm start and Martens' relative-progress stop.

    Stops a block at iteration ``i`` when, with ``k = max(min_window, ⌈i/10⌉)``,
    ``q_i < 0`` and ``(q_i − q_{i−k}) / q_i < k · tol`` (Martens 2010, §4.4), or
    when its residual vanishes. A warm start whose model value is positive is
    dropped for that block (Martens 2010, §4.5).

    Attributes:
      max_iters: iteration cap.
      tol: Martens' ``ε`` (relative progress per iteration).
      min_window: Martens' minimum ``k`` (10).
      residual_tol: stop when ``‖r_k‖ ≤ residual_tol · ‖g_k‖``.
    """

    stat_names: ClassVar[tuple[str, ...]] = ("cg_iterations", "model_value")

    max_iters: int = eqx.field(static=True, default=50)
    tol: float = eqx.field(static=True, default=1e-4)
    min_window: int = eqx.field(static=True, default=10)
    residual_tol: float = eqx.field(static=True, default=1e-7)

    def minimise(self, operator, gradient, delta0, damping):
        ids, nb = operator.block_ids, operator.num_blocks
        g = working_precision(gradient)
        vdot = operator.block_vdot

        def matvec(v):
            return otu.tree_add_scale(working_precision(operator.mv(v)), damping, v)

        def model_value(x, r):  # q_k(x) = ½ x_kᵀ(g_k − r_k) since A x = −g − r
            return 0.5 * vdot(x, otu.tree_sub(g, r))

        x = working_precision(otu.tree_cast_like(delta0, g))
        r = otu.tree_sub(otu.tree_scale(-1.0, g), matvec(x))
        keep = model_value(x, r) <= 0.0  # False for NaN too
        x = _blocks.block_scale(keep.astype(jnp.float32), x, ids)
        r = jax.tree.map(lambda rk, gk, k: jnp.where(keep[k], rk, -gk), r, g,
                         jax.tree.unflatten(jax.tree.structure(g), ids))
        rr = vdot(r, r)
        gnorm2 = vdot(g, g)
        q0 = model_value(x, r)
        history = jnp.broadcast_to(q0, (self.max_iters + 1, nb))
        done0 = rr <= (self.residual_tol ** 2) * gnorm2

        def cond(carry):
            i, *_, done, _ = carry
            return (i < self.max_iters) & ~jnp.all(done)

        def body(carry):
            i, x, r, p, rr, done, hist = carry
            ap = matvec(p)
            pap = vdot(p, ap)
            bad = ~(pap > 0)
            alpha = jnp.where(done | bad, 0.0, rr / jnp.where(bad, 1.0, pap))
            x = otu.tree_add(x, _blocks.block_scale(alpha, p, ids))
            r = otu.tree_sub(r, _blocks.block_scale(alpha, ap, ids))
            rr_new = vdot(r, r)
            beta = jnp.where(done | bad, 0.0, rr_new / jnp.where(rr > 0, rr, 1.0))
            p = otu.tree_add(r, _blocks.block_scale(beta, p, ids))
            q = model_value(x, r)
            hist = hist.at[i + 1].set(q)
            window = jnp.maximum(self.min_window, jnp.ceil(0.1 * (i + 1))).astype(jnp.int32)
            q_back = hist[jnp.maximum(i + 1 - window, 0)]
            stalled = (i + 1 > window) & (q < 0) & ((q - q_back) / jnp.where(q < 0, q, -1.0) < window * self.tol)
            converged = rr_new <= (self.residual_tol ** 2) * gnorm2
            done = done | bad | stalled | converged
            return i + 1, x, r, p, rr_new, done, hist

        carry = (jnp.asarray(0), x, r, r, rr, done0, history)
        iters, x, r, _, _, _, hist = jax.lax.while_loop(cond, body, carry)
        steps = jnp.arange(self.max_iters + 1)[:, None]
        hist = jnp.where(steps > iters, hist[iters], hist)
        return x, {
            "cg_iterations": iters,
            "model_value": jnp.sum(hist[iters]),
            "model_history": jnp.sum(hist, axis=1),
        }


def cg(max_iters: int = 50, tol: float = 1e-4, min_window: int = 10,
       residual_tol: float = 1e-7) -> ConjugateGradient:
    """Hessian-free conjugate gradient (see :class:`ConjugateGradient`)."""
    check_int("cg", "max_iters", max_iters, low=1)
    check_number("cg", "tol", tol, low=0.0, low_open=True)
    check_int("cg", "min_window", min_window, low=1)
    check_number("cg", "residual_tol", residual_tol, low=0.0)
    return ConjugateGradient(max_iters, tol, min_window, residual_tol)
