"""Toy matrices for notebook 01: small, seeded matrices whose leverage scores are easy to reason about.

Every generator takes ``rng`` — a ``numpy.random.Generator`` or an int seed (turned into
``np.random.default_rng(seed)``) — and never touches a global RNG. Matrices come back as float32
numpy arrays with one token (row) per line:

- :func:`low_rank`        rank-r signal with a decaying spectrum plus isotropic noise, (n, d)
- :func:`with_outliers`   a low-rank matrix plus a few rows along directions nobody else uses
- :func:`with_duplicates` a matrix with chosen rows repeated (duplicates split their leverage)
- :func:`clusters`        Gaussian clusters of unequal sizes (small clusters = rare tokens)
- :func:`point_cloud`     an elongated 2-D or 3-D cloud for the geometric picture of leverage
- :func:`token_grid`      a 24×24 "image" of tokens: background, one rare object, a few loud tokens
- :func:`clip_like`       CLIP-like features (a shared offset, a few strong directions, a decaying
                          spectrum, noise), (n, d) or (B, n, d) — also used by the speed benchmark
- :func:`synthetic_attention` stand-in attention signals for the attention-based selectors
- :func:`image_patches`   the 14×14 RGB patches of a real image (skimage's astronaut), (576, 588)
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "as_rng",
    "low_rank",
    "with_outliers",
    "with_duplicates",
    "clusters",
    "point_cloud",
    "token_grid",
    "clip_like",
    "image_patches",
    "synthetic_attention",
    "TOKEN_KINDS",
]

#: label values of :func:`token_grid`
TOKEN_KINDS = ("background", "object", "loud")


def as_rng(rng: Any) -> np.random.Generator:
    """``rng`` itself if it is a ``numpy.random.Generator``, else ``np.random.default_rng(rng)`` (an int seed)."""
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or isinstance(rng, bool) or not isinstance(rng, (int, np.integer)):
        raise ValueError(f"rng must be a numpy Generator or an int seed, got {rng!r}")
    return np.random.default_rng(int(rng))


def _orthonormal(rng: np.random.Generator, d: int, m: int) -> np.ndarray:
    """m orthonormal columns in R^d (m <= d), shape (d, m)."""
    Q, _ = np.linalg.qr(rng.standard_normal((d, m)))
    return Q


def low_rank(
    n: int = 200, d: int = 50, rank: int = 5, noise: float = 0.05, decay: float = 0.7, *, rng: Any
) -> np.ndarray:
    """X = A diag(s) Bᵀ + noise: a rank-``rank`` signal with singular values s_j ∝ decay^j plus
    isotropic Gaussian noise of standard deviation ``noise`` per entry.

    Returns X of shape (n, d), float32. The top singular value of the signal is about √n.
    """
    g = as_rng(rng)
    if not 1 <= rank <= min(n, d):
        raise ValueError(f"rank must lie in [1, min(n, d)] = [1, {min(n, d)}], got {rank}")
    A = _orthonormal(g, n, rank)
    B = _orthonormal(g, d, rank)
    s = np.sqrt(n) * decay ** np.arange(rank)
    X = (A * s) @ B.T + noise * g.standard_normal((n, d))
    return X.astype(np.float32)


def with_outliers(
    X: np.ndarray, n_outliers: int = 3, scale: float = 1.0, energy: float = 0.99, *, rng: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Append ``n_outliers`` rows, each along its own random direction orthogonal to X's dominant
    row space (the fewest top right singular vectors holding an ``energy`` share of ‖X‖_F²).

    Each outlier has the norm ``scale`` × (median row norm of X). Returns (X_out (n + n_outliers, d)
    float32, indices of the outliers (n_outliers,)).
    """
    g = as_rng(rng)
    X = np.asarray(X, dtype=np.float64)
    n, d = X.shape
    _, s, Vt = np.linalg.svd(X, full_matrices=True)
    share = np.cumsum(s**2) / max(float(np.sum(s**2)), np.finfo(float).tiny)
    r = int(np.searchsorted(share, energy - 1e-12) + 1)
    if n_outliers > d - r:
        raise ValueError(f"only {d - r} directions lie outside X's dominant row space; asked for {n_outliers}")
    free = Vt[r:].T  # (d, d - r): orthogonal complement of the dominant row space
    dirs = free @ _orthonormal(g, d - r, n_outliers)  # (d, n_outliers), orthonormal
    norm = scale * float(np.median(np.linalg.norm(X, axis=1)))
    out = np.vstack([X, norm * dirs.T]).astype(np.float32)
    return out, np.arange(n, n + n_outliers)


