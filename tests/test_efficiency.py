"""efficiency: FLOPs and KV-cache formulas against hand-computed values for LLaVA-1.5-7B."""

import pathlib

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlavaConfig

from svdprune_utils.analysis.efficiency import kv_cache_bytes, measure_prefill, prefill_flops

CFG = LlavaConfig.from_json_file(str(pathlib.Path(__file__).resolve().parents[1] / "data/configs/llava-1.5-7b.json"))


def test_fastv_formula_hand_computed():
    # d = 4096, m = 11008, 32 layers; n = 576 image + 64 text tokens
    n = 640
    per_layer = 4 * n * 4096**2 + 2 * n**2 * 4096 + 2 * n * 4096 * 11008
    # 42_949_672_960 + 3_355_443_200 + 57_713_623_040
    assert per_layer == 104_018_739_200
    assert prefill_flops(CFG, n, formula="fastv") == 32 * per_layer


def test_llama_formula_hand_computed():
    n = 100
    # q,k,v,o: 4 * 4096^2 MACs per token; attention 2 * n * 4096 MACs per token; SwiGLU 3 * 4096 * 11008
    macs = n * (4 * 4096 * 4096 + 2 * n * 4096 + 3 * 4096 * 11008)
    assert prefill_flops(CFG, n) == 32 * 2 * macs


def test_gqa_changes_only_the_kv_projections():
    t = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2)
    n = 10
    macs = n * (2 * 64 * 64 + 2 * 64 * 16 + 2 * n * 64 + 3 * 64 * 128)
    assert prefill_flops(t, n) == 2 * 2 * macs


def test_fastv_pruning_counts_layers_before_k_in_full():
    full, pruned = prefill_flops(CFG, 640), prefill_flops(CFG, 640 - 512)
    fastv = prefill_flops(CFG, 640, n_after=128, prune_layer=2)
    assert full % 32 == 0 and pruned % 32 == 0
    assert fastv == 2 * (full // 32) + 30 * (pruned // 32)
    assert pruned < fastv < full
    with pytest.raises(ValueError):
        prefill_flops(CFG, 10, n_after=11)
    with pytest.raises(ValueError):
        prefill_flops(CFG, 10, prune_layer=33)
    with pytest.raises(ValueError):
        prefill_flops(CFG, 10, formula="gpt")


def test_kv_cache_bytes_hand_computed():
    # fp16: 2 (k, v) * 4096 * 2 bytes = 16 KiB per token per layer; 32 layers -> 512 KiB per token
    assert kv_cache_bytes(CFG, 1, torch.float16) == 524_288
    assert kv_cache_bytes(CFG, 640, torch.float16) == 640 * 524_288
    assert kv_cache_bytes(CFG, 640, torch.float32) == 2 * 640 * 524_288
    assert kv_cache_bytes(CFG, 640, torch.float16, n_after=128, prune_layer=2) == 16_384 * (2 * 640 + 30 * 128)


def test_measure_prefill_returns_a_positive_median():
    model = torch.nn.Linear(4, 4)
    out = measure_prefill(lambda_model(model), {"x": torch.ones(2, 4)}, repeats=3)
    assert out["median_s"] > 0 and out["min_s"] <= out["median_s"] and out["repeats"] == 3
    with pytest.raises(ValueError):
        measure_prefill(model, {}, repeats=0)


def lambda_model(lin):
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x, use_cache=True):
            return self.lin(x)

    return M()


def test_measure_generate_on_a_tiny_llava():
    from svdprune_utils.analysis.efficiency import measure_generate
    from svdprune_utils.testbed import tiny

    model = tiny.build_model(seed=0).eval()
    ids, mask = tiny.encode_ids(["what color is the circle ?"])
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.zeros(1, 3, 336, 336)}
    out = measure_generate(model, inputs, max_new_tokens=3, repeats=1)
    assert out["ttft_s"] > 0 and out["decode_tok_per_s"] > 0
    assert np.isnan(out["peak_mem_bytes"])  # CPU: not measured
    with pytest.raises(ValueError):
        measure_generate(model, inputs, max_new_tokens=1)


@pytest.mark.parametrize("method, budget", [("svd", 576), ("svd", 64), ("random", 16), ("fastv", 32),
                                            ("sparsevlm", 64), ("sparsevlm", 16)])
