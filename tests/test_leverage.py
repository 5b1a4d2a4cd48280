"""leverage_scores: exactness, invariances, rank rules, dtypes and bad input."""

import numpy as np
import pytest
import torch
from helpers import clip_like, load_benchmark, reference_leverage, spectrum_matrix
from hypothesis import example, given, settings
from hypothesis import strategies as st

from svdprune_utils import leverage_scores, select_tokens

GAPPED = [10.0, 8.0, 6.0, 5.0, 4.0, 3.0, 0.5, 0.4, 0.3, 0.2]


@pytest.mark.parametrize("method", ["exact", "exact-svd"])
@pytest.mark.parametrize("shape", [(64, 128), (128, 40), (576, 1024)])
def test_exact_matches_numpy_fp64_svd(method, shape):
    X = clip_like(*shape, seed=1)
    for k in (1, 6, 16):
        s = leverage_scores(X, rank=k, method=method)
        assert s.dtype == np.float32 and s.shape == (shape[0],)
        np.testing.assert_allclose(s, reference_leverage(X, k), atol=1e-6)


def test_batched_equals_each_sample():
    X = np.stack([clip_like(80, 50, seed=s) for s in range(3)])
    batch, ks = leverage_scores(torch.tensor(X), rank=0.8, return_rank=True)
    assert batch.shape == (3, 80) and ks.shape == (3,)
    for b in range(3):
        one, k = leverage_scores(torch.tensor(X[b]), rank=0.8, return_rank=True)
        assert k == int(ks[b])
        torch.testing.assert_close(batch[b], one, atol=1e-6, rtol=0)


matrices = st.builds(
    lambda n, d, r, seed: spectrum_matrix(n, d, np.linspace(5.0, 1.0, min(r, n, d)), seed=seed)
    + 1e-3 * np.random.default_rng(seed + 1).standard_normal((n, d)),
    st.integers(4, 40), st.integers(3, 40), st.integers(1, 12), st.integers(0, 10**6),
)


@settings(max_examples=40, deadline=None)
@given(X=matrices, k=st.integers(1, 10))
@example(X=spectrum_matrix(7, 7, np.linspace(5.0, 1.0, 1), seed=7926)  # rank 6 by the rule: sigma_min 3.5e-6
         + 1e-3 * np.random.default_rng(7927).standard_normal((7, 7)), k=7)
def test_scores_in_unit_interval_and_sum_to_k(X, k):
    s, used = leverage_scores(X, rank=k, return_rank=True)
    # k clamped to the numerical rank: singular values above max(n, d) * eps(fp32) * sigma_max (the documented
    # rule of the default "exact" method; the noise usually makes X full rank, but a square noisy X can have a
    # smallest singular value below that)
    sigma = np.linalg.svd(X, compute_uv=False)
    assert used == min(k, int((sigma > max(X.shape) * np.finfo(np.float32).eps * sigma[0]).sum()))
    assert np.all(s >= 0) and np.all(s <= 1)
    assert s.sum() == pytest.approx(used, abs=1e-4)