def with_duplicates(X: np.ndarray, rows: Any, copies: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """X with each of ``rows`` repeated so that it appears ``copies`` times in total (copies appended).

    Returns (X_dup (n + len(rows)·(copies − 1), d), groups (n_total,)): ``groups[i]`` is the original
    row index token i copies (itself for the original rows). Deterministic; no randomness.
    """
    X = np.asarray(X)
    rows = np.atleast_1d(np.asarray(rows, dtype=int))
    if copies < 1:
        raise ValueError(f"copies must be >= 1, got {copies}")
    extra = np.repeat(rows, copies - 1)
    groups = np.concatenate([np.arange(X.shape[0]), extra])
    return np.vstack([X, X[extra]]).astype(np.float32), groups


def clusters(
    sizes: tuple[int, ...] = (120, 60, 15, 5), d: int = 20, spread: float = 0.3, *, rng: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian clusters of unequal sizes around orthogonal unit centres.

    Cluster c has ``sizes[c]`` points x = e_c + spread · ε (ε ~ N(0, I/d), so the within-cluster spread
    has norm ≈ ``spread``). Returns (X (Σ sizes, d) float32, labels (Σ sizes,) int).
    """
    g = as_rng(rng)
    if len(sizes) > d:
        raise ValueError(f"need d >= number of clusters ({len(sizes)}), got d = {d}")
    centres = _orthonormal(g, d, len(sizes)).T  # (C, d)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    X = centres[labels] + spread * g.standard_normal((labels.size, d)) / np.sqrt(d)
    return X.astype(np.float32), labels


def point_cloud(n: int = 300, dim: int = 2, axes: tuple[float, ...] | None = None, *, rng: Any) -> np.ndarray:
    """An elongated, centred Gaussian cloud: n points, standard deviations ``axes`` along rotated axes.

    Default axes: (3, 0.6) in 2-D and (3, 1, 0.3) in 3-D. The cloud is rotated by a random orthogonal
    matrix so the long axis is not a coordinate axis. Returns X (n, dim), float32.
    """
    g = as_rng(rng)
    if dim not in (2, 3):
        raise ValueError(f"dim must be 2 or 3, got {dim}")
    axes = axes or ((3.0, 0.6) if dim == 2 else (3.0, 1.0, 0.3))
    if len(axes) != dim:
        raise ValueError(f"axes must have {dim} entries, got {axes}")
    Z = g.standard_normal((n, dim)) * np.asarray(axes, dtype=float)
    return (Z @ _orthonormal(g, dim, dim).T).astype(np.float32)


def token_grid(
    grid: tuple[int, int] = (24, 24),
    d: int = 64,
    bg_rank: int = 6,
    object_box: tuple[int, int, int, int] = (14, 5, 18, 9),
    n_loud: int = 24,
    loud_scale: float = 3.0,
    noise: float = 0.15,
    *,
    rng: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """A toy image of H×W tokens with three kinds of token (raster order, like ViT patches).

    - background: a shared offset m (‖m‖ = 1) plus a smooth low-rank field (``bg_rank`` directions
      whose coefficients vary slowly over the grid) plus noise;
    - object: the tokens inside ``object_box`` = (row0, col0, row1, col1) (end-exclusive), which add
      a direction u (‖u‖ = 1, orthogonal to the background's) and a little texture in two more
      directions of their own — rare content;
    - loud: ``n_loud`` background tokens (outside the object) whose offset is ``loud_scale`` × m —
      high norm, but along the direction every token already shares (like CLIP's high-norm tokens).

    Returns (X (H·W, d) float32, labels (H·W,) int with values indexing :data:`TOKEN_KINDS`).
    """
    g = as_rng(rng)
    H, W = grid
    N = H * W
    basis = _orthonormal(g, d, bg_rank + 4)  # columns: offset m, object u, 2 object textures, background
    m, u, T, V = basis[:, 0], basis[:, 1], basis[:, 2:4], basis[:, 4:]
    rows, cols = np.divmod(np.arange(N), W)
    # smooth background coefficients: random low-frequency waves over the grid, one per direction
    coef = np.empty((N, bg_rank))
    for j in range(bg_rank):
        fy, fx = g.uniform(0.5, 2.0, size=2)
        py, px = g.uniform(0, 2 * np.pi, size=2)
        coef[:, j] = 0.5 * 0.8**j * np.sin(2 * np.pi * fy * rows / H + py) * np.cos(2 * np.pi * fx * cols / W + px)
    X = m[None, :] + coef @ V.T + noise * g.standard_normal((N, d)) / np.sqrt(d)
    labels = np.zeros(N, dtype=int)
    r0, c0, r1, c1 = object_box
    obj = (rows >= r0) & (rows < r1) & (cols >= c0) & (cols < c1)
    X[obj] += u[None, :] + 0.3 * g.standard_normal((int(obj.sum()), 2)) @ T.T
    labels[obj] = 1
    loud = g.choice(np.flatnonzero(~obj), size=n_loud, replace=False)
    X[loud] += (loud_scale - 1.0) * m[None, :]
    labels[loud] = 2
    return X.astype(np.float32), labels


def clip_like(
    n: int = 576,
    d: int = 1024,
    batch: int | None = None,
    n_strong: int = 4,
    decay: float = 0.9,
    noise: float = 0.05,
    n_loud: int = 4,
    *,
    rng: Any,
) -> np.ndarray:
    """Synthetic CLIP-like patch features: what vision-tower outputs look like to an SVD.

    Per sample: a shared offset (every token has it), ``n_strong`` strong directions with per-token
    coefficients, a bulk whose singular values decay as j^(−``decay``) over min(n, d)/2 directions,
    isotropic noise (``noise`` per entry, relative to the bulk's scale) and ``n_loud`` high-norm tokens
    (5× the offset). Row norms are ≈ √d like real activations. Returns (n, d) or (batch, n, d), float32.
    """
    g = as_rng(rng)

    def one() -> np.ndarray:
        r = max(1, min(n, d) // 2)
        basis = _orthonormal(g, d, 1 + n_strong + r)
        mean, S, V = basis[:, 0], basis[:, 1 : 1 + n_strong], basis[:, 1 + n_strong :]
        strong = g.standard_normal((n, n_strong)) * np.linspace(3.0, 1.5, n_strong)
        bulk = g.standard_normal((n, r)) * (np.arange(1, r + 1) ** -decay)
        X = 2.0 * mean + strong @ S.T + bulk @ V.T + noise * g.standard_normal((n, d)) / np.sqrt(d) * np.sqrt(r)
        loud = g.choice(n, size=min(n_loud, n), replace=False)
        X[loud] += 8.0 * mean
        return X * np.sqrt(d) / 4.0

    if batch is None:
        return one().astype(np.float32)
    return np.stack([one() for _ in range(int(batch))]).astype(np.float32)


def image_patches(image: np.ndarray | None = None, patch: int = 14, size: int = 336) -> tuple[np.ndarray, np.ndarray]:
    """Cut an RGB image into non-overlapping ``patch``×``patch`` patches, as a ViT does.

    The image (default: ``skimage.data.astronaut()``, bundled, no network) is resized to
    ``size``×``size`` with anti-aliasing. Returns (patches (G·G, patch·patch·3) float32 in [0, 1] with
    G = size // patch, raster order, each row the patch's pixels flattened as (row, col, channel);
    resized image (size, size, 3) float32 in [0, 1]). Default: (576, 588) and (336, 336, 3).
    """
    from skimage import data
    from skimage.transform import resize

    if size % patch:
        raise ValueError(f"size ({size}) must be a multiple of patch ({patch})")
    img = data.astronaut() if image is None else np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] < 3:
        raise ValueError(f"image must be (H, W) or (H, W, 3), got shape {img.shape}")
    img = img[..., :3]
    scale = 255.0 if img.dtype.kind in "ui" else 1.0
    small = resize(img.astype(np.float64) / scale, (size, size), anti_aliasing=True, preserve_range=True)
    small = np.clip(small, 0.0, 1.0).astype(np.float32)
    G = size // patch
    patches = small.reshape(G, patch, G, patch, 3).transpose(0, 2, 1, 3, 4).reshape(G * G, patch * patch * 3)
    return np.ascontiguousarray(patches), small


def synthetic_attention(
    X: np.ndarray,
    kind: str = "cls",
    temperature: float = 1.0,
    position_weight: float = 2.0,
    *,
    rng: Any,
) -> np.ndarray:
    """A stand-in attention distribution over the N tokens of X (N, d), for toy runs of the
    attention-based selectors (``cls_attention``, ``fastv``) where no model exists. Not a real model's
    attention — only its two caricatured traits:

    - ``kind="cls"``: softmax(cos(x_i, x̄) / temperature + small noise) — a CLS-like query that attends
      to tokens aligned with the average content (what FasterVLM/VisionZip rank by);
    - ``kind="last"``: the same plus ``position_weight`` · i / (N − 1) in the logits — the drift towards
      late tokens that a last-text-token query shows under RoPE (what FastV ranks by).

    Returns a float32 vector (N,) summing to 1.
    """
    g = as_rng(rng)
    A = np.asarray(X, dtype=np.float64)
    if A.ndim != 2:
        raise ValueError(f"X must be (N, d), got shape {A.shape}")
    if kind not in ("cls", "last"):
        raise ValueError(f"kind must be 'cls' or 'last', got {kind!r}")
    q = A.mean(axis=0)
    cos = (A @ q) / (np.linalg.norm(A, axis=1) * np.linalg.norm(q) + 1e-12)
    logits = cos / temperature + 0.1 * g.standard_normal(A.shape[0])
    if kind == "last":
        logits = logits + position_weight * np.arange(A.shape[0]) / max(A.shape[0] - 1, 1)
    w = np.exp(logits - logits.max())
    return (w / w.sum()).astype(np.float32)
