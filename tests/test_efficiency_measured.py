"""The FLOPs model against torch's own FLOP counter, and the timers against known sleeps / scripted costs."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import build_llava_inputs, build_tiny_llava
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaModel

import svdprune_utils.analysis.efficiency as E


@pytest.mark.parametrize(("heads", "kv_heads", "n"), [(4, 4, 37), (8, 2, 64)])
def test_prefill_flops_equal_torch_flop_counter(heads, kv_heads, n):
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, vocab_size=50)
    cfg._attn_implementation = "eager"  # plain matmuls for the counter (sdpa counts the same products)
    model = LlamaModel(cfg).eval()
    ids = torch.randint(0, 50, (1, n), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids, use_cache=False)
    assert counter.get_total_flops() == E.prefill_flops(cfg, n)


class _Scripted(torch.nn.Module):
    """forward sleeps ``prefill_s`` on its first call of a generate and ``step_s`` after; generate sleeps
    ``encode_s`` before its first forward (like the tower and the selection) and runs ``max_new_tokens``
    forwards."""

    def __init__(self, encode_s, prefill_s, step_s):
        super().__init__()
        self.lin = torch.nn.Linear(1, 1)
        self.encode_s, self.prefill_s, self.step_s, self.calls = encode_s, prefill_s, step_s, 0

    def forward(self, x=None, use_cache=True):
        time.sleep(self.prefill_s if self.calls == 0 else self.step_s)
        self.calls += 1

    def generate(self, max_new_tokens, min_new_tokens=None, do_sample=False, **inputs):
        self.calls = 0
        time.sleep(self.encode_s)
        for _ in range(max_new_tokens):
            self(**inputs)


def test_time_call_and_measure_prefill_against_a_known_sleep():
    times = E.time_call(lambda: time.sleep(0.03), "cpu", repeats=3, warmup=0)
    assert len(times) == 3 and all(0.03 <= t < 0.06 for t in times)
    m = _Scripted(0.0, 0.02, 0.02)
    out = E.measure_prefill(m, {}, repeats=3, warmup=0)
    assert 0.02 <= out["min_s"] <= out["median_s"] < 0.04


def test_ttft_is_encode_plus_prefill_and_decode_rate_is_one_over_the_step():
    m = _Scripted(encode_s=0.03, prefill_s=0.04, step_s=0.01)
    out = E.measure_generate(m, {}, max_new_tokens=6, repeats=2)
    assert 0.07 <= out["ttft_s"] < 0.095  # not the whole generate (0.12 s)
    assert 70 < out["decode_tok_per_s"] <= 100  # 1 / 0.01 s, minus overhead


def test_prefill_table_columns_from_scripted_times(monkeypatch):
    model = build_tiny_llava()
    x = build_llava_inputs([(3, 1, 4)])
    n_text = x["input_ids"].shape[1] - 576

    calls = {}

    def fake_time_call(fn, device, repeats, warmup):  # 1 ms per kept token, +0.5 ms for FastV;
        s = model.svdprune                             # the last of the 3 timed rounds is 3x slower
        key = (s.method, s.budget)
        calls[key] = calls.get(key, -1) + 1  # 0 = the warm-up round
        return [(1e-3 * min(s.budget, 576) + (5e-4 if s.method == "fastv" else 0.0)) * (3 if calls[key] == 3 else 1)]

    monkeypatch.setattr(E, "time_call", fake_time_call)
    monkeypatch.setattr(E, "selection_time", lambda method, n, d, budget, device, repeats: 0.002)
    df = E.prefill_table(model, x, ["svd", "fastv"], [576, 64, 16], repeats=3, progress=False).set_index(
        ["method", "budget"])
    assert df.loc[("svd", 64), "prefill_ms"] == pytest.approx(64.0)
    assert df.loc[("svd", 64), "latency_ratio"] == pytest.approx(64 / 576)
    assert df.loc[("fastv", 64), "latency_ratio"] == pytest.approx(64.5 / 576)
    full = E.prefill_flops(model.config, n_text + 576)
    assert df.loc[("svd", 64), "flops_ratio"] == pytest.approx(E.prefill_flops(model.config, n_text + 64) / full)
    fv = E.prefill_flops(model.config, n_text + 576, n_after=n_text + 64, prune_layer=2) / full
    assert df.loc[("fastv", 64), "flops_ratio"] == pytest.approx(fv)
    assert df.loc[("svd", 64), "speedup_vs_flops"] == pytest.approx(df.loc[("svd", 64), "flops_ratio"] / (64 / 576))
    assert df.loc[("fastv", 64), "kv_cache_bytes"] == E.kv_cache_bytes(
        model.config, n_text + 576, torch.float32, n_after=n_text + 64, prune_layer=2)
    assert df.loc[("svd", 16), "kv_cache_bytes"] == E.kv_cache_bytes(model.config, n_text + 16, torch.float32)
    assert df.loc[("svd", 16), "selection_ms"] == pytest.approx(2.0)
    assert df.loc[("svd", 16), "selection_pct"] == pytest.approx(100 * 2.0 / 64.0)  # of the prefill at 64
    assert df.loc[("fastv", 576), "selection_pct"] == pytest.approx(100 * 2.0 / 64.5)
