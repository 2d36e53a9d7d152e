"""gnopt: Gauss-Newton optimization of language models in JAX."""

from gnopt import curvature, line_search, losses, schedules, solvers
from gnopt.curvature import ggn_mvp
from gnopt.solvers import inner_adamw, inner_muon
from gnopt.transforms.gauss_newton import GaussNewtonState, gauss_newton

__version__ = "0.1.0"

__all__ = [
    "GaussNewtonState", "curvature", "gauss_newton", "ggn_mvp", "inner_adamw",
    "inner_muon", "line_search", "losses", "schedules", "solvers",
]
