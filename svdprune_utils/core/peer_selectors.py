"""Two peers whose rule is more than a top-K: VisPruner and CDPruner, each following its authors' code.

Both register themselves in :data:`~svdprune_utils.core.selection.SELECTORS` when this module is imported
(``svdprune_utils.core`` imports it, so the registry is complete whenever the package is loaded). They honour
the selector contract of :mod:`.selection`: validated (B, N, d) features, 1 <= K < N, LongTensor (B, K) of
sorted kept indices; call them through :func:`~svdprune_utils.core.selection.select_tokens`.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .selection import register
from .validate import as_signal, unit_scale

__all__ = ["select_vispruner", "select_cdpruner", "cdpruner_relevance"]

MAX_REMOVED_PER_ROUND = 8  # VisPruner's per-round cap on removed near-duplicates (``min(8, R - T_div)``)


# ------------------------------------------------------------------------------------------- VisPruner
def _check_ratio(important_ratio: Any) -> float:
    if isinstance(important_ratio, bool) or not isinstance(important_ratio, numbers.Real):
        raise ValueError(f"important_ratio must be a number in [0, 1], got {important_ratio!r}")
    ratio = float(important_ratio)
    if not 0.0 <= ratio <= 1.0:  # also refuses NaN
        raise ValueError(f"important_ratio must be in [0, 1], got {important_ratio!r}")
    return ratio


def _remove_near_duplicates(Xn: torch.Tensor, residual: torch.Tensor, keep: int) -> torch.Tensor:
    """VisPruner's matching loop on one sample: ``Xn`` (N, d) unit rows, ``residual`` the candidate indices
    in list order; returns the ``keep`` survivors (keep >= 1), in the list order the loop leaves them."""
    while True:
        R = residual.numel()
        r = min(MAX_REMOVED_PER_ROUND, R - keep)
        if r <= 0:
            return residual
        a, b = residual[0::2], residual[1::2]  # alternate split of the current list (R >= 2: b is not empty)
        redundancy = (Xn[a] @ Xn[b].T).amax(dim=1)  # each a-token's highest cosine to any b-token
        drop = min(r, a.numel())
        distinct = torch.sort(redundancy, descending=True, stable=True).indices[drop:]
        residual = torch.cat([a[distinct], b])


@register("vispruner")
def select_vispruner(features, budget, *, attention=None, important_ratio=0.5):
    """VisPruner (Zhang et al., ICCV 2025, "Beyond Text-Visual Attention"): K = K_imp + K_div tokens, the
    important ones by CLS attention and the diverse ones by removing near-duplicates from the rest.

    ``features``: (B, N, d) the tower's feature-layer patch features (LLaVA: layer −2, CLS dropped);
    ``attention``: (B, N) or (N,) the CLS→patch attention of that layer, averaged over heads;
    ``important_ratio`` in [0, 1] (official default 0.5; the README also runs 0.75 at 64 tokens).

    Follows Theia-4869/VisPruner, ``llava/model/llava_arch.py``, ``LlavaMetaForCausalLM.encode_images``:

    1. K_imp = int(K · ratio) (truncated, as Python's ``int`` there); the tokens sorted by attention,
       descending, and the first K_imp kept. The rest stays a list in that descending-attention order.
    2. While the list holds R > K_div = K − K_imp tokens: r = min(8, R − K_div); split the list into
       A = positions 0, 2, 4, … and B = positions 1, 3, …; score each A-token by its largest cosine similarity
       (L2-normalised features) to a B-token; remove the r highest-scoring A-tokens; the new list is the
       remaining A-tokens in descending score order followed by B in its previous order.
    3. Kept = important ∪ survivors, returned sorted (the official mask keeps raster order).

    Where the official code is silent or fails:

    - Ties: both sorts are stable here, so equal attention goes to the lower index, and among A-tokens of
      equal score the earlier list position counts as more redundant (``argsort`` leaves ties unspecified).
    - An odd R (A has one token more than B) or a round with r > |A| makes the official gather fail (it
      assumes |A| = R // 2 >= r); here A is indexed by its real length ⌈R/2⌉ and a round removes
      min(r, |A|) tokens. Standard settings (N = 576, K a multiple of 16, ratio 0.5) never reach this.
    - K_div = 0 (ratio 1) keeps the K important tokens only (the official loop would run the list down
      to one token and then fail on an empty B).
    - Similarities in fp64; an all-zero feature normalises to zero (the official code divides by zero).
    """
    ratio = _check_ratio(important_ratio)
    B, N = features.shape[:2]
    att = as_signal(attention, "attention", B, N, features.device)
    n_imp = int(budget * ratio)
    n_div = budget - n_imp
    order = torch.sort(att, dim=-1, descending=True, stable=True).indices  # (B, N)
    Xn = F.normalize(unit_scale(features), dim=-1)
    out = []
    for b in range(B):
        residual = order[b, n_imp:]
        survivors = _remove_near_duplicates(Xn[b], residual, n_div) if n_div > 0 else residual[:0]
        out.append(torch.sort(torch.cat([order[b, :n_imp], survivors])).values)
    return torch.stack(out)


# -------------------------------------------------------------------------------------------- CDPruner
def _min_max(raw: torch.Tensor) -> torch.Tensor:
    """CDPruner's relevance from the raw mean cosine (B, N): negate, then per row (x − min + 1e-6) / (max − min).
    A constant row (max = min: the official code divides by zero) gets relevance 1 everywhere."""
    neg = -raw
    lo, hi = neg.amin(dim=-1, keepdim=True), neg.amax(dim=-1, keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (neg - lo + 1e-6) / torch.where(span > 0, span, 1.0), torch.ones_like(neg))


def _text_embeds(text_embeds: Any, B: int, e: int, device) -> torch.Tensor:
    """text_embeds (M, e) (shared) or (B, M, e) as fp64 (B, M, e); clear errors otherwise."""
    if text_embeds is None:
        raise ValueError("cdpruner needs `text_embeds` (the instruction's CLIP text embeddings, (M, e) or (B, M, e)) "
                         "together with `image_embeds`")
    t = torch.as_tensor(np.asarray(text_embeds) if isinstance(text_embeds, np.ndarray) else text_embeds)
    t = t.detach().to(device=device, dtype=torch.float64)
    if t.ndim == 2:
        t = t.unsqueeze(0).expand(B, *t.shape)
    if t.ndim != 3 or t.shape[0] != B or t.shape[1] == 0 or t.shape[2] != e:
        raise ValueError(f"signal `text_embeds` must have shape (M, {e}) or ({B}, M, {e}) with M >= 1 "
                         f"(e as in image_embeds), got {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"signal `text_embeds` contains {int((~torch.isfinite(t)).sum())} non-finite value(s)")
    return t


def _mean_cosine(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """(B, N, e) and (B, M, e) -> (B, N): each image token's cosine to the M text segments, averaged."""
    return (F.normalize(image_embeds, dim=-1) @ F.normalize(text_embeds, dim=-1).transpose(1, 2)).mean(dim=-1)


def cdpruner_relevance(image_embeds: Any, text_embeds: Any) -> torch.Tensor:
    """CDPruner's per-token instruction relevance r, as the kernel uses it (fp64).

    ``image_embeds``: (N, e) or (B, N, e) the image tokens in CLIP's joint space (LLaVA: the layer −2 patch
    tokens through the tower's post-layernorm and ``visual_projection``); ``text_embeds``: (M, e) or (B, M, e)
    the instruction's projected CLIP text embeddings, one per 77-token segment.
    r = minmax(−mean_m cos(image_i, text_m)) with minmax(x) = (x − min x + 1e-6) / (max x − min x) per image.

    Follows Theia-4869/CDPruner, ``llava/model/llava_arch.py``, ``encode_images``: the cosine is negated on
    purpose and the 1e-6 sits in the numerator only. Differences: fp64 (official: fp32); the min and max are
    taken per image (official: over the whole batch, i.e. over all crops of one image); a constant row gets r = 1.
    Returns (N,) for 2-D ``image_embeds``, (B, N) for 3-D.
    """
    if image_embeds is None:
        raise ValueError("cdpruner_relevance needs `image_embeds` ((N, e) or (B, N, e))")
    ie = torch.as_tensor(np.asarray(image_embeds) if isinstance(image_embeds, np.ndarray) else image_embeds)
    if ie.ndim not in (2, 3):
        raise ValueError(f"image_embeds must have shape (N, e) or (B, N, e), got {tuple(ie.shape)}")
    batched = ie.ndim == 3
    ie = ie if batched else ie.unsqueeze(0)
    ie = as_signal(ie, "image_embeds", ie.shape[0], ie.shape[1], ie.device, vector=True)
    te = _text_embeds(text_embeds, ie.shape[0], ie.shape[2], ie.device)
    r = _min_max(_mean_cosine(ie, te))
    return r if batched else r[0]


def _greedy_map(L: torch.Tensor, K: int) -> list[int]:
    """Fast greedy MAP inference of a DPP (Chen, Zhang & Zhou, NeurIPS 2018) on one (N, N) kernel: K indices
    in pick order. Each step takes the largest residual gain d_j² (first index on ties, ``torch.argmax``)."""
    N = L.shape[0]
    cis = torch.zeros(K, N, dtype=L.dtype, device=L.device)
    gains = torch.diagonal(L).clone()
    picked = []
    for i in range(K):
        j = int(torch.argmax(gains))
        picked.append(j)
        g = gains[j]
        if g > 0:
            e = (L[j] - cis[:i, j] @ cis[:i]) / torch.sqrt(g)
        else:  # guard: j lies in the span of the picked tokens; it adds no direction (official: sqrt -> NaN)
            e = torch.zeros(N, dtype=L.dtype, device=L.device)
        cis[i] = e
        gains -= e * e
        gains[j] = -math.inf
    return picked


@register("cdpruner")
def select_cdpruner(features, budget, *, relevance=None, image_embeds=None, text_embeds=None):
    """CDPruner (Zhang et al., NeurIPS 2025): greedy MAP of a conditional DPP whose kernel weighs feature
    similarity by instruction relevance, L = diag(r) S diag(r).

    ``features``: (B, N, d) the projected image tokens (the LLM's input: the official similarity space);
    S = cosine similarity of the features. The relevance r comes from one of:

    - ``relevance``: (B, N) or (N,) the raw per-token similarity — the mean cosine between each image token and
      the instruction's text embedding(s), *before* the official negation and min-max normalisation;
    - ``image_embeds`` (B, N, e) with ``text_embeds`` (M, e) or (B, M, e): r computed as official
      (:func:`cdpruner_relevance`).

    Follows Theia-4869/CDPruner, ``llava/model/llava_arch.py``, ``encode_images``: kernel as above (the
    commented-out reweighting r -> exp(α·r) is off in the released code), then the fast greedy MAP loop — pick the
    largest residual gain d_j² (starting from diag L = r²), e = (L_j − Σ_t c_tj c_t) / d_j, d² −= e², exactly K
    picks, no early stop — and the picks sorted. Ties go to the first index (``torch.argmax``).
    Differences: fp64 (official: fp32); relevance min-max per image; a pick whose residual gain is <= 0 (rank
    exhausted; official: NaN from sqrt) adds a zero row instead, so the remaining picks follow the frozen gains;
    an all-zero feature normalises to zero (the official code divides by zero).
    """
    B, N = features.shape[:2]
    dev = features.device
    has_embeds = image_embeds is not None or text_embeds is not None
    if relevance is None and not has_embeds:
        raise ValueError("cdpruner needs the instruction relevance: pass `relevance` (B, N) (mean cosine of each "
                         "image token to the instruction) or `image_embeds` (B, N, e) with `text_embeds` (M, e)")
    if relevance is not None and has_embeds:
        raise ValueError("cdpruner takes either `relevance` or `image_embeds`/`text_embeds`, not both")
    if relevance is not None:
        r = _min_max(as_signal(relevance, "relevance", B, N, dev))
    else:
        ie = as_signal(image_embeds, "image_embeds", B, N, dev, vector=True)
        r = _min_max(_mean_cosine(ie, _text_embeds(text_embeds, B, ie.shape[2], dev)))
    Xn = F.normalize(unit_scale(features), dim=-1)
    L = r[:, :, None] * (Xn @ Xn.transpose(1, 2)) * r[:, None, :]
    return torch.stack([torch.tensor(sorted(_greedy_map(L[b], budget)), device=dev) for b in range(B)])
