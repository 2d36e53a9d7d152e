"""Optimizers as optax transforms: the Gauss-Newton family and its baselines.

Every transform is an ``optax.GradientTransformationExtraArgs`` whose ``update``
ignores keyword arguments it does not use (``batch=...`` reaches those that
need it, e.g. :func:`kfac`).
"""

from gnopt.transforms.baselines import adamw, constant, lion, ramp, warmup_cosine
from gnopt.transforms.kfac import kfac, scale_by_kfac, tapped_call
from gnopt.transforms.muon import (hidden_matrix_labels, muon, muon_direction, muon_momentum,
                                   newton_schulz, scale_by_muon)
from gnopt.transforms.shampoo import scale_by_shampoo, shampoo
from gnopt.transforms.soap import scale_by_soap, soap

__all__ = [
    "adamw", "constant", "hidden_matrix_labels", "kfac", "lion", "muon", "muon_direction",
    "muon_momentum", "newton_schulz", "ramp", "scale_by_kfac", "scale_by_muon", "scale_by_shampoo",
    "scale_by_soap", "shampoo", "soap", "tapped_call", "warmup_cosine",
]
