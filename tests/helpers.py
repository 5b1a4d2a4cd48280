"""Small matrix factories shared by the unit tests (seeded, explicit rng)."""

import numpy as np


def spectrum_matrix(N, d, sigmas, seed=0, dtype=np.float64):
    """X = U diag(sigmas) Vᵀ with random orthonormal U (N×r), V (d×r): a known, gapped spectrum."""
    rng = np.random.default_rng(seed)
    r = len(sigmas)
    U, _ = np.linalg.qr(rng.standard_normal((N, r)))
    V, _ = np.linalg.qr(rng.standard_normal((d, r)))
    return ((U * np.asarray(sigmas, dtype=float)) @ V.T).astype(dtype)


def clip_like(N, d, seed=0, dtype=np.float32):
    """Token matrix with a few strong directions, a decaying tail and noise (CLIP-feature-like)."""
    rng = np.random.default_rng(seed)
    r = min(N, d, 48)
    sig = 50.0 * 0.85 ** np.arange(r)
    X = spectrum_matrix(N, d, sig, seed=seed) + 0.05 * rng.standard_normal((N, d))
    return X.astype(dtype)


def reference_leverage(X, k):
    U, _, _ = np.linalg.svd(np.asarray(X, dtype=np.float64), full_matrices=False)
    return (U[:, :k] ** 2).sum(axis=1)
