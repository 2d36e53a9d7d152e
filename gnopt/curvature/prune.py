"""Restrictions of a linear map to one input block, with symbolic zeros.

``jax.linearize`` gives the tangent map ``v ↦ J v`` of the whole model. Its
restriction to one block, ``v_k ↦ J_k v_k``, evaluated with concrete zeros for
the other blocks, spends a full tangent pass per block: multiplications by
zero tangents of the layers before the block are not removed by XLA.

:func:`restrict_linear` evaluates the linear map's jaxpr once more with the
other blocks' inputs as *symbolic* zeros: an equation whose linear inputs are
all zero is dropped (its outputs are zero), so the restricted map computes
only the layers from block ``k`` on, and its transpose (``jax.vjp`` of it) only
goes down to block ``k``. The primal pass (the residuals) stays shared.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

_ADDS = ("add", "add_any")
_CALLS = ("pjit", "closed_call", "core_call", "jit")


def _zeros(var):
    return jnp.zeros(var.aval.shape, var.aval.dtype)


def _like(x, var):
    """``x`` as ``var``'s type (an ``add`` may broadcast its operands)."""
    aval = var.aval
    if x.shape != aval.shape:
        x = jnp.broadcast_to(x, aval.shape)
    return x if x.dtype == aval.dtype else x.astype(aval.dtype)


def _eval(jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list:
    """Evaluates ``jaxpr`` where ``None`` in ``args`` is a symbolic zero of a linear input.

    Returns the outputs, ``None`` for outputs that are identically zero.
    """
    env: dict = {}
    linear: set = set()

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env.get(v)

    for v, c in zip(jaxpr.constvars, consts):
        env[v] = c
    for v, a in zip(jaxpr.invars, args):
        env[v] = a
        linear.add(v)
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        lin = [not isinstance(v, jcore.Literal) and v in linear for v in eqn.invars]
        if any(lin):
            linear.update(eqn.outvars)
            if all(x is None for x, l in zip(ins, lin) if l):
                outs = [None] * len(eqn.outvars)
                for v, o in zip(eqn.outvars, outs):
                    env[v] = o
                continue
            name = eqn.primitive.name
            if (name in _ADDS or name == "sub" and ins[1] is None) and any(x is None for x in ins):
                env[eqn.outvars[0]] = _like(next(x for x in ins if x is not None), eqn.outvars[0])
                continue
            if name in _CALLS and "jaxpr" in eqn.params:
                closed = eqn.params["jaxpr"]
                outs = _eval(closed.jaxpr, closed.consts, ins)
                for v, o in zip(eqn.outvars, outs):
                    env[v] = o
                continue
            ins = [_zeros(v) if x is None else x for v, x in zip(eqn.invars, ins)]
        with eqn.ctx.manager:
            out = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(eqn.params))
        outs = out if eqn.primitive.multiple_results else [out]
        for v, o in zip(eqn.outvars, outs):
            env[v] = o
    return [read(v) for v in jaxpr.outvars]


def linear_jaxpr(linear_fn: Callable, example):
    """The closed jaxpr of ``linear_fn`` at inputs shaped like ``example`` (a pytree)."""
    closed, out_shape = jax.make_jaxpr(linear_fn, return_shape=True)(example)
    return closed, jax.tree.structure(out_shape)


def restrict_linear(closed, out_tree, keep: Sequence[bool]) -> Callable:
    """``x ↦ L(x embedded at the leaves where keep, symbolic zero elsewhere)``.

    Args:
      closed, out_tree: :func:`linear_jaxpr` of the linear map ``L``.
      keep: one flag per input leaf.

    Returns:
      A function of the list of kept leaves, returning ``L``'s output pytree.
    """
    def fn(kept: list):
        it = iter(kept)
        args = [next(it) if k else None for k in keep]
        outs = _eval(closed.jaxpr, closed.consts, args)
        outs = [_zeros(v) if o is None else o for v, o in zip(closed.jaxpr.outvars, outs)]
        return jax.tree.unflatten(out_tree, outs)

    return fn
