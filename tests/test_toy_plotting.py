"""toy (matrix factories with known structure) and plotting (what is drawn), checked against their definitions."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from svdprune_utils import toy  # noqa: E402
from svdprune_utils.notebook import plotting


def test_low_rank_has_the_stated_spectrum():
    X = toy.low_rank(200, 50, rank=5, noise=0.0, decay=0.7, rng=0)
    s = np.linalg.svd(X.astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(s[:5], np.sqrt(200) * 0.7 ** np.arange(5), rtol=1e-5)
    assert s[5] < 1e-4 * s[0]
    assert np.array_equal(X, toy.low_rank(200, 50, rank=5, noise=0.0, decay=0.7, rng=0))  # seeded
    with pytest.raises(ValueError, match="rank"):
        toy.low_rank(10, 5, rank=6, rng=0)


def test_outliers_lie_outside_the_dominant_row_space():
    X = toy.low_rank(100, 30, rank=4, noise=0.0, rng=1)
    Y, idx = toy.with_outliers(X, n_outliers=3, scale=2.0, rng=1)
    assert Y.shape == (103, 30) and idx.tolist() == [100, 101, 102]
    _, _, Vt = np.linalg.svd(X.astype(np.float64))
    assert np.abs(Y[idx] @ Vt[:4].T).max() < 1e-4  # orthogonal to the 4 signal directions
    med = np.median(np.linalg.norm(X, axis=1))
    np.testing.assert_allclose(np.linalg.norm(Y[idx], axis=1), 2.0 * med, rtol=1e-5)


def test_duplicates_and_groups():
    X = np.arange(12, dtype=np.float32).reshape(4, 3)
    Y, groups = toy.with_duplicates(X, [1, 3], copies=3)
    assert Y.shape == (8, 3) and groups.tolist() == [0, 1, 2, 3, 1, 1, 3, 3]
    assert np.array_equal(Y[groups], Y) and np.array_equal(Y[4], X[1])


def test_clusters_sizes_and_centres():
    X, labels = toy.clusters((30, 10, 5), d=8, spread=0.0, rng=2)
    assert np.bincount(labels).tolist() == [30, 10, 5]
    centres = np.stack([X[labels == c][0] for c in range(3)])
    np.testing.assert_allclose(centres @ centres.T, np.eye(3), atol=1e-6)  # orthonormal, no spread


def test_token_grid_kinds():
    X, labels = toy.token_grid(grid=(8, 8), d=16, bg_rank=2, object_box=(1, 2, 3, 5), n_loud=4, rng=3)
    assert X.shape == (64, 16)
    obj = np.zeros((8, 8), bool)
    obj[1:3, 2:5] = True
    assert np.array_equal(labels.reshape(8, 8) == 1, obj) and (labels == 2).sum() == 4


def test_image_patches_are_raster_ordered():
    img = np.zeros((28, 28, 3))
    img[14:, :14] = 1.0  # bottom-left patch white
    patches, small = toy.image_patches(img, patch=14, size=28)
    assert patches.shape == (4, 14 * 14 * 3) and small.shape == (28, 28, 3)
    assert patches.mean(1).round(3).tolist() == [0.0, 0.0, 1.0, 0.0]


def test_synthetic_attention_is_a_distribution_and_last_drifts_late():
    X = toy.clip_like(100, 32, rng=4)
    cls = toy.synthetic_attention(X, "cls", rng=0)
    last = toy.synthetic_attention(X, "last", position_weight=4.0, rng=0)
    assert cls.sum() == pytest.approx(1.0, abs=1e-5) and last.sum() == pytest.approx(1.0, abs=1e-5)
    ratio = last / cls  # exp(4 i / 99) up to normalisation: increasing in i
    assert np.all(np.diff(np.log(ratio)) > 0)


def test_kept_mask_and_overlay_draw_what_was_kept():
    mask = plotting.kept_mask([0, 5], (2, 3))
    assert mask.tolist() == [[True, False, False], [False, False, True]]
    with pytest.raises(ValueError):
        plotting.kept_mask([6], (2, 3))
    img = np.full((4, 6, 3), 0.8)
    fig, ax = plt.subplots()
    plotting.overlay_kept(img, [0, 5], grid=(2, 3), ax=ax, dim=0.25)
    shown = ax.images[0].get_array()
    assert np.allclose(shown[:2, :2], 0.8) and np.allclose(shown[2:, 4:], 0.8)  # kept patches unchanged
    assert np.allclose(shown[:2, 2:4], 0.2)  # dropped ones dimmed to 0.25 x 0.8
    assert len(ax.collections[0].get_segments()) == 8  # two isolated patches: 4 edges each
    plt.close(fig)


def test_score_map_shows_the_scores_on_the_grid():
    s = np.arange(12.0)
    fig, ax = plt.subplots()
    plotting.score_map(s, grid=(3, 4), ax=ax, colorbar=False, kept=[11])
    assert np.array_equal(ax.images[0].get_array(), s.reshape(3, 4))
    assert ax.collections[0].get_offsets().tolist() == [[3.0, 2.0]]  # (col, row) of token 11
    plt.close(fig)


def test_map_grid_shares_one_scale(tmp_path):
    fig, axes = plotting.map_grid({"a": np.zeros((2, 2)), "b": np.full((2, 2), 4.0), "c": np.ones((2, 2))}, ncols=2)
    assert axes.shape == (2, 2) and not axes[1, 1].get_visible()
    assert {ax.images[0].get_clim() for ax in axes.flat[:3]} == {(0.0, 4.0)}
    path = plotting.save_figure(fig, "grid", directory=tmp_path)
    assert path.is_file() and path.stat().st_size > 0
    plt.close(fig)
    with pytest.raises(ValueError):
        plotting.map_grid({})
