"""svdprune_utils — SVD-Prune (leverage-score visual-token pruning) and its peers, for notebooks and LLaVA.

The one-screen API::

    import svdprune_utils as sp
    scores = sp.leverage_scores(X, rank=16)             # (N, d) or (B, N, d) -> (N,) / (B, N), fp32
    kept = sp.select_tokens(X, budget=64, method="svd") # LongTensor of kept indices, ascending
    red = sp.reduce_tokens(X, 64, "visionzip", attention=a, keys=k)  # merging methods: a Reduction
    sp.patch_llava(model, method="svd", budget=64)      # prune a Hugging Face LLaVA (loaded on first use)

The layers (data flows one way, top to bottom; a layer never imports one below it in this list):

    core/       validation, leverage scores, the selector registry, reductions, metrics (torch/numpy/scipy only)
    hf/         the LLaVA patch, FastV and SparseVLM, attention probes, the apply step (kept -> inputs)   (transformers)
    testbed/    ShapesVQA and the embedded tiny LLaVA
    analysis/   accuracy-vs-budget harness, cached ablations, positional bias, efficiency
    notebook/   toy matrices and plots for the notebooks
    cli.py      python -m svdprune_utils {eval,demo,train-tiny,reproduce}
"""

from .core.leverage import leverage_scores
from .core.metrics import (
    grid_shape,
    jaccard,
    optimal_residual,
    positional_bias,
    projection_residual,
    redundancy,
    region_recall,
    spatial_stats,
)
from .core.peer_selectors import cdpruner_relevance
from .core.reduction import REDUCERS, Reduction, reduce_tokens, reduce_visionzip, visionzip_split
from .core.selection import FEATURE_DEFAULTS, SCORE_BASED, SELECTORS, register, score_tokens, select_tokens, top_k

__version__ = "0.1.0"

__all__ = [
    "leverage_scores",
    "select_tokens",
    "score_tokens",
    "SELECTORS",
    "SCORE_BASED",
    "FEATURE_DEFAULTS",
    "register",
    "top_k",
    "reduce_tokens",
    "reduce_visionzip",
    "visionzip_split",
    "Reduction",
    "REDUCERS",
    "cdpruner_relevance",
    "projection_residual",
    "optimal_residual",
    "spatial_stats",
    "redundancy",
    "positional_bias",
    "jaccard",
    "region_recall",
    "grid_shape",
]

# notebook helpers (toy matrices, plots); matplotlib/seaborn/skimage load lazily inside their functions
from .notebook import plotting, toy  # noqa: E402

__all__ += ["toy", "plotting"]

# Loaded on first use (importing transformers takes seconds): sp.patch_llava(...), sp.tiny, sp.bias, ...
_LAZY = {"patch_llava": "hf.patch", "unpatch_llava": "hf.patch", "patch_model": "hf.patch",
         "unpatch_model": "hf.patch", "prune_inputs": "hf.patch", "Pruned": "hf.patch",
         "PruneState": "hf.patch", "capture_attention": "hf.attention", "AttentionMaps": "hf.attention",
         "keep_image_tokens": "hf.inputs", "sparsevlm_schedule": "hf.sparsevlm", "budget_table": "analysis.efficiency"}
_LAZY_MODULES = {"tiny": "testbed.tiny", "shapes": "testbed.shapes", "bias": "analysis.bias",
                 "evaluate": "analysis.evaluate", "ablation": "analysis.ablation", "efficiency": "analysis.efficiency"}
__all__ += list(_LAZY)


def __getattr__(name):
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if name in _LAZY_MODULES:
        return importlib.import_module(f".{_LAZY_MODULES[name]}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
