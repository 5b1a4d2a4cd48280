"""The registry of visual-token selectors: SVD-Prune and its peers.

Every selector has the same contract::

    select(features (B, N, d) float tensor, budget K (1 <= K < N), **signals) -> LongTensor (B, K)

returning the kept token indices of each sample, sorted ascending (raster order preserved).
:func:`select_tokens` is the public entry point: it validates the input, handles ``budget >= N``
(all tokens), the 2-D/3-D and torch/numpy cases, and forwards only the signals a selector accepts.

Score-based selectors keep the top-K scores with ties broken towards the lower index (a stable sort).
Adding a method = one function decorated with ``@register("name")``. Peers with a longer rule (VisPruner,
CDPruner) live in :mod:`.peer_selectors` and register from there; importing ``svdprune_utils.core`` loads them.
Methods that merge tokens (VisionZip) are not selectors: see :mod:`.reduction` (``reduce_tokens``).
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable

import numpy as np
import scipy.linalg
import torch

from .leverage import leverage_scores
from .metrics import grid_shape
from .validate import as_features, as_signal, check_budget, check_int, unit_scale

__all__ = ["SELECTORS", "register", "select_tokens", "score_tokens", "top_k", "SCORE_BASED", "FEATURE_DEFAULTS",
           "default_feature"]

SELECTORS: dict[str, Callable[..., torch.Tensor]] = {}
SCORERS: dict[str, Callable[..., torch.Tensor]] = {}


def register(name: str, scorer: Callable[..., torch.Tensor] | None = None):
    """Decorator adding a selector to :data:`SELECTORS` (and its score function, if any, to SCORERS)."""

    def wrap(fn):
        SELECTORS[name] = fn
        if scorer is not None:
            SCORERS[name] = scorer
        return fn

    return wrap


def top_k(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """Indices of the ``budget`` largest scores per row of (B, N), ties to the lower index, sorted.
    ``budget`` is checked as in :func:`select_tokens` (a positive int; >= N keeps every index)."""
    budget = check_budget(budget)
    if not isinstance(scores, torch.Tensor) or scores.ndim != 2 or not scores.is_floating_point():
        raise ValueError(f"scores must be a floating (B, N) tensor, got {type(scores).__name__} "
                         f"{tuple(getattr(scores, 'shape', ()))}")
    if torch.isnan(scores).any():
        raise ValueError(f"scores contain {int(torch.isnan(scores).sum())} NaN value(s)")
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return torch.sort(order[..., :budget], dim=-1).values


def _signal(value: Any, name: str, shape: tuple[int, int], device) -> torch.Tensor:
    """A per-token signal (N,) or (B, N) as a (B, N) float tensor; clear errors otherwise."""
    return as_signal(value, name, shape[0], shape[1], device)


# ----------------------------------------------------------------------------------------- scorers
def _score_svd(features, *, rank=None, budget=None, center=False, solver="exact", seed=0):
    k = budget if rank is None else rank
    if k is None:
        raise ValueError("svd scores need `rank` (or a budget to use as the rank)")
    return torch.as_tensor(leverage_scores(features, rank=k, center=center, method=solver, seed=seed))


def _score_norm(features):
    return torch.linalg.vector_norm(unit_scale(features), dim=-1)  # same ranking, no overflow


def _score_attention(features, *, attention=None):
    return _signal(attention, "attention", tuple(features.shape[:2]), features.device)


# --------------------------------------------------------------------------------------- selectors
@register("svd", _score_svd)
def select_svd(features, budget, *, rank=None, center=False, solver="exact", seed=0):
    """SVD-Prune (arXiv 2604.11530): keep the top-K tokens by rank-k leverage l_i = ‖U_k[i, :]‖².

    ``rank=None`` uses k = K (clamped to the numerical rank); an int or an energy fraction overrides.
    ``center`` subtracts the token mean first; ``solver`` is a :func:`leverage_scores` method
    ("exact", "exact-svd", "approx"; ``seed`` feeds the approximate one). The defaults (k = K, no
    centering) are the ones notebooks/04_ablations.ipynb measured: k = 16, k = K and energy 0.99 tie,
    every rule ending at k <= 4 (energy <= 0.95 on the embedded model) keeps background; centering +0.2 +- 0.2.
    The paper's authors have published no code: this is the reference implementation of the paper's rule.
    """
    return top_k(_score_svd(features, rank=rank, budget=budget, center=center, solver=solver, seed=seed), budget)


@register("random")
def select_random(features, budget, *, seed=0, generator=None):
    """Uniformly random K tokens. With ``seed`` every sample draws from ``torch.Generator().manual_seed(seed)``
    (a batch equals each sample alone); with ``generator`` the samples draw from it in turn."""
    B, N = features.shape[:2]
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator (or None to use seed), got {type(generator).__name__}")
    seed = check_int(seed, "seed", 0)
    rows = []
    for _ in range(B):
        g = generator if generator is not None else torch.Generator().manual_seed(seed)
        rows.append(torch.randperm(N, generator=g)[:budget])
    return torch.sort(torch.stack(rows), dim=-1).values.to(features.device)


def _lattice(K: int, H: int, W: int) -> torch.Tensor:
    """K raster indices evenly spread over an H×W grid (a gh×gw lattice of cell centres, thinned evenly)."""
    gh = min(H, max(1, round(math.sqrt(K * H / W))))
    gw = min(W, math.ceil(K / gh))
    while gh * gw < K:  # narrow grids
        gh = min(H, gh + 1)
        gw = min(W, math.ceil(K / gh))
    rows = np.floor((np.arange(gh) + 0.5) * H / gh).astype(int)
    cols = np.floor((np.arange(gw) + 0.5) * W / gw).astype(int)
    idx = (rows[:, None] * W + cols[None, :]).ravel()
    if idx.size > K:
        idx = idx[np.round(np.linspace(0, idx.size - 1, K)).astype(int)]
    return torch.as_tensor(np.sort(idx), dtype=torch.long)


@register("uniform")
def select_uniform(features, budget, *, grid=None):
    """K tokens evenly spread over the 2-D patch grid (content-blind; ``grid=(H, W)``, default square)."""
    B, N = features.shape[:2]
    H, W = grid_shape(N, grid)
    return _lattice(budget, H, W).to(features.device).unsqueeze(0).expand(B, -1).clone()


@register("norm", _score_norm)
def select_norm(features, budget):
    """Top-K tokens by L2 feature norm ‖x_i‖ (a common content-only baseline; no official code to follow)."""
    return top_k(_score_norm(features), budget)


@register("cls_attention", _score_attention)
def select_cls_attention(features, budget, *, attention=None):
    """Top-K by CLS→patch attention of the vision tower (FasterVLM; VisionZip's dominant tokens).
    ``attention``: (B, N) or (N,), heads averaged, from the vision feature layer.

    Follows FasterVLM's code (Theia-4869/FasterVLM, ``llava/model/llava_arch.py``, ``encode_images``): the
    tower's CLS→patch attention at the feature layer, averaged over heads, ``topk`` of it; ties here go to the
    lower index (``torch.topk`` leaves them unspecified)."""
    return top_k(_score_attention(features, attention=attention), budget)


@register("fastv", _score_attention)
def select_fastv(features, budget, *, attention=None):
    """FastV (Chen et al., 2024): top-K image tokens by the attention they receive from the last
    prompt token at LLM layer K−1 (heads averaged). ``attention``: (B, N). Pruning inside the LLM at
    layer K is done by :mod:`svdprune_utils.hf.fastv`; here only the ranking.

    Follows FastV's code (pkunlp-icler/FastV, ``src/transformers/src/transformers/models/llama/modeling_llama.py``,
    the in-place KV-cache branch): layer K−1's attention averaged over heads, the last token's row, ``topk`` over
    the image tokens, kept rows sorted and keeping their original position ids (``position_ids = keep_indexs``).
    The official code is batch-1; here each row uses its own last real token (right padding included)."""
    return top_k(_score_attention(features, attention=attention), budget)


@register("divprune")
def select_divprune(features, budget):
    """DivPrune (Alvar et al., CVPR 2025): greedy max–min diversity with distance 1 − cos(x_i, x_j).

    Follows the authors' code (vbdi/divprune, ``LLaVA/llava/model/llava_arch.py``, ``DivPrune``): with
    D = 1 − cos over the tokens, the first kept token maximises its nearest-neighbour distance (the
    second-smallest entry of its column of D, the smallest being its own 0); every next one maximises its
    minimum distance to the kept set; ties go to the first index (``torch.argmax``); the kept indices are
    sorted (``keep_indexs.sort()``). The authors score the projected tokens (the LLM's input): that is this
    method's default feature in the patch and the ablations (``FEATURE_DEFAULTS``). Differences: fp64 here;
    kept tokens are excluded explicitly (the official loop relies on their zero self-distance, so it can
    repeat an index once every remaining token duplicates a kept one); an all-zero token normalises to
    zero and sits at distance 1 from every token (the official code divides by its zero norm).
    """
    X = torch.nn.functional.normalize(unit_scale(features), dim=-1)
    B, N = X.shape[:2]
    out = []
    for b in range(B):
        D = 1.0 - X[b] @ X[b].T  # (N, N)
        if N > 1:
            nearest = torch.topk(D, 2, dim=0, largest=False).values[1]  # each column's nearest-neighbour distance
        else:
            nearest = D[0]
        first = int(torch.argmax(nearest))  # argmax returns the first maximal index
        chosen = [first]
        mind = D[first].clone()
        mind[first] = -math.inf
        for _ in range(budget - 1):
            j = int(torch.argmax(mind))
            chosen.append(j)
            mind = torch.minimum(mind, D[j])
            mind[chosen] = -math.inf
        out.append(torch.tensor(sorted(chosen)))
    return torch.stack(out).to(features.device)


@register("pivoted_qr")
def select_pivoted_qr(features, budget):
    """Greedy column-subset selection by QR with column pivoting on Xᵀ (Businger–Golub, LAPACK geqp3):
    each step keeps the token with the largest residual norm after projecting out the kept ones."""
    out = []
    for b in range(features.shape[0]):
        Xt = features[b].detach().double().cpu().numpy().T  # (d, N): tokens are columns
        _, piv = scipy.linalg.qr(Xt, mode="r", pivoting=True)
        out.append(np.sort(piv[:budget]))
    return torch.as_tensor(np.stack(out), dtype=torch.long, device=features.device)


SCORE_BASED = tuple(SCORERS)

# What each method scores by default in the patch and the cached ablations ("vision": the tower's
# vision_feature_layer patch features; "projected": after the projector, the LLM's input), following each
# method's official code where it says; the user can override per call (``feature=``).
FEATURE_DEFAULTS = {"divprune": "projected", "cdpruner": "projected"}


def default_feature(method: str) -> str:
    """The feature a method scores unless told otherwise ("vision" or "projected")."""
    return FEATURE_DEFAULTS.get(method, "vision")


# ------------------------------------------------------------------------------------ public API
def _forward_signals(fn: Callable, method: str, signals: dict) -> dict:
    accepted = {p for p in inspect.signature(fn).parameters if p not in ("features", "budget")}
    known = set().union(*(set(inspect.signature(f).parameters) for f in SELECTORS.values()))
    known -= {"features", "budget"}
    unknown = set(signals) - known
    if unknown:
        raise TypeError(f"unknown signal(s) {sorted(unknown)}; selectors accept {sorted(known)}")
    return {k: v for k, v in signals.items() if k in accepted}


def select_tokens(features: Any, budget: int, method: str = "svd", **signals) -> torch.Tensor:
    """Indices of the tokens to keep.

    Args:
        features: (N, d) or (B, N, d) torch tensor or numpy array (floating; never modified).
        budget: K >= 1 tokens to keep per sample; K >= N keeps all tokens (``arange(N)``; the selector still runs,
            at K = N, so its signals are checked and it costs what a selection of N tokens costs).
        method: a key of :data:`SELECTORS`. A merging method ("visionzip", see ``reduction.REDUCERS``) raises
            ValueError pointing to ``reduce_tokens``: its output is not a subset of the input tokens.
        **signals: extra inputs some selectors need — ``attention`` (cls_attention, fastv, vispruner; with
            ``important_ratio``), ``relevance`` or ``image_embeds``/``text_embeds`` (cdpruner),
            ``seed``/``generator`` (random), ``grid`` (uniform), ``rank``/``center``/``solver`` (svd).
            Signals a selector does not take are ignored; names no selector takes raise TypeError.

    Returns:
        LongTensor (K,) for 2-D input, (B, K) for 3-D input, ascending, on the features' device.
    """
    if method not in SELECTORS:
        from .reduction import REDUCERS  # deferred: reduction builds on this module

        if method in REDUCERS:
            raise ValueError(f"{method!r} merges tokens (its contextual tokens are averages, not input tokens), so "
                             f"it has no kept indices: use reduce_tokens(features, budget, {method!r}, ...), which "
                             f"returns a Reduction (kept positions, merged features, sources)")
        raise ValueError(f"unknown method {method!r}; registered: {sorted(SELECTORS)}")
    X, _, batched = as_features(features)
    K = check_budget(budget)
    B, N = X.shape[:2]
    # K >= N keeps every token, but the selector still runs (at K = N, where every one gives arange(N)): a missing or
    # misshaped signal is an error whatever the budget
    K = min(K, N)
    fn = SELECTORS[method]
    idx = fn(X, K, **_forward_signals(fn, method, signals))
    assert idx.shape == (B, K), f"selector {method} returned shape {tuple(idx.shape)}, expected {(B, K)}"
    return idx if batched else idx[0]


def score_tokens(features: Any, method: str = "svd", **signals) -> torch.Tensor:
    """Per-token scores (B, N) (or (N,)) of a score-based selector (see :data:`SCORE_BASED`), fp32.

    For ``svd`` pass ``rank=`` (the selector's default rank is the budget, unknown here).
    """
    if method not in SCORERS:
        raise ValueError(f"{method!r} is not score-based; score-based methods: {sorted(SCORERS)}")
    X, _, batched = as_features(features)
    fn = SCORERS[method]
    s = fn(X, **_forward_signals(fn, method, signals)).to(torch.float32)
    return s if batched else s[0]
