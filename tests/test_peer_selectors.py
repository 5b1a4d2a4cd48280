"""VisPruner, CDPruner (selectors) and VisionZip (a merging reduction) against transcriptions of their official code.

Each ``_official_*`` below transcribes, with plain torch ops and in fp64, the rule of the authors' code as read in
their repositories (file and function named in each docstring); ties follow the library's stated rule (stable
sorts: the lower index first; ``torch.argmax``: the first maximum). The library's implementations are written
independently of these transcriptions and must agree with them on fixed random inputs, several seeds and budgets.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import clip_like

from svdprune_utils import (
    REDUCERS,
    SELECTORS,
    Reduction,
    cdpruner_relevance,
    reduce_tokens,
    reduce_visionzip,
    select_tokens,
)
from svdprune_utils.core.reduction import visionzip_split


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The loops below run hundreds of small matmuls in turn: a second thread only adds contention (40x slower
    on a busy 2-core machine). Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SHAPES = [(576, 96, 64), (576, 96, 128), (576, 96, 192), (40, 16, 10), (40, 16, 7)]  # (N, d, K)
SEEDS = range(3)


def _features(N, d, seed):
    """CLIP-like tokens (a few strong directions: many near-duplicates) plus a few exact duplicates."""
    X = torch.as_tensor(clip_like(N, d, seed=seed), dtype=torch.float64)
    X[N // 2] = X[N // 3]
    return X


def _rand(shape, seed):
    return torch.as_tensor(np.random.default_rng(seed).standard_normal(shape))


# ------------------------------------------------------------------------------------------------- VisPruner
def _official_vispruner(feats: torch.Tensor, att: torch.Tensor, T: int, ratio: float) -> list[int]:
    """Theia-4869/VisPruner, llava/model/llava_arch.py, encode_images, for one image: argsort the head-averaged
    CLS attention (descending), keep int(T*ratio) important tokens; on the rest, in that order, repeat: r =
    min(8, R - T_div), stop if r <= 0; a, b = the even/odd positions; score each a by its max cosine to b; drop
    the r highest-scoring a's; list = the other a's (descending score) then b. Selected = important + list.
    (Indexing A by its own length makes odd R, and r > |A|, well defined; ratio 1 keeps no residual token.)"""
    T_imp = int(T * ratio)
    T_div = T - T_imp
    token_indices = torch.sort(att, descending=True, stable=True).indices
    important_indices, residual_indices = token_indices[:T_imp], token_indices[T_imp:]
    image_normalized = feats / feats.norm(dim=-1, keepdim=True)
    if T_div == 0:
        residual_indices = residual_indices[:0]
    while T_div > 0:
        R = residual_indices.shape[0]
        r = min(8, R - T_div)
        if r <= 0:
            break
        residual_tokens = image_normalized[residual_indices]
        a, b = residual_tokens[::2], residual_tokens[1::2]
        scores = (a @ b.T).max(dim=-1).values
        distinct_indices = torch.sort(scores, descending=True, stable=True).indices[r:]
        residual_indices = torch.cat([residual_indices[::2][distinct_indices], residual_indices[1::2]])
    return sorted(torch.cat([important_indices, residual_indices]).tolist())


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("N", "d", "K"), SHAPES)
@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.0])
def test_vispruner_equals_the_official_rule(seed, N, d, K, ratio):
    X = _features(N, d, seed)
    att = torch.as_tensor(np.random.default_rng(seed + 100).random(N))
    got = select_tokens(X, K, "vispruner", attention=att, important_ratio=ratio)
    assert got.tolist() == _official_vispruner(X, att, K, ratio)


def test_vispruner_hand_example_removes_near_duplicates():
    # attention decreasing with the index: important {0, 1, 2}; residual list [3, 4, 5, 6, 7, 8], T_div = 4, r = 2
    # A = [3, 5, 7] scores [0, 1, 1] against B = [4, 6, 8] (5 duplicates 4, 7 duplicates 8): 5 and 7 are removed
    X = torch.eye(9)
    X[5], X[7] = X[4], X[8]
    att = torch.linspace(1.0, 0.1, 9)
    assert select_tokens(X, 7, "vispruner", attention=att, important_ratio=0.5).tolist() == [0, 1, 2, 3, 4, 6, 8]
    assert select_tokens(X, 7, "cls_attention", attention=att).tolist() == list(range(7))


def test_vispruner_ratio_one_is_top_k_attention_and_ties_go_to_the_lower_index():
    X = _features(64, 8, 0)
    att = torch.as_tensor(np.random.default_rng(1).integers(0, 5, 64), dtype=torch.float64)  # many ties
    top = select_tokens(X, 12, "cls_attention", attention=att)
    assert torch.equal(select_tokens(X, 12, "vispruner", attention=att, important_ratio=1.0), top)
    # ties among the important tokens: the lower indices of the last tied level are kept
    level = att[top].min()
    tied = torch.nonzero(att == level).squeeze(1)
    kept_tied = [i for i in top.tolist() if att[i] == level]
    assert kept_tied == tied[: len(kept_tied)].tolist()
    for ratio in (0.5, 0.25):
        assert select_tokens(X, 12, "vispruner", attention=att, important_ratio=ratio).tolist() == \
            _official_vispruner(X.double(), att, 12, ratio)


def test_vispruner_batch_budget_mutation_and_errors():
    X = torch.stack([_features(40, 16, s) for s in range(3)]).float()
    att = torch.rand(3, 40, generator=torch.Generator().manual_seed(0))
    Xc, attc = X.clone(), att.clone()
    batch = select_tokens(X, 9, "vispruner", attention=att)
    assert torch.equal(X, Xc) and torch.equal(att, attc)
    for b in range(3):
        assert torch.equal(batch[b], select_tokens(X[b], 9, "vispruner", attention=att[b]))
    assert torch.equal(select_tokens(X[0], 40, "vispruner", attention=att[0]), torch.arange(40))
    with pytest.raises(ValueError, match="attention"):
        select_tokens(X, 9, "vispruner")
    with pytest.raises(ValueError, match=r"shape \(3, 40\)"):
        select_tokens(X, 9, "vispruner", attention=torch.rand(3, 39))
    for bad in (-0.1, 1.5, float("nan"), True, "0.5", None):
        with pytest.raises(ValueError, match="important_ratio"):
            select_tokens(X, 9, "vispruner", attention=att, important_ratio=bad)


# -------------------------------------------------------------------------------------------------- CDPruner
def _official_cdpruner(image_features, image_embeds, text_embeds, T):
    """Theia-4869/CDPruner, llava/model/llava_arch.py, encode_images (B = 1, fp64 here): cosine similarity of the
    projected features; relevance = mean over text segments of the negated cosine, then (x - min + 1e-6) /
    (max - min); kernel = r_i S_ij r_j; the fast greedy MAP loop with T picks; picks sorted.
    Returns (sorted picks, relevance, picks in order)."""
    image_features, image_embeds = image_features[None], image_embeds[None]
    B, N, _ = image_features.shape
    image_normalized = image_features / image_features.norm(dim=-1, keepdim=True)
    similarity = torch.matmul(image_normalized, image_normalized.transpose(1, 2))
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    relevance = torch.matmul(image_embeds, text_embeds.t())
    relevance = (-relevance).mean(dim=-1)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    kernel = relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)
    cis = torch.zeros((T, B, N), dtype=kernel.dtype)
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    select_idx = torch.empty((T, B), dtype=torch.long)
    for i in range(T):
        j = torch.argmax(di2s, dim=-1)
        select_idx[i] = j
        eis = (kernel[torch.arange(B), j] - torch.einsum("tb,tbn->bn", cis[:i, torch.arange(B), j], cis[:i])) \
            / torch.sqrt(di2s[torch.arange(B), j]).unsqueeze(-1)
        cis[i, :, :] = eis
        di2s -= torch.square(eis)
        di2s[torch.arange(B), j] = -float("inf")
    return torch.sort(select_idx.t()).values[0].tolist(), relevance[0], select_idx[:, 0].tolist()


def _cd_inputs(N, d, seed, e=24, M=2):
    feats = _rand((N, max(d, 256) if N > 100 else d), seed)  # d >= K keeps the kernel's rank above the budget
    return feats, _rand((N, e), seed + 1), _rand((M, e), seed + 2)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("N", "d", "K"), SHAPES)
def test_cdpruner_equals_the_official_rule(seed, N, d, K):
    feats, ie, te = _cd_inputs(N, d, seed)
    expected, rel, _ = _official_cdpruner(feats, ie, te, K)
    assert select_tokens(feats, K, "cdpruner", image_embeds=ie, text_embeds=te).tolist() == expected
    # the raw relevance (mean cosine, before negation and min-max) gives the same selection
    raw = torch.nn.functional.normalize(ie, dim=-1) @ torch.nn.functional.normalize(te, dim=-1).T
    assert select_tokens(feats, K, "cdpruner", relevance=raw.mean(-1)).tolist() == expected
    torch.testing.assert_close(cdpruner_relevance(ie, te), rel, rtol=1e-12, atol=1e-14)


def test_cdpruner_first_pick_is_the_most_relevant_token_after_negation():
    feats, ie, te = _cd_inputs(40, 16, 5)
    raw = torch.as_tensor(np.random.default_rng(3).random(40))
    # r = minmax(-raw): the token with the LOWEST mean cosine has the largest r and is picked first (S_ii = 1)
    assert select_tokens(feats, 1, "cdpruner", relevance=raw).tolist() == [int(raw.argmin())]
    # the normalised relevance spans [1e-6 / span, 1 + 1e-6 / span]: the 1e-6 is in the numerator only
    r = cdpruner_relevance(ie, te)
    neg = -(torch.nn.functional.normalize(ie, dim=-1) @ torch.nn.functional.normalize(te, dim=-1).T).mean(-1)
    span = float(neg.max() - neg.min())
    assert int(r.argmax()) == int(neg.argmax()) and r.shape == (40,)
    assert float(r.min()) == pytest.approx(1e-6 / span, rel=1e-9)
    assert float(r.max()) == pytest.approx(1 + 1e-6 / span, rel=1e-12)


def test_cdpruner_constant_relevance_is_the_plain_dpp_and_rank_exhaustion_is_guarded():
    feats, ie, _ = _cd_inputs(40, 16, 6)
    # constant relevance: r = 1 (the official min-max would divide by zero): the DPP on similarity alone,
    # which the official rule gives with text embeddings every image token is equally close to (none: use ones)
    plain = select_tokens(feats, 8, "cdpruner", relevance=torch.full((40,), 0.3))
    Xn = feats / feats.norm(dim=-1, keepdim=True)
    S = Xn @ Xn.T
    gains, cis, picks = torch.diagonal(S).clone(), torch.zeros(8, 40, dtype=S.dtype), []
    for i in range(8):
        j = int(torch.argmax(gains))
        picks.append(j)
        cis[i] = (S[j] - cis[:i, j] @ cis[:i]) / gains[j].sqrt()
        gains -= cis[i] ** 2
        gains[j] = -float("inf")
    assert plain.tolist() == sorted(picks)
    # rank 3 features, budget 10: the official sqrt would give NaN after 3 picks; here K unique indices, and
    # the first 3 (well-defined) official picks are among them
    low = _rand((40, 3), 7)
    got = select_tokens(low, 10, "cdpruner", image_embeds=ie, text_embeds=_rand((1, 24), 8))
    assert len(set(got.tolist())) == 10
    _, _, first = _official_cdpruner(low, ie, _rand((1, 24), 8), 3)
    assert set(first) <= set(got.tolist())


def test_cdpruner_zero_gain_guard():
    # exact 0/1 kernel (r = 1, tokens e0, e0, e1, e1, e0, e1): after picking 0 and 2 every gain is exactly 0; the
    # official loop would divide 0 by sqrt(0) (NaN) and then pick index 0 again; the guard adds a zero row and
    # the remaining picks follow the frozen gains, first index on ties
    X = torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1], [1, 0], [0, 1]])
    assert select_tokens(X, 4, "cdpruner", relevance=torch.zeros(6)).tolist() == [0, 1, 2, 3]
    assert select_tokens(X, 5, "cdpruner", relevance=torch.zeros(6)).tolist() == [0, 1, 2, 3, 4]


def test_cdpruner_batch_budget_mutation_and_errors():
    feats = torch.stack([_cd_inputs(40, 16, s)[0] for s in range(3)]).float()
    ie = torch.stack([_cd_inputs(40, 16, s)[1] for s in range(3)])
    te = _rand((3, 2, 24), 9)
    copies = [t.clone() for t in (feats, ie, te)]
    batch = select_tokens(feats, 9, "cdpruner", image_embeds=ie, text_embeds=te)
    assert all(torch.equal(a, b) for a, b in zip((feats, ie, te), copies))
    for b in range(3):
        assert torch.equal(batch[b], select_tokens(feats[b], 9, "cdpruner", image_embeds=ie[b], text_embeds=te[b]))
        assert batch[b].tolist() == _official_cdpruner(feats[b].double(), ie[b], te[b], 9)[0]
    shared = select_tokens(feats, 9, "cdpruner", image_embeds=ie, text_embeds=te[0])  # (M, e) shared by the batch
    assert torch.equal(shared[1], select_tokens(feats[1], 9, "cdpruner", image_embeds=ie[1], text_embeds=te[0]))
    assert torch.equal(select_tokens(feats[0], 40, "cdpruner", relevance=torch.rand(40)), torch.arange(40))
    with pytest.raises(ValueError, match="`relevance`.*`image_embeds`.*`text_embeds`"):
        select_tokens(feats, 9, "cdpruner")
    with pytest.raises(ValueError, match="text_embeds"):
        select_tokens(feats, 9, "cdpruner", image_embeds=ie)
    with pytest.raises(ValueError, match="image_embeds"):
        select_tokens(feats, 9, "cdpruner", text_embeds=te)
    with pytest.raises(ValueError, match="not both"):
        select_tokens(feats, 9, "cdpruner", relevance=torch.rand(3, 40), image_embeds=ie, text_embeds=te)
    with pytest.raises(ValueError, match="text_embeds"):
        select_tokens(feats, 9, "cdpruner", image_embeds=ie, text_embeds=_rand((2, 23), 0))
    with pytest.raises(ValueError, match="image_embeds"):
        select_tokens(feats, 9, "cdpruner", image_embeds=ie[:, :39], text_embeds=te)
    with pytest.raises(ValueError, match="relevance"):
        select_tokens(feats, 9, "cdpruner", relevance=torch.full((3, 40), float("nan")))
    with pytest.raises(ValueError, match="image_embeds"):
        cdpruner_relevance(None, te)


# ------------------------------------------------------------------------------------------------- VisionZip
def _official_visionzip(hidden_states, cls_attention_sum, metric, D, C):
    """dvlab-research/VisionZip, visionzip/clip_encoder.py, CLIPVisionTower_VisionZip.forward, on the patches only
    (the CLS slot given to one more dominant patch: all_indices = the top-D patches, no CLS row); top-k with ties
    to the lower index. Also reads off, from the same variables, each output's position and sources."""
    B, N, d = hidden_states.shape
    topk_indices = torch.sort(cls_attention_sum, dim=1, descending=True, stable=True).indices[:, :D]
    all_indices = topk_indices
    mask = torch.ones(B, N, dtype=torch.bool).scatter_(1, all_indices, False)
    dominant_tokens = hidden_states.masked_select(~mask.unsqueeze(-1)).view(B, D, d)
    metric_filtered = metric[mask].view(B, N - D, metric.shape[2])
    hidden_states_filtered = hidden_states.masked_select(mask.unsqueeze(-1)).view(B, N - D, d)
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
    step = max(1, metric_normalized.shape[1] // C)
    target_indices = torch.arange(0, metric_normalized.shape[1], step)[:C]
    target_tokens = metric_normalized[:, target_indices, :]
    not_target = ~torch.isin(torch.arange(metric_normalized.shape[1]), target_indices)
    tokens_to_merge = metric_normalized[:, not_target, :]
    similarity = torch.bmm(tokens_to_merge, target_tokens.transpose(1, 2))
    assign_one_hot = torch.zeros(B, tokens_to_merge.shape[1], C, dtype=hidden_states_filtered.dtype)
    assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    hidden_to_merge = hidden_states_filtered[:, not_target, :]
    aggregated_hidden = torch.bmm(assign_one_hot.transpose(1, 2), hidden_to_merge) / counts
    target_hidden = hidden_states_filtered[:, target_indices, :]
    contextual_tokens = target_hidden + aggregated_hidden
    features = torch.cat([dominant_tokens, contextual_tokens], dim=1)

    remainder = torch.stack([torch.nonzero(mask[b]).squeeze(1) for b in range(B)])  # (B, N - D) in raster order
    kept = torch.cat([torch.sort(topk_indices, dim=1).values, remainder[:, target_indices]], dim=1)
    sources = torch.zeros(B, D + C, N, dtype=torch.bool)
    for b in range(B):
        for k in range(D + C):
            sources[b, k, kept[b, k]] = True
        merged = remainder[b, not_target]
        for o, t in enumerate(assign_one_hot[b].argmax(dim=1).tolist()):
            sources[b, D + t, merged[o]] = True
    return kept, features, sources


def _zip_inputs(B, N, d, seed, dk=12):
    X = torch.stack([_features(N, d, seed + b) for b in range(B)])
    att = torch.as_tensor(np.random.default_rng(seed + 50).random((B, N)))
    return X, att, _rand((B, N, dk), seed + 60)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("N", "d", "K"), SHAPES)
