"""Why the exact leverage path stays in fp64: scores from an fp32 Gram matrix corrected in fp64, against fp64.

A probe behind benchmarks/README.md ("Selection at LLaVA-NeXT and Qwen2.5-VL sizes"), not a library path. On the
``--large`` shapes of ``leverage_speed.py`` (``clip_like`` matrices, seed 0) it forms the Gram matrix of the smaller
side in fp32, takes its top-(k + p) eigenvectors (SciPy's MRRR), optionally removes the r strongest directions in
fp64 first (found by fp64 subspace iteration on X), optionally applies one fp64 subspace-iteration step, and ends
with an fp64 Rayleigh–Ritz step on X (the SVD of X restricted to the candidate subspace). It prints the largest
score error against fp64 ``numpy.linalg.svd`` and whether the top-k set is the reference's, at k = 16 and 64.

    OMP_NUM_THREADS=2 python benchmarks/mixed_precision_probe.py        # under a minute on 2 cores; output: mixed_precision_probe_cpu.md
"""

from __future__ import annotations

import argparse

import numpy as np
import scipy.linalg
import torch

from svdprune_utils.notebook.toy import clip_like

SHAPES = [(2880, 1024), (8192, 1280), (2880, 4096)]


def strongest(A: torch.Tensor, r: int, iters: int = 30) -> torch.Tensor:
    """The r strongest right singular directions of A (n, m), fp64, by subspace iteration with 4 extra columns."""
    g = torch.Generator().manual_seed(0)
    V = torch.randn(A.shape[1], r + 4, generator=g, dtype=torch.float64)
    for _ in range(iters):
        V = torch.linalg.qr(A.T @ (A @ V))[0]
    _, _, Vh = torch.linalg.svd(A @ V, full_matrices=False)
    return V @ Vh.T[:, :r]


def mixed_scores(X: np.ndarray, k: int, p: int, deflate: int, step: bool) -> np.ndarray:
    """Rank-k leverage of the rows of X from the fp32 Gram matrix's top-(k + p) eigenvectors, corrected in fp64."""
    N, d = X.shape
    A = torch.from_numpy(X).double()
    if N <= d:  # work on the orientation whose Gram matrix is the smaller one: rows of A are the long side
        A = A.T
    m = A.shape[1]
    D = strongest(A, deflate) if deflate else A.new_zeros(m, 0)
    A32 = (A - (A @ D) @ D.T).float()
    c = min(m, k + p)
    _, V = scipy.linalg.eigh((A32.T @ A32).numpy(), subset_by_index=[m - c, m - 1], driver="evr")
    V = torch.linalg.qr(torch.cat([D, torch.from_numpy(V).double()], 1))[0]
    if step:
        V = torch.linalg.qr(A.T @ (A @ V))[0]
    Q, R = torch.linalg.qr(A @ V)  # A V = Q R; the SVD of R is that of A on span(V)
    Ur, _, Vrh = torch.linalg.svd(R)
    top = Q @ Ur[:, :k] if N > d else V @ Vrh.T[:, :k]  # the top-k singular vectors on the token side
    return (top**2).sum(1).numpy()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.parse_args(argv)
    print("| shape N×d | k | p | fp64 deflation r | fp64 subspace step | max abs error | top-k identical |")
    print("|---|---:|---:|---:|---|---:|---|")
    for N, d in SHAPES:
        X = clip_like(N, d, rng=0)
        U = np.linalg.svd(X.astype(np.float64), full_matrices=False)[0]
        for k in (16, 64):
            ref = (U[:, :k] ** 2).sum(1)
            top_ref = set(np.argsort(-ref, kind="stable")[:k])
            for p, r, step in [(16, 0, False), (16, 0, True), (128, 0, False), (128, 0, True), (64, 8, False)]:
                got = mixed_scores(X, k, p, r, step)
                same = set(np.argsort(-got, kind="stable")[:k]) == top_ref
                print(f"| {N}×{d} | {k} | {p} | {r} | {'yes' if step else 'no'} | "
                      f"{np.abs(got - ref).max():.1e} | {'yes' if same else 'no'} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
