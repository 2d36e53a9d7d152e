"""GN models as operator pytrees: the GGN (full), any operator's block diagonal
(layerwise), and the curvature choices that build them; trust ratio."""

from gnopt.curvature.blocks import default_block_labels, leaf_block_ids
from gnopt.curvature.ggn import (
    AbstractCurvature,
    AbstractOperator,
    BlockDiagonal,
    block_diagonal,
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
    "AbstractCurvature", "AbstractOperator", "BlockDiagonal", "block_diagonal", "FullCurvature", "LayerwiseCurvature", "LinearisedModel", "TrustRatio",
    "default_block_labels", "full", "ggn_mvp", "layerwise", "leaf_block_ids", "trust_ratio",
]