def test_visionzip_equals_the_official_rule(seed, N, d, K):
    X, att, keys = _zip_inputs(2, N, d, seed)
    D, C = visionzip_split(K)
    red = reduce_tokens(X, K, "visionzip", attention=att, keys=keys)
    kept, feats, sources = _official_visionzip(X, att, keys, D, C)
    assert torch.equal(red.kept, kept) and torch.equal(red.sources, sources)
    torch.testing.assert_close(red.features, feats, rtol=1e-12, atol=1e-12)
    # an explicit split
    red = reduce_visionzip(X, K, attention=att, keys=keys, dominant=K // 2)
    kept, feats, sources = _official_visionzip(X, att, keys, K // 2, K - K // 2)
    assert torch.equal(red.kept, kept) and torch.equal(red.sources, sources)
    torch.testing.assert_close(red.features, feats, rtol=1e-12, atol=1e-12)


def test_visionzip_split():
    assert [visionzip_split(k) for k in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]
    assert [visionzip_split(k) for k in (1, 2, 4, 10, 16, 32, 48)] == [(1, 0), (2, 0), (3, 1), (8, 2), (14, 2), (27, 5),
                                                                   (41, 7)]  # 48 * 54 / 64 = 40.5: half up
    assert visionzip_split(64, dominant=0) == (0, 64) and visionzip_split(64, dominant=64) == (64, 0)
    for bad in (-1, 65, 2.5, True, "3"):
        with pytest.raises(ValueError, match="dominant"):
            visionzip_split(64, dominant=bad)


@pytest.mark.parametrize(("N", "K"), [(576, 64), (40, 10), (40, 39)])
def test_visionzip_structure(N, K):
    X, att, keys = _zip_inputs(3, N, 16, 4)
    red = reduce_tokens(X, K, "visionzip", attention=att, keys=keys)
    D, _ = visionzip_split(K)
    assert red.kept.shape == (3, K) and red.features.shape == (3, K, 16) and red.sources.shape == (3, K, N)
    # every input token is in exactly one output token; dominant rows are one-hot at their own index
    assert bool((red.sources.sum(dim=1) == 1).all())
    assert bool((red.sources[:, :D].sum(dim=2) == 1).all())
    assert torch.equal(red.sources[:, :D].float().argmax(dim=2), red.kept[:, :D])
    assert torch.equal(red.kept[:, :D], select_tokens(X, D, "cls_attention", attention=att))
    assert torch.equal(red.features[:, :D], torch.gather(X, 1, red.kept[:, :D, None].expand(-1, -1, 16)))
    # a contextual token = its target + the mean of the other tokens of its sources
    for b in range(3):
        for k in range(D, K):
            t = int(red.kept[b, k])
            assert red.sources[b, k, t]
            rest = red.sources[b, k].clone()
            rest[t] = False
            expected = X[b, t] + (X[b, rest].mean(0) if rest.any() else 0)
            torch.testing.assert_close(red.features[b, k], expected, rtol=1e-12, atol=1e-12)
    # batch equals each sample alone; 2-D input gives B = 1
    for b in range(3):
        one = reduce_tokens(X[b], K, "visionzip", attention=att[b], keys=keys[b])
        assert torch.equal(one.kept, red.kept[b:b + 1]) and torch.equal(one.sources, red.sources[b:b + 1])
        torch.testing.assert_close(one.features, red.features[b:b + 1], rtol=1e-12, atol=1e-12)


def test_visionzip_equal_keys_go_to_the_first_target():
    X = _features(40, 8, 1)
    att = torch.linspace(1.0, 0.0, 40)  # dominant: 0..7 (K = 10 -> 8 + 2)
    keys = torch.ones(40, 4)  # every similarity ties: all go to the first target
    red = reduce_visionzip(X, 10, attention=att, keys=keys)
    assert red.kept[0].tolist() == list(range(8)) + [8, 24]  # remainder 8..39, step 32 // 2 = 16
    assert red.sources[0, 8].sum() == 31 and red.sources[0, 9].tolist() == [i == 24 for i in range(40)]
    torch.testing.assert_close(red.features[0, 9], X[24])  # a target with nothing assigned stays itself
    others = [i for i in range(8, 40) if i not in (8, 24)]
    torch.testing.assert_close(red.features[0, 8], X[8] + X[others].mean(0))


def test_visionzip_budget_splits_dtype_mutation_and_errors():
    X, att, keys = _zip_inputs(2, 40, 16, 2)
    X = X.to(torch.bfloat16)
    copies = [t.clone() for t in (X, att, keys)]
    red = reduce_tokens(X, 12, "visionzip", attention=att, keys=keys)
    assert red.features.dtype == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip((X, att, keys), copies))
    for K in (40, 100):
        full = reduce_tokens(X, K, "visionzip", attention=att, keys=keys)
        assert full.features is None and torch.equal(full.kept, torch.arange(40).expand(2, 40))
        assert torch.equal(full.sources, torch.eye(40, dtype=torch.bool).expand(2, 40, 40))
    only_dominant = reduce_visionzip(X, 12, attention=att, dominant=12)  # no keys needed
    assert torch.equal(only_dominant.kept, select_tokens(X, 12, "cls_attention", attention=att))
    only_contextual = reduce_visionzip(X, 12, keys=keys, dominant=0)  # no attention needed
    assert bool((only_contextual.sources.sum(dim=1) == 1).all())
    with pytest.raises(ValueError, match="attention"):
        reduce_tokens(X, 12, "visionzip", keys=keys)
    with pytest.raises(ValueError, match="keys"):
        reduce_tokens(X, 12, "visionzip", attention=att)
    with pytest.raises(ValueError, match="keys"):
        reduce_tokens(X, 12, "visionzip", attention=att, keys=keys[:, :39])
    with pytest.raises(ValueError, match="dominant"):
        reduce_visionzip(X, 12, attention=att, keys=keys, dominant=13)
    with pytest.raises(ValueError, match="budget"):
        reduce_visionzip(X, 0, attention=att, keys=keys)
    with pytest.raises(ValueError, match="reduce_tokens"):
        select_tokens(X, 12, "visionzip", attention=att, keys=keys)


# --------------------------------------------------------------------------------- registry and Reduction
def test_registries_and_reduce_tokens_for_selectors():
    assert {"vispruner", "cdpruner"} <= set(SELECTORS) and "visionzip" not in SELECTORS
    assert set(REDUCERS) == {"visionzip"}
    X = torch.as_tensor(clip_like(36, 8, seed=3))
    att = torch.rand(36, generator=torch.Generator().manual_seed(0))
    for method, sig in [("svd", {}), ("vispruner", {"attention": att}), ("cdpruner", {"relevance": att})]:
        red = reduce_tokens(X, 9, method, keys=torch.ones(36, 2), **sig)  # signals a method does not take: ignored
        kept = select_tokens(X, 9, method, **sig)
        assert torch.equal(red.kept, kept[None]) and red.features is None
        assert torch.equal(red.sources, torch.nn.functional.one_hot(kept, 36).bool()[None])
        assert torch.equal(red.tokens(X[None]), X[kept][None])
    with pytest.raises(ValueError, match="merging"):
        reduce_tokens(X, 9, "nope")
    with pytest.raises(TypeError, match="kees"):
        reduce_tokens(X, 9, "visionzip", kees=1)


def test_reduction_from_kept_and_validation():
    red = Reduction.from_kept(torch.tensor([3, 0, 5]), 6)
    assert red.kept.shape == (1, 3) and red.n_inputs == 6 and red.sources[0, 1].tolist() == [1, 0, 0, 0, 0, 0]
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        Reduction.from_kept(torch.tensor([[0, 6]]), 6)
    with pytest.raises(ValueError, match="integer"):
        Reduction.from_kept(torch.tensor([0.0, 1.0]), 6)
    with pytest.raises(ValueError, match="sources"):
        Reduction(kept=torch.zeros(1, 3, dtype=torch.long), features=None,
                  sources=torch.zeros(1, 2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="features"):
        Reduction(kept=torch.zeros(1, 3, dtype=torch.long), features=torch.zeros(1, 2, 4),
                  sources=torch.zeros(1, 3, 6, dtype=torch.bool))


def test_reduction_in_raster_order_permutes_features_and_sources_alike():
    X = torch.as_tensor(clip_like(40, 6, seed=2), dtype=torch.float64)[None].expand(2, -1, -1).clone()
    g = torch.Generator().manual_seed(0)
    red = reduce_visionzip(X, 12, attention=torch.rand(2, 40, generator=g), keys=torch.randn(2, 40, 5, generator=g))
    assert bool((red.kept[:, 1:] < red.kept[:, :-1]).any())  # dominant then contextual: not ascending
    out = red.in_raster_order()
    assert bool((out.kept.diff(dim=1) > 0).all())
    for b in range(2):
        by_position = {int(p): (f, s) for p, f, s in zip(red.kept[b], red.features[b], red.sources[b])}
        for j, p in enumerate(out.kept[b].tolist()):
            assert torch.equal(out.features[b, j], by_position[p][0]) and torch.equal(out.sources[b, j], by_position[p][1])
    sel = Reduction.from_kept(torch.tensor([[4, 1, 7]]), 9).in_raster_order()
    assert sel.kept.tolist() == [[1, 4, 7]] and sel.features is None and sel.sources[0].nonzero()[:, 1].tolist() == [1, 4, 7]


@pytest.mark.parametrize("budget", [40, 100])
def test_visionzip_checks_its_signals_when_the_budget_keeps_every_token(budget):
    import svdprune_utils as sp

    X = torch.randn(40, 8)
    with pytest.raises(ValueError, match="attention"):
        sp.reduce_tokens(X, budget, "visionzip", keys=torch.randn(40, 4))
    with pytest.raises(ValueError, match="keys"):
        sp.reduce_tokens(X, budget, "visionzip", attention=torch.rand(40), keys=torch.randn(39, 4))
    full = sp.reduce_tokens(X, budget, "visionzip", attention=torch.rand(40), keys=torch.randn(40, 4))
    assert full.features is None and torch.equal(full.kept[0], torch.arange(40))
    assert sp.visionzip_split(64) == (54, 10)  # named in the README as sp.visionzip_split
