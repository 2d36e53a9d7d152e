"""gnopt: Gauss-Newton optimization of language models in JAX.

Submodules imported on demand (they pull in heavier dependencies):
``gnopt.data`` (grain pipelines), ``gnopt.testing`` (hypothesis kit),
``gnopt.train`` and ``gnopt.bench``.
"""

from gnopt import control, curvature, line_search, losses, models, schedules, solvers, transforms
from gnopt.curvature import ggn_mvp
from gnopt.hyperparams import inject_hyperparams
from gnopt.solvers import inner_adamw, inner_muon
from gnopt.transforms import adamw, kfac, lion, muon, shampoo, soap
from gnopt.transforms.gauss_newton import GaussNewtonState, gauss_newton
from gnopt.transforms.pi_muon import PIMuonState, pi_muon

__version__ = "0.1.0"

__all__ = [
    "GaussNewtonState", "PIMuonState", "adamw", "control", "curvature", "gauss_newton",
    "ggn_mvp", "inject_hyperparams", "inner_adamw", "inner_muon", "kfac", "line_search", "lion", "losses", "models",
    "muon", "pi_muon", "schedules", "shampoo", "soap", "solvers", "transforms",
]
