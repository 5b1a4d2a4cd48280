"""svdprune_utils — SVD-Prune (leverage-score visual-token pruning) and its peers, for notebooks and LLaVA.

The one-screen API::

    from svdprune_utils import leverage_scores, select_tokens, SELECTORS
    scores = leverage_scores(X, rank=16)             # (N, d) or (B, N, d) -> (N,) / (B, N), fp32
    kept = select_tokens(X, budget=64, method="svd") # LongTensor of kept indices, ascending
"""

from .leverage import leverage_scores
from .metrics import (
    grid_shape,
    jaccard,
    optimal_residual,
    positional_bias,
    projection_residual,
    region_recall,
    spatial_stats,
)
from .selectors import SCORE_BASED, SELECTORS, register, score_tokens, select_tokens, top_k

__version__ = "0.1.0"

__all__ = [
    "leverage_scores",
    "select_tokens",
    "score_tokens",
    "SELECTORS",
    "SCORE_BASED",
    "register",
    "top_k",
    "projection_residual",
    "optimal_residual",
    "spatial_stats",
    "positional_bias",
    "jaccard",
    "region_recall",
    "grid_shape",
]

# notebook helpers (toy matrices, plots); matplotlib/seaborn/skimage load lazily inside their functions
from . import plotting, toy  # noqa: E402

__all__ += ["toy", "plotting"]

# LLaVA pruning, loaded on first use (importing transformers takes seconds): svdprune_utils.patch_llava(...)
_LAZY = {"patch_llava": "llava", "unpatch_llava": "llava", "prune_inputs": "llava", "Pruned": "llava",
         "PruneState": "llava", "capture_attention": "attention", "AttentionMaps": "attention",
         "keep_image_tokens": "inputs"}
__all__ += list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
