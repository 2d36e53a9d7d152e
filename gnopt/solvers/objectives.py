"""What an inner solver minimises on one micro-batch's GN model.

An objective maps ``(model, Δ)`` to per-block model values and the model's
gradient at ``Δ`` (without the proximal term ``δΔ``, which the solver adds).
"""

from __future__ import annotations

import abc

import equinox as eqx

from gnopt.curvature import AbstractOperator


class AbstractObjective(eqx.Module):
    """A model of the loss around the anchor, minimised by inner solvers."""

    @abc.abstractmethod
    def terms(self, model: AbstractOperator, delta):
        """``(values [num_blocks], ∇ of the model at Δ)``."""


class Quadratic(AbstractObjective):
    """The GN quadratic ``q(Δ) = ℓ + gᵀΔ + ½ ΔᵀCΔ``: gradient ``g + CΔ``."""

    def terms(self, model, delta):
        return model.quadratic_terms(delta)


class ProxLinear(AbstractObjective):
    """GN-prox-linear: the true loss on the linearised outputs, ``ℓ(z0 + JΔ)``.

    Needs an operator with outputs (the GGN, or its block diagonal).
    """

    def terms(self, model, delta):
        if not hasattr(model, "prox_linear_terms"):
            raise TypeError(f"prox-linear needs the linearised model's outputs; "
                            f"{type(model).__name__} has none")
        return model.prox_linear_terms(delta)


OBJECTIVES = {"quadratic": Quadratic, "prox_linear": ProxLinear}
