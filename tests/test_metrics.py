"""metrics: projection residual vs the Eckart–Young floor, spatial and positional statistics."""

import numpy as np
import pytest
import torch
from helpers import clip_like, spectrum_matrix
from hypothesis import given, settings
from hypothesis import strategies as st

from svdprune_utils import (
    jaccard,
    optimal_residual,
    positional_bias,
    projection_residual,
    region_recall,
    select_tokens,
    spatial_stats,
)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), K=st.integers(1, 30))
def test_residual_never_beats_the_eckart_young_floor(seed, K):
    rng = np.random.default_rng(seed)
    X = clip_like(40, 25, seed=seed % 1000)
    kept = np.sort(rng.choice(40, size=K, replace=False))
    r, floor = projection_residual(X, kept), optimal_residual(X, K)
    assert 0.0 <= floor <= r + 1e-9 <= 1.0 + 1e-9


def test_residual_known_values():
    X = np.eye(6)[:, :4] * np.array([4.0, 3.0, 2.0, 1.0])  # rows 0..3 orthogonal, rows 4, 5 zero
    assert projection_residual(X, [0, 1]) == pytest.approx((4 + 1) / 30)
    assert optimal_residual(X, 2) == pytest.approx((4 + 1) / 30)
    assert projection_residual(X, [4, 5]) == pytest.approx(1.0)
    assert projection_residual(X, np.arange(6)) == pytest.approx(0.0, abs=1e-12)
    assert projection_residual(X, np.array([], dtype=int)) == 1.0
    low = spectrum_matrix(30, 20, [3, 2, 1], seed=1)
    assert optimal_residual(low, 3) == pytest.approx(0.0, abs=1e-12)


def test_residual_bad_input():
    X = clip_like(10, 4)
    with pytest.raises(ValueError, match="outside"):
        projection_residual(X, [0, 10])
    with pytest.raises(ValueError, match="repeated"):
        projection_residual(X, [1, 1])
    with pytest.raises(ValueError, match="integer"):
        projection_residual(X, [0.5])
    with pytest.raises(ValueError, match="single"):
        projection_residual(np.stack([X, X]), [0])


def test_spatial_stats():
    all_kept = spatial_stats(np.arange(576))
    assert all_kept["coverage"] == 0.0 and all_kept["mean_row"] == pytest.approx(11.5)
    corner = spatial_stats([0])
    assert corner["mean_row"] == 0 and corner["spread"] == 0.0 and corner["coverage"] > 10
    bottom = spatial_stats(np.arange(576 - 48, 576))
    assert bottom["mean_row"] == pytest.approx(22.5)
    spread = spatial_stats(select_tokens(torch.ones(576, 2), 64, "uniform"))
    assert spread["coverage"] < spatial_stats(np.arange(64))["coverage"]
    assert spread["spread"] > spatial_stats(np.arange(64))["spread"]


def test_positional_bias_statistics():
    late = positional_bias(np.arange(576.0), 48)
    assert late["spearman_index"] == pytest.approx(1.0) and late["mean_kept_row"] == pytest.approx(22.5)
    assert late["row_shift"] == pytest.approx(11.0)
    early = positional_bias(-np.arange(576.0), 48)
    assert early["spearman_index"] == pytest.approx(-1.0) and early["mean_kept_row"] == pytest.approx(0.5)
    flat = positional_bias(np.ones(576), 48)
    assert flat["spearman_index"] == 0.0 and flat["mean_kept_row"] == pytest.approx(0.5)  # ties -> lower index
    noise = positional_bias(np.random.default_rng(0).random(576), 64)
    assert abs(noise["spearman_index"]) < 0.15
    with pytest.raises(ValueError, match="non-finite"):
        positional_bias(np.array([1.0, np.nan, 0, 0]), 1)
    with pytest.raises(ValueError, match="grid"):
        positional_bias(np.ones(10), 2)


def test_jaccard_and_region_recall():
    assert jaccard([1, 2, 3], [2, 3, 4]) == pytest.approx(0.5)
    assert jaccard(torch.tensor([1, 2]), np.array([1, 2])) == 1.0
    assert jaccard([], []) == 1.0
    mask = np.zeros((24, 24), bool)
    mask[0, :4] = True
    assert region_recall([0, 1, 100], mask) == pytest.approx(0.5)
    assert np.isnan(region_recall([0], np.zeros(576, bool)))


