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


def kept_rows_reference(model, hidden, rows, attention_mask, start, positions, position_ids):
    """A hand-built run of a cut inside the language model (FastV's), from transformers' own parts: the decoder's
    input at layer ``start`` (``hidden``, (B, L, h), e.g. captured by a pre-hook) kept at the columns ``rows``
    (B, n, ascending), causal among the kept columns in their original order with padding masked, rotary embeddings
    at ``positions``, each later layer called with ``position_ids``, then the final norm and head.
    Returns (logits (B, n, vocab), real (B, n): the kept columns that are not padding)."""
    import torch

    lm = model.model.language_model
    hid = hidden.gather(1, rows[..., None].expand(-1, -1, hidden.shape[-1]))
    real = attention_mask.gather(1, rows).bool()
    allowed = (rows[:, None, :] <= rows[:, :, None]) & real[:, None, :]
    mask = torch.where(allowed, 0.0, torch.finfo(hid.dtype).min)[:, None]
    pe = lm.rotary_emb(hid, positions)
    with torch.no_grad():
        for layer in lm.layers[start:]:
            hid = layer(hid, attention_mask=mask, position_ids=position_ids, position_embeddings=pe)
            hid = hid[0] if isinstance(hid, tuple) else hid
        return model.lm_head(lm.norm(hid)), real


def load_benchmark(name):
    """The module of ``benchmarks/<name>.py`` (scripts, not a package)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
