"""The cached ablation path (svdprune_utils.analysis.ablation) against the faithful patch_llava + generate path,
on a tiny random LLaVA (answers are meaningless multi-token strings, which makes equality a strict test)."""

import numpy as np
import pytest
import torch

from svdprune_utils.analysis.ablation import encode, evaluate_cached, reduce_cached, residuals, select_cached
from svdprune_utils.analysis.evaluate import evaluate
from svdprune_utils.core.metrics import optimal_residual, projection_residual
from svdprune_utils.core.selection import select_tokens
from svdprune_utils.hf.attention import capture_attention
from svdprune_utils.testbed import tiny
from svdprune_utils.testbed.shapes import ShapesVQA

N_SAMPLES = 6


@pytest.fixture(scope="module")
def setup():
    model, processor = tiny.build_model(seed=1).eval(), tiny.build_processor()
    data = ShapesVQA(split="test", n=N_SAMPLES, seed=0)
    cache = encode(model, processor, data, layers=(-1, 0), batch_size=4)
    return model, processor, data, cache


@pytest.mark.parametrize(
    "method, patch_kwargs, config",
    [
        ("svd", {}, {"method": "svd"}),
        ("svd", {"rank": 0.9, "center": True}, {"method": "svd", "rank": 0.9, "center": True}),
        ("cls_attention", {}, {"method": "cls_attention"}),
        ("divprune", {}, {"method": "divprune"}),  # both default to the projected features
        ("divprune", {"feature": "vision"}, {"method": "divprune", "feature": "vision"}),
        ("fastv", {"fastv_layer": 1}, {"method": "fastv", "fastv_layer": 1}),
        ("vispruner", {}, {"method": "vispruner"}),
        ("cdpruner", {}, {"method": "cdpruner"}),
        ("visionzip", {}, {"method": "visionzip"}),
        ("visionzip", {"feature": "projected"}, {"method": "visionzip", "feature": "projected"}),
        ("sparsevlm", {}, {"method": "sparsevlm"}),
    ],
)
def test_cached_path_gives_the_faithful_answers(setup, method, patch_kwargs, config):
    model, processor, data, cache = setup
    budgets = [576, 32, 8]
    ref = evaluate(model, processor, data, [method], budgets, batch_size=4, patch_kwargs=patch_kwargs,
                   return_samples=True, progress=False)[1]
    summary, got = evaluate_cached(model, processor, cache, {"c": config}, budgets, batch_size=4,
                                   return_samples=True)
    assert got["prediction"].tolist() == ref["prediction"].tolist()
    assert got["tokens"].tolist() == ref["tokens"].tolist()
    assert got["score"].tolist() == ref["score"].tolist()
    np.testing.assert_allclose(got["region_recall"], ref["region_recall"])
    assert not hasattr(model, "svdprune")


def test_encode_keeps_the_tower_features_and_cls_attention(setup):
    model, processor, data, cache = setup
    inputs = processor(images=[data[0]["image"]], text=[tiny.PROMPT.format(question=data[0]["question"])],
                       return_tensors="pt")
    with torch.no_grad():
        hs = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
    assert sorted(k for k in cache.features if k != "projected") == [-5, -2, -1]  # 0 -> -5 (embeddings)
    torch.testing.assert_close(cache.feature("vision")[0], hs[-2][0, 1:])
    torch.testing.assert_close(cache.feature(0)[0], hs[0][0, 1:])
    torch.testing.assert_close(cache.feature(-1)[0], hs[-1][0, 1:])
    maps = capture_attention(model, dict(inputs), layers=[0])
    torch.testing.assert_close(cache.attention[0], maps.vision[0])
    assert cache.masks.shape == (N_SAMPLES, 576) and len(cache.prompts) == N_SAMPLES
    with pytest.raises(KeyError, match="not cached"):
        cache.feature(-3)


def test_select_cached_is_select_tokens_on_the_cached_features(setup):
    _, _, _, cache = setup
    kept = select_cached(cache, {"method": "svd", "feature": -1, "rank": 4}, 16, chunk=4)
    assert torch.equal(kept, select_tokens(cache.feature(-1), 16, "svd", rank=4))
    kept = select_cached(cache, {"method": "uniform"}, 16)
    assert torch.equal(kept, select_tokens(cache.feature("vision"), 16, "uniform", grid=(24, 24)))
    with pytest.raises(ValueError, match="inside the language model"):
        select_cached(cache, {"method": "fastv"}, 16)


