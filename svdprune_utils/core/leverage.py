"""Statistical leverage scores of a token-feature matrix — the score behind SVD-Prune.

For a token matrix X of shape (N, d) with thin SVD X = U Σ Vᵀ, the rank-k leverage score of token i is

    l_i = ‖U_k[i, :]‖²  =  (H_k)_ii,   H_k = U_k U_kᵀ  (the hat matrix of the best rank-k approximation)

so 0 ≤ l_i ≤ 1 and Σ_i l_i = k. A token with a high score carries a direction of the dominant
k-dimensional subspace that few other tokens share; duplicated tokens split their leverage.

Numerics (measured in ``benchmarks/leverage_speed.py``): the exact path eigendecomposes the fp64 Gram
matrix of the smaller side (X Xᵀ when N ≤ d, else Xᵀ X), which matched a fp64 ``numpy.linalg.svd``
reference to ≤ 1e-6 and was faster than fp32 ``torch.linalg.svd``. For an int rank k ≤ min(N, d)/3 on the CPU
and min(N, d) >= 1024 it computes only the top-k eigenpairs (LAPACK's MRRR after the same tridiagonal reduction,
fp64, exact as the full one: the other eigenvectors are never formed), falling back to the full spectrum when the
numerical rank is below k (the rank rule needs it); an int rank forms only k columns of U either way;
``method="exact-svd"`` runs the SVD itself. Whatever the input dtype (fp16/bf16 included) the maths runs in fp64
and the scores come back as fp32. The approximate path is a seeded
randomized SVD (``torch.svd_lowrank``; the global RNG is forked, never reseeded). At LLaVA-1.5 sizes it is not the
better choice: with the defaults (q = 2k columns, 4 power iterations) its top-64 set agreed with the exact one
only 81–89% of the time at k = 64, and the settings that fix that cost more than the exact Gram path
(benchmarks/README.md).

Rank rule: ``rank`` is an int k (fixed rank) or a float in (0, 1] (energy: the smallest k whose share
of Σσ² reaches it). Either way k is clamped to the numerical rank r (σ_j > σ_max · max(N, d) · ε with
ε the fp32 machine epsilon, or fp64's for fp64 input on the SVD path); at k = r every token of a
full-rank square matrix scores 1, so meaningful ranks stay below r. A zero matrix has r = 0 and all
scores 0. When σ_k = σ_{k+1} the rank-k subspace, hence the scores, is not unique (``torch.eye(6)`` at k = 3: any
three tokens can score 1) and the solvers may pick different ones; ties between equal *scores* go to the lower
index in selection. There is no default rank; the selector's default (k = K, no centering, the tower's
``vision_feature_layer`` features) and the measurements behind it are in notebooks/04_ablations.ipynb.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .validate import as_features, check_flag, check_int, restore_kind, unit_scale, unit_scale_factors

__all__ = ["leverage_scores", "numerical_rank", "resolve_rank", "METHODS"]

METHODS = ("exact", "exact-svd", "approx")


def _rtol(shape: tuple[int, int], dtype: torch.dtype, method: str) -> float:
    eps = torch.finfo(torch.float32).eps
    if dtype == torch.float64 and method == "exact-svd":
        eps = torch.finfo(torch.float64).eps
    return max(shape) * eps


def numerical_rank(sigma: torch.Tensor, rtol: float) -> torch.Tensor:
    """Number of singular values above ``rtol · σ_max`` for each row of ``sigma`` (B, m), descending."""
    smax = sigma[:, :1]
    return ((sigma > rtol * smax) & (sigma > 0)).sum(dim=1)


def resolve_rank(rank: Any, sigma: torch.Tensor, num_rank: torch.Tensor) -> torch.Tensor:
    """The k used per sample: ``rank`` (int or energy fraction) clamped to the numerical rank.

    sigma: (B, m) singular values, descending. Returns a LongTensor (B,).
    """
    if isinstance(rank, (bool, np.bool_)):
        raise ValueError(f"rank must be an int >= 1 or a float in (0, 1], got {rank!r}")
    if isinstance(rank, (int, np.integer)):
        if rank < 1:
            raise ValueError(f"rank must be an int >= 1 or a float in (0, 1], got {rank}")
        return torch.clamp(num_rank, max=int(rank))
    if isinstance(rank, (float, np.floating)):
        if not (0.0 < float(rank) <= 1.0):
            raise ValueError(f"an energy rank must lie in (0, 1], got {rank}")
        idx = torch.arange(sigma.shape[1], device=sigma.device)
        energy = torch.where(idx[None, :] < num_rank[:, None], sigma.double() ** 2, 0.0)
        total = energy.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        share = energy.cumsum(dim=1) / total
        # smallest k with share[k-1] >= rank (a hair of slack for round-off at rank == 1.0)
        k = (share < float(rank) - 1e-12).sum(dim=1) + 1
        return torch.minimum(k, num_rank)
    raise ValueError(f"rank must be an int >= 1 or a float in (0, 1], got {type(rank).__name__} {rank!r}")


def _exact_gram(X: torch.Tensor, kmax: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma (B, m) descending, squared left singular vectors U² (B, N, c)) from a fp64 Gram eigh, with c = m, or
    the first ``kmax`` columns only (when N > d the columns cost X @ V: only those asked for are formed)."""
    B, N, d = X.shape
    c = min(N, d) if kmax is None else max(0, min(int(kmax), N, d))
    if N <= d:
        lam, U = torch.linalg.eigh(X @ X.transpose(1, 2))
        lam, U = lam.flip(-1).clamp_min(0), U.flip(-1)
        return lam.sqrt(), U[..., :c] ** 2
    lam, V = torch.linalg.eigh(X.transpose(1, 2) @ X)
    lam, V = lam.flip(-1).clamp_min(0), V.flip(-1)
    XV2 = (X @ V[..., :c]) ** 2  # (B, N, c): (σ_j U_ij)²
    inv = torch.where(lam[:, :c] > 0, 1.0 / lam[:, :c].clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    return lam.sqrt(), XV2 * inv[:, None, :]


# The top-k path (:func:`_exact_topk`) runs on the CPU when k <= PARTIAL_MAX * m and m = min(N, d) >= PARTIAL_MIN_DIM.
# Below that size it is slower than the full fp64 eigh: inside a process where torch has run, SciPy's OpenBLAS
# threads contend with torch's OpenMP pool, and at LLaVA-1.5's sizes the wake-up cost dominates (576x64 at k = 16:
# 24 ms vs 4.9 ms; 576x1024 at k = 64: 174 ms vs 48 ms). From m = 1024 on, the tridiagonal reduction dominates both
# paths and computing k eigenvectors instead of m saves time (benchmarks/README.md, "Selection at LLaVA-NeXT and
# Qwen2.5-VL sizes").
PARTIAL_MAX = 1.0 / 3.0
PARTIAL_MIN_DIM = 1024
# The top-k path reads X in blocks of rows (N > d) or columns (N <= d) of about this many fp64 bytes, converted into
# one reused buffer: the full fp64 copy of X (84 MB at 8192x1280) is never made.
BLOCK_BYTES = 4 << 20


def _is_int_rank(rank: Any) -> bool:
    """Whether ``rank`` is a fixed rank k >= 1 (an int, not a bool), not an energy fraction."""
    return isinstance(rank, (int, np.integer)) and not isinstance(rank, (bool, np.bool_)) and rank >= 1


def _takes_top_k(T: torch.Tensor, rank: Any) -> bool:
    """Whether ``leverage_scores(method="exact")`` runs :func:`_exact_topk` for the (B, N, d) batch ``T``."""
    m = min(T.shape[1:])
    return _is_int_rank(rank) and T.device.type == "cpu" and m >= PARTIAL_MIN_DIM and int(rank) <= PARTIAL_MAX * m


def _fill(buf: np.ndarray, src: torch.Tensor, inv: float) -> np.ndarray:
    """``buf`` <- ``src`` (a CPU block of any floating dtype) in fp64, times ``inv``: the block of ``unit_scale``'s
    copy (``inv`` is a power of two, so the product is exact)."""
    if src.dtype == torch.bfloat16:  # numpy has no bfloat16
        torch.from_numpy(buf).copy_(src)
        buf *= inv
    else:
        np.multiply(src.numpy(), inv, out=buf, dtype=np.float64)
    return buf


def _exact_topk(T: torch.Tensor, k: int, rtol: float, center: bool = False):
    """The fp64 Gram matrix's top-k eigenpairs only (LAPACK's MRRR, ``scipy.linalg.eigh(subset_by_index=...,
    driver="evr")``: the tridiagonal reduction, then k eigenvectors instead of all m), of each sample of the CPU batch
    ``T`` (B, N, d) scaled as :func:`unit_scale` scales it (and centred over the tokens with ``center``): (sigma (B, k)
    descending, U_k² (B, N, k)), or None when some sample's numerical rank is below k (σ_k <= rtol·σ_1: the full
    spectrum is needed to count it; the caller falls back to :func:`_exact_gram`).

    ``T`` is read a block at a time (:data:`BLOCK_BYTES`) into one fp64 buffer and the Gram matrix accumulates block
    by block through BLAS's symmetric rank-k update (``dsyrk``: its upper triangle only, half the flops of a GEMM)."""
    import scipy.linalg
    from scipy.linalg import blas

    B, N, d = T.shape
    m = min(N, d)
    tall = N > d  # Gram Xᵀ X (d x d) from blocks of rows; else X Xᵀ (N x N) from blocks of columns
    inv = unit_scale_factors(T).tolist()
    width = d if tall else N
    step = max(1, min(N if tall else d, BLOCK_BYTES // (8 * width)))
    flat = np.empty(step * width)
    sig, usq = [], []
    for b in range(B):
        blocks = [slice(s, min(s + step, N if tall else d)) for s in range(0, N if tall else d, step)]

        def block(sl):
            n = sl.stop - sl.start
            if tall:
                return _fill(flat[: n * d].reshape(n, d), T[b, sl], inv[b])
            return _fill(flat[: N * n].reshape(N, n), T[b, :, sl], inv[b])

        mu = None
        if center and tall:  # the token mean needs every row before the first centred block
            mu = sum(block(sl).sum(axis=0) for sl in blocks) / N
        G = None
        for sl in blocks:
            blk = block(sl)
            if center:
                blk -= mu if tall else blk.mean(axis=0)
            # blkᵀ is Fortran-ordered, so no copy: trans=0 gives blkᵀ blk (rows), trans=1 gives blk blkᵀ (columns)
            G = blas.dsyrk(1.0, blk.T, beta=0.0 if G is None else 1.0, c=G, trans=0 if tall else 1,
                           overwrite_c=G is not None)
        lam, W = scipy.linalg.eigh(G, lower=False, subset_by_index=[m - k, m - 1], driver="evr",
                                   overwrite_a=True, check_finite=False)
        lam, W = lam[::-1].clip(min=0), np.asfortranarray(W[:, ::-1])
        if not lam[-1] > (rtol * np.sqrt(lam[0])) ** 2:
            return None
        sigma = np.sqrt(lam)
        if tall:  # U_k = X V_k / σ_k, a block of rows at a time
            U = np.empty((N, k))
            for sl in blocks:
                blk = block(sl)
                if center:
                    blk -= mu
                U[sl] = blas.dgemm(1.0, blk.T, W, trans_a=1)
            W = U / sigma
        sig.append(torch.from_numpy(sigma.copy()))
        usq.append(torch.from_numpy(np.square(W)))
    return torch.stack(sig), torch.stack(usq)


def _exact_svd(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    U, S, _ = torch.linalg.svd(X, full_matrices=False)
    return S, U**2


def _approx(X: torch.Tensor, k: int, seed: int, oversample: int | None, niter: int):
    B, N, d = X.shape
    q = min(N, d, k + (k if oversample is None else int(oversample)))
    devices = [X.device] if X.device.type == "cuda" else []
    sig, usq = [], []
    with torch.random.fork_rng(devices=devices):
        for b in range(B):  # every sample draws from the same seed: a batch equals each sample alone
            torch.manual_seed(int(seed))
            U, S, _ = torch.svd_lowrank(X[b], q=q, niter=niter)
            sig.append(S)
            usq.append(U**2)
    return torch.stack(sig), torch.stack(usq)


def leverage_scores(
    X: Any,
    rank: int | float,
    center: bool = False,
    method: str = "exact",
    *,
    seed: int = 0,
    oversample: int | None = None,
    niter: int = 4,
    return_rank: bool = False,
):
    """Rank-k statistical leverage score of every token.

    Args:
        X: token features, (N, d) or (B, N, d), torch tensor or numpy array, floating dtype.
        rank: int k >= 1 (fixed rank) or float in (0, 1] (energy fraction). Clamped to the numerical rank.
            Required: the rank that selects well depends on the budget (the ``svd`` selector uses k = K).
            Notebook 04 measured the energy rules on the embedded model: up to 0.95 they pick k ≈ 1–4,
            the background's directions, and keep almost none of the answer region.
        center: subtract the per-sample token mean before the decomposition.
        method: "exact" (fp64 Gram eigh), "exact-svd" (fp64 SVD) or "approx" (randomized SVD with
            q = k + oversample columns (default oversample = k), ``niter`` power iterations, seeded by ``seed``;
            int rank only). ``seed``, ``niter`` and ``oversample`` are integers >= 0, checked whatever the method.
        return_rank: also return the k actually used.

    Returns:
        scores of shape (N,) or (B, N), float32, same kind (torch/numpy) and device as ``X``;
        with ``return_rank``, ``(scores, k)`` where k is an int (2-D input) or a (B,) tensor/array.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    center, return_rank = check_flag(center, "center"), check_flag(return_rank, "return_rank")
    seed, niter = check_int(seed, "seed", 0), check_int(niter, "niter", 0)
    oversample = None if oversample is None else check_int(oversample, "oversample", 0)
    T, was_numpy, batched = as_features(X, "X")
    in_dtype = T.dtype
    N, d = T.shape[1:]
    rtol = _rtol((N, d), in_dtype, method)
    # fp64 maths whatever the input: bf16/fp16 linalg is unsupported on CPU and fp32 Gram is too coarse. Leverage is
    # scale-invariant: each sample is scaled to O(1) entries (unit_scale), which keeps the Gram matrix finite and exact.
    top = None
    if method == "exact" and _takes_top_k(T, rank):  # reads T block by block (no fp64 copy of the whole of it)
        top = _exact_topk(T, int(rank), rtol, center)
    if top is not None:
        sigma, usq = top
    else:
        work = unit_scale(T)
        if center:
            work = work - work.mean(dim=1, keepdim=True)
        if method == "approx":
            if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool):
                raise ValueError("method='approx' needs an int rank (the energy rule needs the full spectrum; "
                                 "use method='exact')")
            if rank < 1:
                raise ValueError(f"rank must be an int >= 1 or a float in (0, 1], got {rank}")
            work = work if in_dtype == torch.float64 else work.float()
            sigma, usq = _approx(work, min(int(rank), N, d), seed, oversample, niter)
        elif method == "exact-svd":
            sigma, usq = _exact_svd(work)
        else:
            # an int rank never uses more than k columns of U: the rest are not formed
            sigma, usq = _exact_gram(work, int(rank) if _is_int_rank(rank) else None)

    k = resolve_rank(rank, sigma, numerical_rank(sigma, rtol))
    cols = torch.arange(usq.shape[2], device=usq.device)
    mask = (cols[None, :] < k[:, None]).to(usq.dtype)  # (B, m)
    scores = (usq * mask[:, None, :]).sum(dim=2).clamp_(0.0, 1.0).to(torch.float32)

    out = restore_kind(scores, was_numpy, batched)
    if not return_rank:
        return out
    if not batched:
        return out, int(k[0])
    return out, (k.cpu().numpy() if was_numpy else k)