def test_projection_residual_with_dependent_kept_rows():
    """Kept rows that repeat a direction span no less: the residual is that of the independent ones."""
    assert projection_residual(np.array([[1.0, 0], [1, 0], [0, 1]]), [0, 1, 2]) == pytest.approx(0.0, abs=1e-15)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 12))
    X[5] = 2.0 * X[3]  # token 5 duplicates token 3's direction
    base = projection_residual(X, [1, 3, 7])
    assert projection_residual(X, [1, 3, 5, 7]) == pytest.approx(base, abs=1e-12)
    # against an independent reference: least squares of every token on the kept rows
    for kept in ([1, 3, 7], [1, 3, 5, 7], list(range(0, 40, 3))):
        coef = np.linalg.lstsq(X[kept].T, X.T, rcond=None)[0]
        ref = np.sum((X.T - X[kept].T @ coef) ** 2) / np.sum(X**2)
        assert projection_residual(X, kept) == pytest.approx(ref, abs=1e-12)


@pytest.mark.parametrize("scale", [1e-200, 1e-160, 1.0, 1e155, 1e300])
def test_residuals_are_scale_invariant(scale):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((30, 8))
    kept = [0, 4, 9, 20]
    assert projection_residual(X * scale, kept) == pytest.approx(projection_residual(X, kept), rel=1e-10)
    assert optimal_residual(X * scale, 3) == pytest.approx(optimal_residual(X, 3), rel=1e-10)


def test_index_metrics_refuse_what_is_not_an_index_set():
    from svdprune_utils import jaccard, positional_bias, region_recall, top_k

    assert jaccard([1, 2, 3], np.array([2, 3, 4])) == pytest.approx(0.5) and jaccard([], []) == 1.0
    for bad in ([0.5, 1.0], np.ones(3, bool), [[1, 2]], [1, 1], [-1, 2]):
        with pytest.raises(ValueError):
            jaccard(bad, [1])
    with pytest.raises(ValueError, match="mask"):
        region_recall([0, 1], np.full(4, 0.5))
    assert region_recall([0, 1], np.array([1, 0, 0, 1])) == 0.5
    s = np.arange(16.0)
    for K in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="budget"):
            positional_bias(s, K)
        with pytest.raises(ValueError, match="budget"):
            top_k(torch.as_tensor(s)[None], K)
    with pytest.raises(ValueError, match="scores"):
        top_k(torch.arange(16)[None], 3)


def test_read_only_arrays_are_accepted_silently():
    import warnings

    from svdprune_utils import leverage_scores, select_tokens

    X = np.random.default_rng(0).standard_normal((20, 6))
    X.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        leverage_scores(X, rank=3)
        select_tokens(X, 4, "svd")
        projection_residual(X, [0, 1])


def test_redundancy_hand_computed_and_against_sklearn():
    from sklearn.metrics.pairwise import cosine_similarity

    from svdprune_utils.core.metrics import redundancy

    X = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])  # mean token 0
    assert redundancy(X, [0, 1]) == pytest.approx(-1.0)
    assert redundancy(X, [0, 2]) == pytest.approx(0.0)
    assert redundancy(X, [2, 0, 1]) == pytest.approx(-1.0 / 3.0)
    assert redundancy(X + 5.0, [0, 1]) == pytest.approx(-1.0)  # a shared offset is not repetition
    rng = np.random.default_rng(0)
    Y = rng.normal(size=(50, 8)) + 3.0
    kept = np.array([3, 7, 11, 40, 41])
    C = cosine_similarity(Y[kept] - Y.mean(axis=0))
    assert redundancy(torch.as_tensor(Y, dtype=torch.float32), kept) == pytest.approx(
        C[np.triu_indices(5, 1)].mean(), abs=1e-6)
    for bad in ([1], [], [1, 1]):
        with pytest.raises(ValueError):
            redundancy(X, bad)


@pytest.mark.parametrize("K", [2.0, True, -1, "3", None])
def test_optimal_residual_needs_an_integer_k(K):
    with pytest.raises(ValueError, match="K must be an integer >= 0"):
        optimal_residual(clip_like(20, 6), K)


@pytest.mark.parametrize("grid", [(-4, -4), 16, (4, 4, 1), (4.0, 4.0), (0, 4)])
def test_grid_arguments_name_the_problem(grid):
    """A negative grid used to give negative mean rows, an int grid a TypeError, (0, 4) an error about kept."""
    with pytest.raises(ValueError, match="grid must be a pair of integers"):
        positional_bias(torch.rand(16), K=4, grid=grid)
    with pytest.raises(ValueError, match="grid must be a pair of integers"):
        spatial_stats(torch.tensor([0, 5]), grid=grid)


@pytest.mark.parametrize("scores", [torch.rand(16, dtype=torch.complex64), torch.rand(16) > 0.5, ["a"] * 16])
def test_positional_bias_needs_real_scores(scores):
    with pytest.raises(ValueError, match="real numbers"):
        positional_bias(scores, K=4)
