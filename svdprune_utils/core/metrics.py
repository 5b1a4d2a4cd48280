"""Metrics for kept-token sets and score maps.

- How much of X the kept tokens span: :func:`projection_residual` against the Eckart–Young floor
  :func:`optimal_residual` (no K rows can do better than the best rank-K approximation).
- How much the kept tokens repeat each other: :func:`redundancy` (with the residual, the measure of the paper's
  "information dispersion" used in notebook 04).
- Where the kept tokens are on the patch grid: :func:`spatial_stats` (coverage, spread).
- Whether a score favours positions: :func:`positional_bias` (mean kept row/column, rank correlation
  of the score with the token index and with the row).
- Agreement between selections: :func:`jaccard`; answer-region recall: :func:`region_recall`.

All functions accept torch tensors or numpy arrays and never modify them; they return plain floats
(or dicts of floats) for one sample, so a notebook averages them over a dataset.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import scipy.stats
import torch

from .validate import as_features, check_budget, check_int, unit_scale

__all__ = [
    "projection_residual",
    "optimal_residual",
    "spatial_stats",
    "redundancy",
    "redundancies",
    "positional_bias",
    "jaccard",
    "region_recall",
    "grid_shape",
]


def _single(X: Any, name: str = "X") -> np.ndarray:
    """X as a fp64 numpy (N, d) matrix with O(1) entries (:func:`unit_scale`; the residuals are ratios, so
    the scale cancels, and ‖X‖² stays finite and non-zero for any finite fp64 input)."""
    T, _, batched = as_features(X, name)
    if batched:
        raise ValueError(f"{name} must be a single (N, d) matrix here, got shape {tuple(T.shape)}")
    return unit_scale(T)[0].cpu().numpy()


def _indices(kept: Any, N: int | None, name: str = "kept") -> np.ndarray:
    idx = np.asarray(kept.detach().cpu() if isinstance(kept, torch.Tensor) else kept)
    if idx.ndim == 1 and idx.size == 0:
        idx = idx.astype(np.int64)  # an empty list is an empty index set
    if idx.ndim != 1 or idx.dtype.kind not in "iu":
        raise ValueError(f"{name} must be a 1-D array of integer indices, got shape {idx.shape} dtype {idx.dtype}")
    if idx.size and (idx.min() < 0 or (N is not None and idx.max() >= N)):
        raise ValueError(f"{name} has indices outside [0, {N if N is not None else 'inf'})")
    if np.unique(idx).size != idx.size:
        raise ValueError(f"{name} has repeated indices")
    return idx


def check_grid(grid: Any) -> tuple[int, int]:
    """``grid`` as (H, W): a pair of integers >= 1; ValueError otherwise."""
    ok = isinstance(grid, (tuple, list, np.ndarray, torch.Size)) and len(grid) == 2
    if ok:
        try:
            H, W = (check_int(g, "grid", 1) for g in grid)
        except ValueError:
            ok = False
    if not ok:
        raise ValueError(f"grid must be a pair of integers (H, W) >= 1, got {grid!r}")
    return H, W


def grid_shape(N: int, grid: tuple[int, int] | None = None) -> tuple[int, int]:
    """(H, W) of the patch grid: ``grid`` if given (checked), else the square root of N."""
    if grid is None:
        side = int(round(math.sqrt(N)))
        if side * side != N:
            raise ValueError(f"{N} tokens do not form a square grid; pass grid=(H, W)")
        return side, side
    H, W = check_grid(grid)
    if H * W != N:
        raise ValueError(f"grid {H}x{W} does not match {N} tokens")
    return H, W


def projection_residual(X: Any, kept: Any) -> float:
    """‖X − X P_S‖_F² / ‖X‖_F², P_S the orthogonal projector onto the span of the kept rows X[S].

    How much of the token matrix is lost when every token is represented in the span of the kept
    tokens (0 = nothing lost). X: (N, d); kept: 1-D integer indices.
    """
    A = _single(X)
    idx = _indices(kept, A.shape[0])
    total = float(np.sum(A * A))
    if total == 0.0:
        return 0.0
    if idx.size == 0:
        return 1.0
    # rank-revealing: the right singular vectors of X[S] with σ above the numerical-rank threshold span
    # the kept rows exactly, whether or not the kept rows are linearly independent
    _, sig, Vt = np.linalg.svd(A[idx], full_matrices=False)
    V = Vt[sig > sig.max(initial=0.0) * max(A.shape) * np.finfo(float).eps].T
    proj = (A @ V) @ V.T
    return float(min(max(np.sum((A - proj) ** 2) / total, 0.0), 1.0))


def optimal_residual(X: Any, K: int) -> float:
    """Eckart–Young floor Σ_{j>K} σ_j² / Σ_j σ_j²: the smallest residual any K-dimensional span
    (hence any K kept tokens) can reach."""
    A = _single(X)
    K = check_int(K, "K", 0)
    s2 = np.linalg.svd(A, compute_uv=False) ** 2
    total = float(s2.sum())
    return 0.0 if total == 0.0 else float(s2[K:].sum() / total)


def spatial_stats(kept: Any, grid: tuple[int, int] = (24, 24)) -> dict[str, float]:
    """Where the kept tokens lie on the H×W patch grid (distances in patches).

    Returns ``mean_row``/``mean_col`` (0 = top/left), ``coverage`` (mean distance from every grid cell
    to its nearest kept token: small = the image is covered), ``spread`` (mean pairwise distance of
    kept tokens: small = clumped) and ``row_std``.
    """
    H, W = check_grid(grid)
    idx = _indices(kept, H * W, f"kept (on the {H}x{W} grid)")
    if idx.size == 0:
        raise ValueError("kept is empty")
    r, c = np.divmod(idx, W)
    pts = np.stack([r, c], axis=1).astype(float)
    cells = np.stack(np.divmod(np.arange(H * W), W), axis=1).astype(float)
    d_cells = np.sqrt(((cells[:, None, :] - pts[None, :, :]) ** 2).sum(-1)).min(axis=1)
    if idx.size > 1:
        pd = np.sqrt(((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1))
        spread = float(pd[np.triu_indices(idx.size, 1)].mean())
    else:
        spread = 0.0
    return {
        "mean_row": float(r.mean()),
        "mean_col": float(c.mean()),
        "row_std": float(r.std()),
        "coverage": float(d_cells.mean()),
        "spread": spread,
    }


def redundancy(X: Any, kept: Any) -> float:
    """Mean cosine similarity between pairs of kept tokens, after subtracting the image's mean token.

    X: (N, d) features of one image; kept: indices of at least two distinct kept rows. The mean token (over all
    N) is removed first, so that an offset every token shares does not count as repetition. 1: the kept tokens
    say the same thing; about 0: they point in unrelated directions. A kept row equal to the mean token has no
    direction and counts as 0 in its pairs (to 1e-12 of the largest kept distance from the mean). fp64.
    :func:`redundancies` is the batched form (the same computation).
    """
    A = _single(X)
    idx = _indices(kept, A.shape[0])
    return float(redundancies(torch.from_numpy(A)[None], torch.from_numpy(idx)[None])[0])


def redundancies(X: torch.Tensor, kept: torch.Tensor) -> np.ndarray:
    """:func:`redundancy` of a batch: X (n, N, d), kept (n, K) with K >= 2 distinct indices per row; returns
    (n,) numpy fp64."""
    A = unit_scale(torch.as_tensor(X))
    n, N, d = A.shape
    K = kept.shape[1]
    if K < 2:
        raise ValueError(f"redundancy needs at least two kept tokens, got {K}")
    S = A.gather(1, kept.to(A.device).long()[..., None].expand(-1, -1, d)) - A.mean(dim=1, keepdim=True)
    norm = S.norm(dim=2, keepdim=True)
    live = norm > 1e-12 * norm.amax(dim=1, keepdim=True)  # rows at the mean token up to rounding: no direction
    S = torch.where(live, S / norm.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(S))
    C = S @ S.transpose(1, 2)
    iu = torch.triu_indices(K, K, 1, device=C.device)
    return C[:, iu[0], iu[1]].mean(1).cpu().numpy()


def positional_bias(scores: Any, K: int, grid: tuple[int, int] | None = None) -> dict[str, float]:
    """Positional statistics of a score vector over N = H·W raster-ordered tokens.

    Returns the mean row/column of the top-K tokens (ties to the lower index) relative to the grid
    centre's ((H−1)/2), and the Spearman rank correlation of the score with the token index and with
    the row (≈ 0 for a position-free score; > 0 favours late/lower tokens, < 0 early/upper ones).
    """
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu()
        scores = scores.double() if scores.is_floating_point() else scores  # numpy has no bfloat16
    raw = np.asarray(scores)
    if raw.dtype.kind not in "iuf":
        raise ValueError(f"scores must be real numbers, got dtype {raw.dtype}")
    s = raw.astype(np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"scores must be a non-empty 1-D vector, got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"scores contain {int((~np.isfinite(s)).sum())} non-finite value(s)")
    H, W = grid_shape(s.size, grid)
    K = min(check_budget(K), s.size)
    top = np.sort(np.argsort(-s, kind="stable")[:K])
    rows, cols = np.divmod(top, W)
    all_rows = np.arange(s.size) // W
    constant = np.ptp(s) == 0
    rho_idx = 0.0 if constant else float(scipy.stats.spearmanr(s, np.arange(s.size)).statistic)
    rho_row = 0.0 if constant else float(scipy.stats.spearmanr(s, all_rows).statistic)
    return {
        "mean_kept_row": float(rows.mean()),
        "mean_kept_col": float(cols.mean()),
        "row_shift": float(rows.mean() - (H - 1) / 2),
        "spearman_index": rho_idx,
        "spearman_row": rho_row,
    }


def jaccard(a: Any, b: Any) -> float:
    """|A ∩ B| / |A ∪ B| of two index sets, each a 1-D array of distinct non-negative integers (1.0 for two
    empty sets). ValueError for anything else (floats, booleans, 2-D arrays, repeated indices)."""
    sa = set(_indices(a, None, "a").tolist())
    sb = set(_indices(b, None, "b").tolist())
    union = sa | sb
    return 1.0 if not union else len(sa & sb) / len(union)


def region_recall(kept: Any, mask: Any) -> float:
    """Fraction of the answer-region tokens (``mask``: bool (H, W) or (N,)) that are kept.

    NaN when the mask is empty (no answer region: recall is undefined).
    """
    m = np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask)
    if m.dtype.kind not in "biu" or (m.dtype.kind != "b" and not np.isin(m, (0, 1)).all()):
        raise ValueError(f"mask must be boolean (or 0/1), got dtype {m.dtype}")
    m = m.astype(bool).ravel()
    idx = _indices(kept, m.size)
    n = int(m.sum())
    return float("nan") if n == 0 else float(m[idx].sum() / n)