def test_reduce_cached_keeps_every_token_without_a_selector_at_full_budget(setup, monkeypatch):
    """budget >= N keeps every token, as the patch does, without running the selector (DivPrune or CDPruner at K = N
    cost seconds per chunk); a bad budget is still refused."""
    import svdprune_utils.analysis.ablation as ab

    _, _, _, cache = setup
    N = cache.feature("projected").shape[1]
    monkeypatch.setattr(ab, "reduce_tokens", lambda *a, **k: pytest.fail("a selector ran at full budget"))
    for budget in (N, N + 5):
        kept, feats = reduce_cached(cache, {"method": "divprune"}, budget, samples=[0, 1])
        assert feats is None and torch.equal(kept, torch.arange(N).expand(2, N))
    with pytest.raises(ValueError, match="budget"):
        reduce_cached(cache, {"method": "divprune"}, 0)
    model, processor = setup[:2]
    cache.memo.clear()
    evaluate_cached(model, processor, cache, {"a": {"method": "divprune"}, "b": {"method": "norm"}}, (N,))
    assert cache.n_answers() == len(cache.memo) == N_SAMPLES  # one answer per sample, shared by both configs


def test_reduce_cached_memoises_plain_configs_only(setup, monkeypatch):
    """A selection asked twice runs once (same kept set, a copy the caller may change); other samples or a config
    holding a numpy value are not served from the memo."""
    import svdprune_utils.analysis.ablation as ab

    _, _, _, cache = setup
    cache.memo.clear()
    calls = []
    orig = ab.reduce_tokens
    monkeypatch.setattr(ab, "reduce_tokens", lambda *a, **k: calls.append(1) or orig(*a, **k))
    first, _ = reduce_cached(cache, {"method": "divprune"}, 8)
    first[0, 0] = -1  # the caller's copy
    again, _ = reduce_cached(cache, {"method": "divprune"}, 8)
    assert len(calls) == 1 and again[0, 0] != -1
    assert torch.equal(again, select_tokens(cache.feature("projected"), 8, "divprune"))
    part, _ = reduce_cached(cache, {"method": "divprune"}, 8, samples=[1])
    assert len(calls) == 2 and torch.equal(part, again[1:2])
    for _ in range(2):
        reduce_cached(cache, {"method": "vispruner", "important_ratio": np.float32(0.5)}, 8)
    assert len(calls) == 4  # a numpy value in the config: no memo
    assert len(cache.memo) == 2 and cache.n_answers() == 0  # two memoised selections, no answer


def test_evaluate_cached_rejects_samples_outside_the_cache(setup):
    model, processor, _, cache = setup
    with pytest.raises(ValueError, match=f"index the {N_SAMPLES} cached questions"):
        evaluate_cached(model, processor, cache, {"c": {"method": "svd"}}, [16], samples=[0, N_SAMPLES])


def test_residuals_match_the_metrics(setup):
    _, _, _, cache = setup
    X = cache.feature("vision")
    for K in (4, 40):
        kept = select_cached(cache, {"method": "norm"}, K)
        res, floor = residuals(X, kept)
        for i in range(len(cache)):
            assert res[i] == pytest.approx(projection_residual(X[i], kept[i]), abs=1e-9)
            assert floor[i] == pytest.approx(optimal_residual(X[i], K), abs=1e-9)
            assert res[i] >= floor[i] - 1e-9


