"""gnopt: Gauss-Newton optimization of language models in JAX.

Submodules imported on demand (they pull in heavier dependencies):
``gnopt.data`` (grain pipelines), ``gnopt.testing`` (hypothesis kit),
``gnopt.train`` and ``gnopt.bench``.
"""

from gnopt import control, curvature, line_search, losses, models, schedules, solvers, transforms
from gnopt.curvature import ggn_mvp
from gnopt.hyperparams import inject_hyperparams
from gnopt.requirements import Requirements, requires
from gnopt.solvers import inner_adamw, inner_muon
from gnopt.transforms import adamw, kfac, lion, muon, shampoo, soap
from gnopt.transforms.acceptance import accept_step
from gnopt.transforms.fusion import FusionState, fuse
from gnopt.transforms.gauss_newton import gauss_newton
from gnopt.transforms.gn_direction import GNDirection, scale_by_gauss_newton
from gnopt.transforms.line_search_step import scale_by_line_search
from gnopt.transforms.pi_muon import PIMuonState, pi_muon

__version__ = "0.1.0"

__all__ = [
    "FusionState", "GNDirection", "PIMuonState", "accept_step", "adamw", "control", "curvature", "fuse", "gauss_newton",
    "Requirements", "ggn_mvp", "inject_hyperparams", "inner_adamw", "inner_muon", "kfac", "line_search", "lion", "losses", "models",
    "muon", "pi_muon", "requires", "scale_by_gauss_newton", "scale_by_line_search", "schedules", "shampoo", "soap", "solvers", "transforms",
]
