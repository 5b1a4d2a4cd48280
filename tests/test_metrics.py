"""metrics: projection residual vs the Eckart–Young floor, spatial and positional statistics."""

import numpy as np
import pytest
import torch
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
from helpers import clip_like, spectrum_matrix


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
    assert corner["mean_row"] == 0 and corner["dispersion"] == 0.0 and corner["coverage"] > 10
    bottom = spatial_stats(np.arange(576 - 48, 576))
    assert bottom["mean_row"] == pytest.approx(22.5)
    spread = spatial_stats(select_tokens(torch.ones(576, 2), 64, "uniform"))
    assert spread["coverage"] < spatial_stats(np.arange(64))["coverage"]
    assert spread["dispersion"] > spatial_stats(np.arange(64))["dispersion"]


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