def test_redundancies_match_the_metric_per_sample():
    """The batched redundancy equals sp.redundancy sample by sample, a kept row equal to the mean token included."""
    from svdprune_utils.core.metrics import redundancies, redundancy

    g = torch.Generator().manual_seed(0)
    X = torch.randn(3, 30, 8, generator=g, dtype=torch.float64) * 50 + 7
    X[1, 4] = X[1].mean(0)  # this row has no direction once the mean token is removed
    X[1, 4] = X[1, 4] + (X[1].mean(0) - X[1, 4]) * 30 / 29  # exactly the mean of all 30 rows
    kept = torch.tensor([[0, 5, 9, 29], [4, 2, 3, 7], [28, 1, 12, 13]])
    got = redundancies(X, kept)
    for i in range(3):
        assert got[i] == pytest.approx(redundancy(X[i], kept[i]), abs=1e-9)
    U = (X[1] - X[1].mean(0))[[2, 3, 7]].numpy()
    U = U / np.linalg.norm(U, axis=1, keepdims=True)
    C = U @ U.T
    assert got[1] == pytest.approx((C[0, 1] + C[0, 2] + C[1, 2]) / 6, abs=1e-9)  # row 4's three pairs count 0
    with pytest.raises(ValueError, match="two kept"):
        redundancies(X, kept[:, :1])


def test_same_kept_set_runs_the_language_model_once(setup, monkeypatch):
    model, processor, _, cache = setup
    calls = []
    orig = model.generate
    monkeypatch.setattr(model, "generate", lambda *a, **k: calls.append(1) or orig(*a, **k))
    cache.memo.clear()
    configs = {"a": {"method": "svd", "rank": 3}, "b": {"method": "svd", "rank": 3}}
    table = evaluate_cached(model, processor, cache, configs, [576, 16], batch_size=N_SAMPLES)
    assert len(calls) == 2  # one run at 576, one at 16: config b reuses a's answers
    assert table["accuracy"].tolist()[:2] == table["accuracy"].tolist()[2:]
    assert (table["n"] == N_SAMPLES).all() and {"residual", "floor", "acc_color"} <= set(table.columns)


def test_budget_table_and_panels():
    import matplotlib

    matplotlib.use("Agg")
    import pandas as pd

    from svdprune_utils.analysis.ablation import budget_table
    from svdprune_utils.notebook.plotting import budget_panels

    rows = [dict(config=c, budget=b, accuracy=a, region_recall=a / 2, residual=1 / b, floor=0.5 / b)
            for c, a in (("z-first", 0.5), ("a-second", 0.25)) for b in (16, 64, 576)]
    summary = pd.DataFrame(rows)
    t = budget_table(summary)
    assert list(t.index) == ["z-first", "a-second"] and list(t.columns) == [576, 64, 16]
    assert t.loc["a-second", 64] == 25.0
    fig, axes = budget_panels(summary.assign(region_recall=float("nan")))  # an all-NaN metric is skipped
    assert [ax.get_ylabel() for ax in axes] == ["accuracy", "projection residual"]
    assert any(line.get_label() == "Eckart–Young floor" for line in axes[-1].get_lines())
    matplotlib.pyplot.close(fig)