def test_measured_cache_matches_the_kv_formula(method, budget):
    from svdprune_utils.analysis.efficiency import cache_bytes
    from svdprune_utils.hf.patch import patch_llava, unpatch_llava
    from svdprune_utils.testbed import tiny

    model = tiny.build_model(seed=0).eval()
    ids, mask = tiny.encode_ids(["what color is the circle ?"])
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.zeros(1, 3, 336, 336)}
    n_img = int((ids == model.config.image_token_id).sum())
    n_text = ids.shape[1] - n_img
    patch_llava(model, method=method, budget=budget, fastv_layer=1)
    try:
        measured = cache_bytes(model, inputs)
    finally:
        unpatch_llava(model)
    if method == "fastv" and budget < n_img:  # layer 0 holds every token, the later layers the kept ones
        expected = kv_cache_bytes(model.config, n_text + n_img, torch.float32, n_after=n_text + budget, prune_layer=1)
    elif method == "sparsevlm":  # each layer holds what it processed: a pruning layer its input
        from svdprune_utils.hf.sparsevlm import schedule

        L = model.config.text_config.num_hidden_layers
        per = [n_text + c for c in schedule(budget, L, n_img).per_layer(n_img, L)]
        assert per[0] == n_text + n_img and per[-1] == n_text + schedule(budget, L, n_img).counts[-1]
        expected = kv_cache_bytes(model.config, 0, torch.float32, per_layer=per)
    else:
        expected = kv_cache_bytes(model.config, n_text + min(budget, n_img), torch.float32)
    assert measured == expected
    with pytest.raises(ValueError, match="KV cache"):
        cache_bytes(lambda_model(torch.nn.Linear(4, 4)), {"x": torch.ones(1, 4)})


def test_prefill_table_adds_the_unpruned_baseline_and_follows_the_flops_model():
    from svdprune_utils.analysis.efficiency import prefill_table
    from svdprune_utils.testbed import tiny

    model = tiny.build_model(seed=0).eval()
    ids, mask = tiny.encode_ids(["what color is the circle ?"])
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.zeros(1, 3, 336, 336)}
    df = prefill_table(model, inputs, ["svd", "fastv"], [64, 16, 64], repeats=2, fastv_layer=1,
                       overhead_budget=16, progress=False)
    assert list(zip(df.method, df.budget)) == [("svd", 64), ("svd", 16), ("fastv", 64), ("fastv", 16)]
    assert (df["prefill_ms"] > 0).all() and (df["latency_ratio"] > 0).all()
    n_text = ids.shape[1] - 576
    svd16 = df.set_index(["method", "budget"]).loc[("svd", 16)]
    assert svd16["flops_ratio"] == prefill_flops(model.config, n_text + 16) / prefill_flops(model.config, n_text + 576)
    np.testing.assert_allclose(df["speedup_vs_flops"], df["flops_ratio"] / df["latency_ratio"])
    with pytest.raises(ValueError, match="repeats"):
        prefill_table(model, inputs, ["svd"], [16], repeats=0)
    with pytest.raises(ValueError, match="one prompt"):
        prefill_table(model, {**inputs, "input_ids": ids.repeat(2, 1)}, ["svd"], [16])


def test_time_call_runs_warmup_then_timed_calls():
    from svdprune_utils.analysis.efficiency import time_call

    calls = []
    times = time_call(lambda: calls.append(1), "cpu", repeats=3, warmup=2)
    assert len(calls) == 5 and len(times) == 3 and all(t >= 0 for t in times)


def test_budget_semantics_per_method_hand_computed():
    """LLaVA-1.5-7B, 64 text + 576 image tokens: what "64" means for a pre-LLM method, FastV (K = 2) and SparseVLM
    (the official v2.0 schedule (66, 34, 20) after layers 2, 6, 15)."""
    from svdprune_utils.analysis.efficiency import budget_table, llm_tokens

    assert llm_tokens(CFG, "svd", 64, 64, 576) == [128] * 32
    assert llm_tokens(CFG, "fastv", 64, 64, 576) == [640] * 2 + [128] * 30
    assert llm_tokens(CFG, "sparsevlm", 64, 64, 576) == [640] * 3 + [130] * 4 + [98] * 9 + [84] * 16
    assert llm_tokens(CFG, "sparsevlm", 576, 64, 576) == [640] * 32
    df = budget_table(CFG, ["svd", "fastv", "sparsevlm"], [64, 16], 64, 576).set_index(["method", "budget"])
    assert ("sparsevlm", 16) not in df.index  # below SparseVLM's minimum on 32 layers (37)
    row = df.loc[("sparsevlm", 64)]
    assert row["tokens_entering_llm"] == 576 and row["image_tokens_last_layer"] == 20
    assert row["image_tokens_per_layer"] == (3 * 576 + 4 * 66 + 9 * 34 + 16 * 20) / 32
    assert row["official_average"] == 64.4375
    full = prefill_flops(CFG, 640)
    assert row["flops_ratio"] == (3 * prefill_flops(CFG, 640) + 4 * prefill_flops(CFG, 130) + 9 * prefill_flops(
        CFG, 98) + 16 * prefill_flops(CFG, 84)) / 32 / full
    assert df.loc[("fastv", 16)]["flops_ratio"] == prefill_flops(CFG, 640, n_after=80, prune_layer=2) / full
    assert df.loc[("svd", 16)]["kv_ratio"] == 80 / 640
    with pytest.raises(ValueError, match="per_layer needs 32"):
        prefill_flops(CFG, 0, per_layer=[10] * 31)


