"""``accept_step``: keep or reject the step of any inner transform, optionally under a controller.

The last link of ``gauss_newton`` (and usable around any transform). A step
``Δ`` from ``inner`` is kept when it is finite and non-zero and, with a
controller (Levenberg–Marquardt, :mod:`gnopt.control`), when the controller
accepts it from the trust ratio

    ρ = (L(θ) − L(θ + Δ)) / (q(0) − q(Δ))

on the step's batch (:func:`gnopt.curvature.trust_ratio`: one linearisation,
one tangent pass, one forward at ``θ + Δ``). A rejected step is not applied:
the update is zero (Moré 1978; Nielsen 1999).

Two things flow back into ``inner`` as keyword arguments of its next
``update``: ``accepted`` (the verdict on the previous step; the GN direction
then restarts its solve from zero) and the controller's output under the
keyword ``output_name`` (default ``damping``: the next step's ``δ``).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from gnopt.control import AbstractController, decide
from gnopt.curvature import trust_ratio


class AcceptStepState(NamedTuple):
    """State of :func:`accept_step`."""

    inner: Any  # the inner transform's state
    controller: Any  # the controller's state (None without one)
    accepted: jax.Array  # the verdict on the last step (bool)
    diagnostics: dict  # accepted, update_norm (+ the controller's output and ρ)


def accept_step(
    inner: optax.GradientTransformation,
    apply_fn: Callable | None = None,
    loss_fn: Callable | None = None,
    *,
    controller: AbstractController | None = None,
    output_name: str = "damping",
) -> optax.GradientTransformationExtraArgs:
    """Runs ``inner`` and keeps its step only if it is finite, non-zero and (with a
    ``controller``) accepted from its trust ratio.

    Args:
      inner: any transform; it receives ``accepted=`` and, with a controller,
        ``{output_name}=`` as extra keyword arguments.
      apply_fn, loss_fn: model and loss, for the trust ratio (needed with a
        controller only; static).
      controller: an :class:`gnopt.control.AbstractController` driven by ``ρ``,
        e.g. :func:`gnopt.control.nielsen_damping`. With ``controller.rejects``
        a step that raised the loss is rejected even where the model predicted
        the rise.
      output_name: the keyword under which ``inner`` receives the controller's
        output.
    """
    inner = optax.with_extra_args_support(inner)
    if controller is not None:
        if not isinstance(controller, AbstractController):
            raise TypeError("controller must be a gnopt.control.AbstractController, got "
                            f"{type(controller).__name__}")
        if apply_fn is None or loss_fn is None:
            raise ValueError("accept_step: a controller needs apply_fn and loss_fn (for ρ)")
    names = ("accepted", "update_norm") + ((output_name, "rho") if controller is not None else ())

    def init_fn(params):
        return AcceptStepState(inner.init(params), None if controller is None else controller.init(),
                               jnp.ones((), bool), {k: jnp.zeros((), jnp.float32) for k in names})

    def update_fn(updates, state, params=None, **extra):
        feedback = {"accepted": state.accepted}
        if controller is not None:
            output = state.controller.output
            feedback[output_name] = output
        step, inner_state = inner.update(updates, state.inner, params, **(extra | feedback))
        norm = otu.tree_norm(step)
        accept = jnp.isfinite(norm) & (norm > 0)
        controller_state, diag = state.controller, {}
        if controller is not None:
            measured = trust_ratio(apply_fn, loss_fn, params, extra.get("batch"), step)
            accept = accept & jnp.isfinite(output)
            if controller.rejects:
                accept = accept & (measured.actual >= 0)
            (controller_state,), accept = decide((controller,), (state.controller,), measured.rho,
                                                 accept)
            diag = {output_name: output, "rho": measured.rho}
        kept = jax.tree.map(lambda x: jnp.where(accept, x, jnp.zeros_like(x)), step)
        kept = otu.tree_cast_like(kept, params) if params is not None else kept
        diag |= {"accepted": accept, "update_norm": otu.tree_norm(kept)}
        diag = {k: jnp.asarray(diag[k], jnp.float32) for k in names}
        return kept, AcceptStepState(inner_state, controller_state, accept, diag)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