def test_the_peers_cached_signals_and_their_errors(setup):
    from svdprune_utils.analysis.ablation import answer_cached, answer_in_llm, reduce_cached
    from svdprune_utils.hf.signals import instruction_relevance
    model, processor, data, cache = setup
    heads = model.config.vision_config.num_attention_heads
    torch.testing.assert_close(cache.attention_sum, cache.attention * heads)
    assert cache.keys.shape == (N_SAMPLES, 576, model.config.vision_config.hidden_size // heads)
    x = processor(images=[data[1]["image"]], text=[tiny.PROMPT.format(question=data[1]["question"])],
                  return_tensors="pt")
    proj = cache.features["projected"][1:2]
    ref = instruction_relevance(model, x, x["input_ids"] == model.config.image_token_id, torch.tensor([0]), list(proj))
    torch.testing.assert_close(cache.relevance[1], ref[0])
    kept, merged = reduce_cached(cache, {"method": "visionzip"}, 16)
    assert kept.shape == (N_SAMPLES, 16) and merged.shape == (N_SAMPLES, 16, cache.feature("vision").shape[-1])
    assert reduce_cached(cache, {"method": "vispruner"}, 16)[1] is None
    with pytest.raises(ValueError, match="per-call signals"):
        reduce_cached(cache, {"method": "cdpruner", "relevance": cache.relevance}, 16)
    with pytest.raises(ValueError, match="feature must be 'vision' or 'projected'"):
        reduce_cached(cache, {"method": "visionzip", "feature": -1}, 16)
    with pytest.raises(ValueError, match="inside the language model"):
        reduce_cached(cache, {"method": "sparsevlm"}, 16)
    with pytest.raises(ValueError, match="need a tag"):
        answer_cached(model, processor, cache, [0], kept[:1], features=merged[:1])
    with pytest.raises(ValueError, match="in-LLM methods"):
        answer_in_llm(model, processor, cache, [0], 16, "svd")


@pytest.mark.parametrize("method, feature", [("visionzip", None), ("visionzip", "projected"), ("vispruner", None),
                                             ("cdpruner", None)])
def test_the_cached_reduction_hands_the_llm_the_patchs_features(setup, method, feature):
    """What the language model receives per image — kept positions and their features (VisionZip: merged tokens,
    projected as the patch projects them) — equals the patch's own (``prune_inputs``), to float precision."""
    from svdprune_utils.analysis.ablation import reduce_cached
    from svdprune_utils.hf.patch import patch_llava, prune_inputs, unpatch_llava
    model, processor, data, cache = setup
    cfg = {"method": method} if feature is None else {"method": method, "feature": feature}
    kept, merged = reduce_cached(cache, cfg, 24, samples=[0, 1])
    if merged is not None and feature != "projected":
        with torch.inference_mode():
            merged = model.model.multi_modal_projector(merged)
    got = merged if merged is not None else torch.stack([cache.features["projected"][i][kept[j]]
                                                          for j, i in enumerate([0, 1])])
    x = processor(images=[data[i]["image"] for i in (0, 1)],
                  text=[tiny.PROMPT.format(question=data[i]["question"]) for i in (0, 1)], return_tensors="pt",
                  padding=True)
    patch_llava(model, method=method, budget=24, **({} if feature is None else {"feature": feature}))
    try:
        with torch.inference_mode():
            p = prune_inputs(model, **x)
    finally:
        unpatch_llava(model)
    assert torch.equal(p.kept.cpu(), kept.cpu())
    ref = torch.stack(list(p.inputs["mm_encoder_outputs"]["image"].pooler_output))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_evaluate_cached_answers_visionzip_from_its_merged_tokens(setup, monkeypatch):
    # the answers of a random model barely move when 4 of 24 tokens change, so check what evaluate_cached passes on
    import svdprune_utils.analysis.ablation as A
    from svdprune_utils.hf.patch import patch_llava, prune_inputs, unpatch_llava
    model, processor, data, cache = setup
    seen = []
    real = A.answer_cached

    def spy(*args, **kw):
        seen.append(kw.get("features"))
        return real(*args, **kw)

    monkeypatch.setattr(A, "answer_cached", spy)
    A.evaluate_cached(model, processor, cache, {"vz": {"method": "visionzip"}}, [24], samples=[0, 1], residual=False)
    x = processor(images=[data[i]["image"] for i in (0, 1)],
                  text=[tiny.PROMPT.format(question=data[i]["question"]) for i in (0, 1)], return_tensors="pt",
                  padding=True)
    patch_llava(model, method="visionzip", budget=24)
    try:
        with torch.inference_mode():
            ref = torch.stack(list(prune_inputs(model, **x).inputs["mm_encoder_outputs"]["image"].pooler_output))
    finally:
        unpatch_llava(model)
    assert len(seen) == 1 and seen[0] is not None
    torch.testing.assert_close(seen[0], ref, rtol=1e-5, atol=1e-6)


def test_merged_tokens_reach_the_llm_by_one_rule(setup):
    """hf.prune.merged_to_llm, shared by the patch and evaluate_cached: the projector for tokens merged in the
    tower's space, nothing for tokens merged after it; any other space is refused."""
    from svdprune_utils.hf.prune import merged_to_llm

    model = setup[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, model.config.vision_config.hidden_size, generator=g)
    with torch.inference_mode():
        torch.testing.assert_close(merged_to_llm(model, x, "vision"), model.model.multi_modal_projector(x))
    y = torch.randn(2, 5, model.config.text_config.hidden_size, generator=g)
    assert merged_to_llm(model, y, "projected") is y
    with pytest.raises(ValueError, match="space must be"):
        merged_to_llm(model, x, -2)