@settings(max_examples=30, deadline=None)
@given(X=matrices, k=st.integers(1, 10))
def test_equals_hat_matrix_diagonal(X, k):
    s, used = leverage_scores(X, rank=k, return_rank=True)
    U, S, Vt = np.linalg.svd(X, full_matrices=False)
    Xk = (U[:, :used] * S[:used]) @ Vt[:used]
    H = Xk @ np.linalg.pinv(Xk, rcond=1e-10)
    np.testing.assert_allclose(s, np.diag(H), atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(X=matrices, seed=st.integers(0, 10**6), scale=st.floats(1e-3, 1e3))
def test_permutation_equivariant_rotation_and_scale_invariant(X, seed, scale):
    rng = np.random.default_rng(seed)
    k = max(1, min(X.shape) // 2)
    base = leverage_scores(X, rank=k)
    perm = rng.permutation(X.shape[0])
    np.testing.assert_allclose(leverage_scores(X[perm], rank=k), base[perm], atol=1e-5)
    Q, _ = np.linalg.qr(rng.standard_normal((X.shape[1], X.shape[1])))
    np.testing.assert_allclose(leverage_scores(X @ Q, rank=k), base, atol=1e-5)
    np.testing.assert_allclose(leverage_scores(X * scale, rank=k), base, atol=1e-5)


def test_rank_is_clamped_to_numerical_rank():
    X = spectrum_matrix(50, 30, [5, 4, 3, 2, 1], seed=3).astype(np.float32)
    s, k = leverage_scores(X, rank=25, return_rank=True)
    assert k == 5
    assert s.sum() == pytest.approx(5.0, abs=1e-4)
    s1, k1 = leverage_scores(X, rank=1.0, return_rank=True)
    assert k1 == 5
    np.testing.assert_allclose(s1, s, atol=1e-6)


def test_energy_rule_picks_smallest_k_reaching_the_share():
    sig = np.array(GAPPED)
    X = spectrum_matrix(60, 40, sig, seed=4)
    share = np.cumsum(sig**2) / np.sum(sig**2)
    for frac in (0.2, 0.5, 0.8, 0.9, 0.95, 0.99):
        _, k = leverage_scores(X, rank=frac, return_rank=True)
        assert k == int(np.argmax(share >= frac)) + 1
        assert share[k - 1] >= frac and (k == 1 or share[k - 2] < frac)


@pytest.mark.parametrize("bad", [0, -3, 0.0, 1.5, -0.2, True, "16", None])
def test_bad_rank_raises(bad):
    with pytest.raises(ValueError, match="rank"):
        leverage_scores(clip_like(20, 10), rank=bad)


def test_rank_has_no_default():
    # notebook 04: no budget-free rank selects well (energy 0.9 keeps the background), so callers choose
    with pytest.raises(TypeError, match="rank"):
        leverage_scores(clip_like(20, 10))


def test_center_equals_scores_of_centered_matrix():
    X = clip_like(70, 30, seed=5) + 3.0
    np.testing.assert_allclose(
        leverage_scores(X, rank=6, center=True), leverage_scores(X - X.mean(0), rank=6), atol=1e-6
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_low_precision_input_is_computed_in_high_precision(dtype):
    X = torch.tensor(clip_like(96, 64, seed=6)).to(dtype)
    s = leverage_scores(X, rank=8)
    assert s.dtype == torch.float32 and s.device == X.device
    ref = reference_leverage(X.double().numpy(), 8)
    np.testing.assert_allclose(s.numpy(), ref, atol=1e-6)


def test_returns_same_kind_and_does_not_mutate():
    X = clip_like(40, 20, seed=7)
    Xc = X.copy()
    assert isinstance(leverage_scores(X, rank=3), np.ndarray)
    np.testing.assert_array_equal(X, Xc)
    T = torch.tensor(X)
    Tc = T.clone()
    assert isinstance(leverage_scores(T, rank=3), torch.Tensor)
    assert torch.equal(T, Tc)


@pytest.mark.parametrize("shape", [(40, 20), (1100, 1024)])  # the full eigh and the top-k path
def test_fp64_input_is_not_scaled_in_place(shape):
    """fp64 input needs no dtype conversion, and unit_scale divides by a power of two: the copy must still be made
    (a peak of 1000 gives scale 1024, so an in-place division would show)."""
    from svdprune_utils.core.validate import unit_scale

    X = clip_like(*shape, seed=7).astype(np.float64)
    X *= 1000.0 / np.abs(X).max()
    Xc = X.copy()
    T = torch.tensor(X)
    Tc = T.clone()
    leverage_scores(X, rank=3)
    leverage_scores(T, rank=3)
    unit_scale(T[None])
    np.testing.assert_array_equal(X, Xc)
    assert torch.equal(T, Tc)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_one_non_finite_entry_is_found_wherever_it_sits(dtype, bad):
    """The finiteness check reduces with aminmax (no mask): a single NaN or Inf at the first, a middle or the last
    entry, in any SIMD lane, is still reported."""
    base = torch.tensor(clip_like(37, 29, seed=1)).to(dtype)
    for flat in (0, 1, 17, 500, base.numel() - 2, base.numel() - 1):
        X = base.clone()
        X.view(-1)[flat] = bad
        kind = "1 NaN, 0 Inf" if bad != bad else "0 NaN, 1 Inf"
        with pytest.raises(ValueError, match=rf"1 non-finite value\(s\) \({kind}\)"):
            leverage_scores(X, rank=2)


def test_zero_matrix_has_rank_zero_and_zero_scores():
    s, k = leverage_scores(np.zeros((10, 4), np.float32), rank=3, return_rank=True)
    assert k == 0 and np.all(s == 0)


def test_approx_is_seeded_close_to_exact_and_leaves_global_rng_alone():
    X = torch.tensor(spectrum_matrix(300, 200, GAPPED, seed=8), dtype=torch.float32)
    state = torch.random.get_rng_state()
    a = leverage_scores(X, rank=6, method="approx", seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = leverage_scores(X, rank=6, method="approx", seed=3)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, leverage_scores(X, rank=6), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="int rank"):
        leverage_scores(X, rank=0.9, method="approx")


@pytest.mark.parametrize(
    "X, match",
    [
        (np.arange(12).reshape(3, 4), "dtype int64"),
        (torch.ones(3, 4, dtype=torch.int32), "torch.int32"),
        (np.ones(5, np.float32), r"shape \(5,\)"),
        (np.ones((2, 2, 2, 2), np.float32), r"shape \(2, 2, 2, 2\)"),
        (np.ones((0, 4), np.float32), "empty"),
        ([[1.0, 2.0]], "numpy.ndarray"),
        (np.ones((3, 4), np.longdouble), "float16, float32 or float64"),
        (torch.eye(4).to_sparse(), "dense"),
    ],
)
def test_bad_input_names_the_problem(X, match):
    with pytest.raises(ValueError, match=match):
        leverage_scores(X, rank=1)


@pytest.mark.parametrize("kwargs, match", [
    ({"oversample": -1}, "oversample"), ({"oversample": -5}, "oversample"), ({"oversample": 1.5}, "oversample"),
    ({"niter": -1}, "niter"), ({"niter": 1.5}, "niter"), ({"seed": 1.5}, "seed"), ({"seed": "a"}, "seed"),
    ({"seed": None}, "seed"), ({"seed": True}, "seed"), ({"center": "no"}, "center"), ({"center": 1}, "center"),
    ({"return_rank": "no"}, "return_rank"),
])
@pytest.mark.parametrize("method", ["exact", "approx"])
def test_bad_options_name_the_problem(kwargs, match, method):
    """A negative oversample used to shrink q below k silently (scores summing to 2 at rank 3, or all zeros), a
    negative niter ran, float seeds were truncated and the string "no" switched centring on."""
    with pytest.raises(ValueError, match=match):
        leverage_scores(clip_like(30, 12), rank=3, method=method, **kwargs)


def test_non_finite_input_names_the_count():
    X = clip_like(10, 5)
    X[0, 0] = np.nan
    X[3, 1] = np.inf
    X[4, 2] = -np.inf
    with pytest.raises(ValueError, match=r"3 non-finite value\(s\) \(1 NaN, 2 Inf\)"):
        leverage_scores(X, rank=2)


def test_unknown_method():
    with pytest.raises(ValueError, match="method"):
        leverage_scores(clip_like(10, 5), rank=2, method="qr")


@pytest.mark.parametrize("scale", [1e-200, 1e-160, 1e155, 1e300])
@pytest.mark.parametrize("method", ["exact", "exact-svd"])
def test_fp64_scale_does_not_matter(scale, method):
    X = clip_like(64, 24, seed=3).astype(np.float64)
    ref, k_ref = leverage_scores(X, rank=8, method=method, return_rank=True)
    got, k = leverage_scores(X * scale, rank=8, method=method, return_rank=True)
    assert k == k_ref == 8 and got.sum() == pytest.approx(8.0, abs=1e-4)
    np.testing.assert_allclose(got, ref, atol=1e-6)


@pytest.mark.parametrize("method", ["exact", "exact-svd"])
def test_a_peak_near_the_fp64_maximum_is_scored(method):
    """A largest entry above 2^1023.5 used to round to the scale 2^1024 = inf, which zeroed the matrix and every
    score; the scale now stops at 2^1023."""
    X = clip_like(64, 24, seed=3).astype(np.float64)
    ref = leverage_scores(X, rank=8, method=method)
    for peak in (1.5e308, np.finfo(np.float64).max):
        got = leverage_scores(X / np.abs(X).max() * peak, rank=8, method=method)
        np.testing.assert_allclose(got, ref, atol=1e-6)


@pytest.mark.parametrize("method", ["norm", "divprune", "svd", "pivoted_qr"])
def test_selectors_are_scale_invariant(method):
    X = clip_like(64, 24, seed=4).astype(np.float64)
    ref = select_tokens(X, 10, method)
    for scale in (1e-200, 1e155, 1e300):
        assert torch.equal(select_tokens(X * scale, 10, method), ref)


def test_approx_batch_equals_each_sample_alone():
    X = np.stack([clip_like(96, 32, seed=s) for s in range(4)])
    batch = leverage_scores(X, rank=12, method="approx", seed=7)
    for b in range(4):
        np.testing.assert_array_equal(batch[b], leverage_scores(X[b], rank=12, method="approx", seed=7))
    kept = select_tokens(X, 12, "svd", solver="approx", seed=7)
    for b in range(4):
        assert torch.equal(kept[b], select_tokens(X[b], 12, "svd", solver="approx", seed=7))


@pytest.mark.parametrize("shape", [(90, 300), (300, 90), (120, 120)])
@pytest.mark.parametrize("k", [1, 7, 40])
def test_top_k_path_equals_the_full_spectrum_in_fp64(shape, k):
    """The exact path computes only the top-k eigenpairs for k <= min(N, d)/3 on the CPU: its fp64 squared left
    singular vectors equal those of the full Gram eigh (and of numpy's fp64 SVD) to round-off."""
    from svdprune_utils.core import leverage as L

    g = torch.Generator().manual_seed(k)
    X = L.unit_scale(torch.randn(2, *shape, generator=g, dtype=torch.float64))
    sig, usq = L._exact_topk(X, k, 1e-6)
    full_sig, full_usq = L._exact_gram(X)
    assert usq.shape == (2, shape[0], k)
    torch.testing.assert_close(sig, full_sig[:, :k], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(usq.sum(-1), full_usq[..., :k].sum(-1), atol=1e-10, rtol=0)
    ref = np.stack([reference_leverage(X[b].numpy(), k) for b in range(2)])
    np.testing.assert_allclose(leverage_scores(X, k).numpy(), ref, atol=1e-6)


@pytest.mark.parametrize("shape", [(90, 300), (300, 90)])  # blocks of columns (X Xᵀ) and of rows (Xᵀ X)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("center", [False, True])
def test_top_k_path_reads_blocks_of_any_dtype_as_unit_scale_and_centring_would(monkeypatch, shape, dtype, center):
    """The top-k path converts X to fp64 a block at a time instead of copying the whole of it (unit_scale): with blocks
    of 37 rows or columns (the last one partial) and a strided view, each dtype and centring give the eigenpairs of
    the full fp64 Gram eigh of the scaled (centred) copy."""
    from svdprune_utils.core import leverage as L

    monkeypatch.setattr(L, "BLOCK_BYTES", 8 * 37 * max(shape))
    g = torch.Generator().manual_seed(3)
    X = (torch.randn(2, *shape, generator=g, dtype=torch.float64) * 100.0 + 40.0).to(dtype)
    W = L.unit_scale(X)
    if center:
        W = W - W.mean(dim=1, keepdim=True)
    full_sig, full_usq = L._exact_gram(W)
    strided = X.transpose(1, 2).contiguous().transpose(1, 2)
    for T in (X, strided):
        sig, usq = L._exact_topk(T, 7, 1e-6, center)
        torch.testing.assert_close(sig, full_sig[:, :7], atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(usq.sum(-1), full_usq[..., :7].sum(-1), atol=1e-10, rtol=0)


@pytest.mark.parametrize("shape", [(90, 300), (300, 90)])
def test_top_k_path_is_scale_invariant_to_the_ends_of_fp64(shape):
    """The blocks are scaled by unit_scale's power of two: a matrix scaled by 1e-200 or 1e300, or with its peak at the
    fp64 maximum, scores as the unscaled one."""
    from svdprune_utils.core import leverage as L

    X = clip_like(*shape, seed=9).astype(np.float64)
    ref = L._exact_topk(torch.tensor(X)[None], 8, 1e-6)[1].sum(-1)
    for Y in (X * 1e-200, X * 1e300, X / np.abs(X).max() * np.finfo(np.float64).max):
        got = L._exact_topk(torch.tensor(Y)[None], 8, 1e-6)[1].sum(-1)
        torch.testing.assert_close(got, ref, atol=1e-10, rtol=0)


def test_top_k_path_falls_back_when_the_numerical_rank_is_below_k():
    from svdprune_utils.core import leverage as L

    g = torch.Generator().manual_seed(0)
    X = torch.randn(1, 100, 6, generator=g, dtype=torch.float64) @ torch.randn(1, 6, 400, generator=g,
                                                                                dtype=torch.float64)
    assert L._exact_topk(L.unit_scale(X), 20, 1e-6) is None  # rank 6 < 20: the full spectrum counts it
    scores, k = leverage_scores(X, 20, return_rank=True)
    assert k == 6
    np.testing.assert_allclose(scores[0].numpy(), reference_leverage(X[0].numpy(), 6), atol=1e-6)


def test_large_matrices_take_the_top_k_path_and_match_fp64(monkeypatch):
    """From min(N, d) = 1024 on (LLaVA-NeXT / Qwen2.5-VL sizes) an int rank runs the top-k eigensolver: the scores
    equal a fp64 numpy SVD to 1e-6 and the top-64 set is the reference's; below that size the full eigh runs."""
    from svdprune_utils.core import leverage as L

    calls = []
    orig = L._exact_topk
    monkeypatch.setattr(L, "_exact_topk", lambda *a: calls.append(a[0].shape) or orig(*a))
    X = clip_like(1100, 1024, seed=3)
    for k in (16, 64):
        got = leverage_scores(X, k)
        ref = reference_leverage(X, k)
        np.testing.assert_allclose(got, ref, atol=1e-6)
        assert set(np.argsort(-got, kind="stable")[:64]) == set(np.argsort(-ref, kind="stable")[:64])
    assert calls == [(1, 1100, 1024)] * 2
    Xc = X + 0.5  # centring on the top-k path: the scores of the centred matrix
    np.testing.assert_allclose(leverage_scores(Xc, 16, center=True), reference_leverage(X - X.mean(0), 16), atol=1e-6)
    assert len(calls) == 3
    leverage_scores(clip_like(1100, 1000, seed=3), 16)  # min(N, d) = 1000 < 1024: the full eigh
    leverage_scores(X, 400)  # k > m / 3: the full eigh
    assert len(calls) == 3


@pytest.mark.parametrize("shape", [(300, 120), (120, 300)])  # both orientations of the smaller Gram side
@pytest.mark.parametrize("p, deflate, step", [(8, 0, False), (8, 0, True), (16, 4, False)])
def test_mixed_precision_probe_computes_leverage(shape, p, deflate, step):
    """benchmarks/mixed_precision_probe.py (the evidence that fp32 + an fp64 correction misses 1e-6 at k = 64) must
    compute rank-k leverage: on a matrix with a wide gap at k its scores equal the fp64 reference."""
    probe = load_benchmark("mixed_precision_probe")
    X = spectrum_matrix(*shape, GAPPED, seed=2)
    got = probe.mixed_scores(X, 6, p, deflate, step)
    np.testing.assert_allclose(got, reference_leverage(X, 6), atol=1e-6)


def test_eigensolver_probe_runs_every_cell(monkeypatch, capsys):
    """benchmarks/eigensolver_probe.py (the evidence that no faster exact eigensolver is reachable) prints one row of
    four timings per shape; small shapes here, both Gram orientations."""
    probe = load_benchmark("eigensolver_probe")
    monkeypatch.setattr(probe, "SHAPES", [(300, 120), (120, 300)])
    monkeypatch.setattr(probe, "K", 8)
    monkeypatch.setattr(probe, "BAND", 4)
    assert probe.main(["--repeats", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 300×120") or
            line.startswith("| 120×300")]
    assert [r.split("|")[2].strip() for r in rows] == ["120×120", "120×120"]
    assert all(float(c) > 0 for r in rows for c in r.strip("|").split("|")[2:])
    with pytest.raises(SystemExit):
        probe.main(["--repeats", "0"])