def test_budget_table_refuses_bad_arguments():
    from svdprune_utils.analysis.efficiency import budget_table

    assert list(budget_table(CFG, "sparsevlm", [64], 64, 576)["method"]) == ["sparsevlm"]  # one name, not letters
    with pytest.raises(ValueError, match="unknown method"):
        budget_table(CFG, ["bogus"], [64], 64, 576)
    for bad in ([0], [-1], [64.5]):
        with pytest.raises(ValueError, match="budgets must be ints >= 1"):
            budget_table(CFG, ["svd"], bad, 64, 576)
    with pytest.raises(ValueError, match="n_img must be an int >= 1"):
        budget_table(CFG, ["svd"], [64], 64, 0)


def test_equal_flops_budget_against_a_linear_scan_of_the_closed_form():
    """The pre-LLM budget at equal prefill compute, against a scan over every K' of the Llama formula written out
    here (d = 4096, d_kv = 4096, m = 11008, 32 layers for LLaVA-1.5-7B)."""
    from svdprune_utils.analysis.efficiency import budget_table, equal_flops_budget

    d, dkv, m, L = 4096, 4096, 11008, 32

    def layer(n):
        return 2 * n * (2 * d * d + 2 * d * dkv) + 4 * n * n * d + 6 * n * d * m

    def scan(target, n_text):
        return max(k for k in range(577) if L * layer(n_text + k) <= target)

    n_text = 64
    for budget in (64, 32, 16):
        fastv = 2 * layer(n_text + 576) + 30 * layer(n_text + budget)
        got = equal_flops_budget(CFG, "fastv", budget, n_text, 576)
        assert got == scan(fastv, n_text)
        assert L * layer(n_text + got) <= fastv < L * layer(n_text + got + 1)  # the largest such budget
        assert got > budget  # FastV's first two layers read all 576 tokens
        assert equal_flops_budget(CFG, "svd", budget, n_text, 576) == budget  # pre-LLM: the budget itself
    sparse = 3 * layer(640) + 4 * layer(130) + 9 * layer(98) + 16 * layer(84)  # schedule of the test above
    assert equal_flops_budget(CFG, "sparsevlm", 64, n_text, 576) == scan(sparse, n_text)
    assert equal_flops_budget(CFG, "fastv", 576, n_text, 576) == 576
    assert equal_flops_budget(CFG, "fastv", 64, n_text, 576, fastv_layer=0) == 64  # cut before layer 0: pre-LLM
    df = budget_table(CFG, ["svd", "fastv"], [64], n_text, 576).set_index("method")
    assert df.loc["fastv", "equal_flops_budget"] == scan(2 * layer(640) + 30 * layer(128), n_text)
    assert df.loc["svd", "equal_flops_budget"] == 64


def test_equal_flops_budget_refuses_bad_arguments():
    """The same checks as budget_table (they share them): no silent number for a bad method or count."""
    from svdprune_utils.analysis.efficiency import equal_flops_budget

    with pytest.raises(ValueError, match="unknown method"):
        equal_flops_budget(CFG, "bogus", 64, 40, 576)
    for budget in (0, True, 2.5):
        with pytest.raises(ValueError, match="budgets must be ints >= 1"):
            equal_flops_budget(CFG, "fastv", budget, 40, 576)
    with pytest.raises(ValueError, match="n_text must be an int >= 0"):
        equal_flops_budget(CFG, "fastv", 64, -1, 576)
    with pytest.raises(ValueError, match="n_img must be an int >= 1"):
        equal_flops_budget(CFG, "fastv", 64, 40, 0)
    with pytest.raises(ValueError, match="at least 37"):
        equal_flops_budget(CFG, "sparsevlm", 16, 40, 576)
