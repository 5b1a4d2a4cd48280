"""svdprune_utils.analysis.bias: causal-averaging theory, RoPE helpers, score collection and dataset statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import build_llava_inputs, build_tiny_llava

from svdprune_utils.analysis import bias
from svdprune_utils.core.selection import top_k
from svdprune_utils.hf.attention import capture_attention
from svdprune_utils.hf.patch import patch_llava, unpatch_llava


# ---------------------------------------------------------------------------------------- theory
@pytest.mark.parametrize("n", [1, 2, 7, 600])
def test_uniform_attention_matches_closed_form(n):
    r = bias.causal_received(torch.zeros(n, n), "all").numpy()
    np.testing.assert_allclose(r, bias.uniform_causal_received(n), rtol=1e-12, atol=1e-15)
    assert r.sum() == pytest.approx(1.0)
    assert np.all(np.diff(r) < 0)  # strictly favours early keys
    if n == 600:
        assert r[0] / r[-1] == pytest.approx(600 * sum(1 / t for t in range(1, 601)))


def test_visible_and_debiased_normalisations():
    n = 50
    H = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, n + 1))])
    vis = bias.causal_received(torch.zeros(n, n), "visible").numpy()
    np.testing.assert_allclose(vis, (H[n] - H[:n]) / np.arange(n, 0, -1))
    np.testing.assert_allclose(bias.causal_received(torch.zeros(n, n), "debiased").numpy(), np.ones(n))


def test_random_logits_still_favour_early_keys():
    g = torch.Generator().manual_seed(0)
    n = 200
    r = torch.stack([bias.causal_received(2.0 * torch.randn(n, n, generator=g)) for _ in range(20)]).mean(0)
    assert r[: n // 4].mean() > 5 * r[-n // 4:].mean()
    d = torch.stack([bias.causal_received(2.0 * torch.randn(n, n, generator=g), "debiased") for _ in range(20)])
    assert d.mean(0)[: n // 4].mean() < 2 * d.mean(0)[-n // 4:].mean()  # debiasing removes most of it


def test_causal_received_rejects_bad_input():
    with pytest.raises(ValueError, match="square"):
        bias.causal_received(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="normalize"):
        bias.causal_received(torch.zeros(3, 3), "rows")


# ------------------------------------------------------------------------------------------ RoPE
@pytest.fixture(scope="module")
def llava():
    return build_tiny_llava(seed=1)


def test_rope_logits_reproduce_the_layer_attention(llava):
    x = build_llava_inputs([(4, 1, 6)], seed=2)
    layer = 1
    qk = bias.decoder_qk(llava, x, layer)
    S = x["input_ids"].shape[1]
    logits = bias.rope_logits(llava, qk["q"], qk["k"], torch.arange(S), torch.arange(S))
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    probs = torch.softmax(logits.masked_fill(~causal, -torch.inf), -1).mean(1)  # heads averaged
    maps = capture_attention(llava, x, layers=[layer])
    img = maps.image_positions[layer][0]
    torch.testing.assert_close(probs[0][:, img], maps.lm[layer][0], rtol=1e-4, atol=1e-6)


def test_rope_logits_depend_on_relative_position_only(llava):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 3, 16, generator=g), torch.randn(1, 2, 5, 16, generator=g)
    a = bias.rope_logits(llava, q, k, torch.tensor([10, 20, 30]), torch.arange(5))
    b = bias.rope_logits(llava, q, k, torch.tensor([110, 120, 130]), torch.arange(100, 105))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_rope_decay_of_constant_vectors_is_a_sum_of_cosines(llava):
    hd = 16
    d = torch.arange(0, 300)
    curve = bias.rope_decay(llava, torch.ones(1, 2, hd), torch.ones(1, 2, 3, hd), d)[0, 0]
    rotary, _, scale = bias._rotary(llava)
    expected = scale * 2 * torch.cos(d[:, None].double() * rotary.inv_freq.double()[None]).sum(1)
    torch.testing.assert_close(curve.double(), expected, rtol=1e-4, atol=1e-4)
    assert curve[0] == pytest.approx(scale * hd, rel=1e-5) and curve[1:].max() < curve[0]


# ------------------------------------------------------------------------------ model measurements
@pytest.fixture(scope="module")
def tiny_pair():
    from svdprune_utils.testbed import tiny

    return tiny.build_model(seed=0).eval(), tiny.build_processor()


@pytest.fixture(scope="module")
def shapes3():
    from svdprune_utils.testbed.shapes import ShapesVQA

    ds = ShapesVQA("test", n=6, seed=0)
    return [ds[i] for i in (0, 3, 5)]  # colour, count and digit questions: different prompt lengths


def test_collect_scores_agree_with_the_patched_model(tiny_pair, shapes3):
    model, proc = tiny_pair
    sc = bias.collect_scores(model, proc, shapes3, layer=0, ranks=(16,), batch_size=3)
    assert set(sc) == {"fastv", "attn_mean", "attn_debiased", "cls_attention", "norm", "svd@16", "random"}
    assert all(v.shape == (3, 576) and v.dtype == np.float32 and np.isfinite(v).all() for v in sc.values())
    x = bias.model_inputs(model, proc, shapes3, bias.LLAVA_PROMPT)
    for method, key in [("fastv", "fastv"), ("cls_attention", "cls_attention"), ("svd", "svd@16"), ("norm", "norm")]:
        patch_llava(model, method, 16, fastv_layer=1)
        try:
            with torch.no_grad():
                model(**x)
            kept = model.svdprune.kept_indices
        finally:
            unpatch_llava(model)
        assert torch.equal(kept, top_k(torch.as_tensor(sc[key]).double(), 16)), method


def test_attention_shares_sum_to_one(tiny_pair, shapes3):
    model, proc = tiny_pair
    df = bias.attention_shares(model, proc, shapes3[:2], max_new_tokens=3)
    assert set(df["segment"]) == set(bias.SEGMENTS)
    assert set(df["layer"]) == set(range(len(model.model.language_model.layers)))
    sums = df.groupby(["sample", "layer"])["share"].sum()
    np.testing.assert_allclose(sums.to_numpy(), 1.0, rtol=1e-5)
    assert (df.loc[df["segment"] == "image", "n_tokens"] == 576).all()


# ------------------------------------------------------------------------------ dataset statistics
def test_mean_rank_map():
    s = np.tile(np.arange(16.0), (3, 1))
    np.testing.assert_allclose(bias.mean_rank_map(s), (np.arange(16) / 15).reshape(4, 4))
    np.testing.assert_allclose(bias.mean_rank_map(np.ones((2, 16))), 0.5)
    with pytest.raises(ValueError):
        bias.mean_rank_map(np.ones(16))


def test_kept_frequency():
    rng = np.random.default_rng(0)
    s = rng.random((10, 36))
    f = bias.kept_frequency(s, 5)
    assert f.shape == (6, 6) and f.sum() == pytest.approx(5) and f.max() <= 1
    same = bias.kept_frequency(np.tile(np.arange(36.0), (4, 1)), 6)
    np.testing.assert_array_equal(same.ravel(), (np.arange(36) >= 30).astype(float))  # the last row, always


def test_positional_table():
    N = 576
    early = np.tile(-np.arange(N, dtype=float), (4, 1))  # favours the first tokens
    rng = np.random.default_rng(0)
    scores = {"early": early, "svd@24": early[:, ::-1].copy(), "svd@48": early, "random": rng.random((4, N))}
    t = bias.positional_table(scores, [24, 48]).set_index(["method", "K"])
    assert list(t.index.get_level_values(0).unique()) == ["early", "svd", "random"]
    assert t.loc[("early", 24), "mean_kept_row"] == 0 and t.loc[("early", 24), "spearman_index"] == pytest.approx(-1)
    assert t.loc[("svd", 24), "mean_kept_row"] == 23  # read from svd@24: the last row
    assert t.loc[("svd", 48), "mean_kept_row"] == 0.5  # read from svd@48: the first two rows
    assert abs(t.loc[("random", 24), "spearman_index"]) < 0.1
    assert t.loc[("early", 24), "spread"] < t.loc[("random", 24), "spread"]


@pytest.mark.parametrize("rows, band", [([0, 5], "top"), ([12, 23], "bottom"), ([11, 12], "both"), ([], "none")])
def test_answer_band(rows, band):
    m = np.zeros((24, 24), bool)
    m[rows, 3] = True
    assert bias.answer_band(m) == band
    assert bias.answer_band(m.ravel()) == band
