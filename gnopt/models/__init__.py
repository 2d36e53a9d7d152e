"""Equinox models whose parameters are the model itself (``apply_fn = lambda m, x: m(x)``).

Every dense layer is a :class:`Linear` with a static, unique ``name`` and an
optional ``tap(name, x, y)`` hook (used by K-FAC to read layer inputs and output
cotangents without graph tagging).
"""

from gnopt.models.layers import Embedding, LayerNorm, Linear, RMSNorm, Tap
from gnopt.models.llama import (PRESETS, LLaMA, LLaMAConfig, Attention, FeedForward,
                                TransformerBlock, apply_rope, llama_config)
from gnopt.models.mlp import MLP, LinearModel
from gnopt.models.summary import count_params, describe

__all__ = [
    "Attention", "Embedding", "FeedForward", "LLaMA", "LLaMAConfig", "LayerNorm", "Linear",
    "LinearModel", "MLP", "PRESETS", "RMSNorm", "Tap", "TransformerBlock", "apply_rope",
    "count_params", "describe", "llama_config",
]
