"""Solvers of the GN model: CG, inner optimizer, GN-prox-linear."""

from gnopt.solvers.base import AbstractSolver, working_precision
from gnopt.solvers.cg import ConjugateGradient, cg
from gnopt.solvers.inner import (
    InnerOptimizer,
    inner_adamw,
    inner_muon,
    inner_optimizer,
    prox_linear,
    split_microbatches,
)
from gnopt.solvers.objectives import AbstractObjective, ProxLinear, Quadratic

__all__ = [
    "AbstractObjective", "AbstractSolver", "ProxLinear", "Quadratic", "ConjugateGradient", "InnerOptimizer", "cg", "inner_adamw",
    "inner_muon", "inner_optimizer", "prox_linear", "split_microbatches", "working_precision",
]
