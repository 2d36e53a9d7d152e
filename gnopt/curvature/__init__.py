"""GGN operators: full and layerwise (block-diagonal) Gauss-Newton curvature."""

from gnopt.curvature.blocks import default_block_labels, leaf_block_ids
from gnopt.curvature.ggn import (
    AbstractCurvature,
    FullCurvature,
    LayerwiseCurvature,
    LinearisedModel,
    TrustRatio,
    full,
    ggn_mvp,
    layerwise,
    trust_ratio,
)

__all__ = [
    "AbstractCurvature", "FullCurvature", "LayerwiseCurvature", "LinearisedModel", "TrustRatio",
    "default_block_labels", "full", "ggn_mvp", "layerwise", "leaf_block_ids", "trust_ratio",
]
