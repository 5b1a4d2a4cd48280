"""patch_llava / unpatch_llava / capture_attention on a tiny random LLaVA-1.5-shaped model (conftest)."""

from __future__ import annotations

import pytest
import torch
from conftest import build_llava_inputs, build_tiny_llava
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

from svdprune_utils.core.reduction import REDUCERS
from svdprune_utils.core.selection import SELECTORS, select_tokens
from svdprune_utils.hf.attention import capture_attention
from svdprune_utils.hf.patch import patch_llava, unpatch_llava
from svdprune_utils.hf.prune import IN_LLM

N = 576  # patches per image (336 / 14)²
METHODS = sorted({*SELECTORS, *REDUCERS, *IN_LLM})  # every method patch_llava takes
PRE_LLM = [m for m in METHODS if m not in IN_LLM]
PEERS = ["vispruner", "cdpruner", "visionzip"]  # peers whose signals the patch computes (tests/test_llava_peers.py)
MIXED = [(3, 1, 4), (9, 1, 2), (1, 1, 7)]  # 3 prompts of different lengths, one image each


def _logits(model, x):
    with torch.no_grad():
        return model(**x).logits


def _greedy(model, x, n=5, **kw):
    with torch.no_grad():
        out = model.generate(**x, max_new_tokens=n, do_sample=False, return_dict_in_generate=True,
                             output_logits=True, **kw)
    return out.sequences, torch.stack(out.logits, 1)


def _row(x, b, images_before=None):
    """Row b of a padded batch, unpadded, with its own image(s) (one image per row unless told)."""
    keep = x["attention_mask"][b].bool()
    first = b if images_before is None else images_before
    n_img = int((x["input_ids"][b] == 127).sum()) // N
    return {"input_ids": x["input_ids"][b][keep][None], "attention_mask": x["attention_mask"][b][keep][None],
            "pixel_values": x["pixel_values"][first:first + n_img]}


def _layer_input(model, layer_idx):
    """Register a pre-hook recording the hidden states entering LLM layer ``layer_idx`` (after the patch's)."""
    box = []
    layer = model.model.language_model.layers[layer_idx]
    handle = layer.register_forward_pre_hook(lambda m, args: box.append(args[0].detach().clone()))
    return box, handle


def _hook_count(model):
    """Forward (pre-)hooks on the model, not counting the output-capturing hooks transformers
    installs lazily on the vision tower at its first forward."""
    hooks = [h for m in model.modules() for h in (*m._forward_pre_hooks.values(), *m._forward_hooks.values())]
    return sum(getattr(h, "__name__", "") != "output_capturing_hook" for h in hooks)


@pytest.mark.parametrize("method", METHODS)
def test_full_budget_is_identical_to_unpatched(tiny_llava, method):
    x = build_llava_inputs(MIXED[:2])
    ref_logits, (ref_seq, ref_gen_logits) = _logits(tiny_llava, x), _greedy(tiny_llava, x)
    patch_llava(tiny_llava, method=method, budget=N)
    assert torch.equal(_logits(tiny_llava, x), ref_logits)
    seq, gen_logits = _greedy(tiny_llava, x)
    assert torch.equal(seq, ref_seq) and torch.equal(gen_logits, ref_gen_logits)
    assert torch.equal(tiny_llava.svdprune.kept_indices, torch.arange(N).expand(2, N))
    tiny_llava.svdprune.budget = 10**6
    assert torch.equal(_logits(tiny_llava, x), ref_logits)


@pytest.mark.parametrize("method", PRE_LLM)
def test_language_model_receives_k_tokens_per_image(tiny_llava, method):
    x = build_llava_inputs([(3, 1, 4), (2, 2, 1), (5, 1, 1)])  # 4 images, rows of 1, 2 and 1 images
    K, seen = 16, []
    patch_llava(tiny_llava, method=method, budget=K)
    embed = tiny_llava.get_input_embeddings()
    handle = embed.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    first, h2 = _layer_input(tiny_llava, 0)
    try:
        _logits(tiny_llava, x)
        seq, _ = _greedy(tiny_llava, x, n=3)
    finally:
        handle.remove(), h2.remove()
    for ids in (seen[0], seen[1]):  # the forward call, then generate's prefill
        assert (ids == 127).sum(1).tolist() == [K, 2 * K, K]
    lengths = x["attention_mask"].sum(1) - torch.tensor([1, 2, 1]) * (N - K)
    assert first[0].shape[1] == int(lengths.max())
    assert seen[2].shape[1] == 1  # decoding steps feed one token at a time
    kept = tiny_llava.svdprune.kept_indices
    assert kept.shape == (4, K) and bool((kept.diff(dim=1) > 0).all()) and int(kept.max()) < N
    # generate hands back the caller's prompt (with its N placeholders) followed by the new tokens
    assert torch.equal(seq[:, : x["input_ids"].shape[1]], x["input_ids"]) and seq.shape[1] == x["input_ids"].shape[1] + 3


def test_fastv_layer_k_receives_k_tokens_per_image(tiny_llava):
    x = build_llava_inputs(MIXED)
    patch_llava(tiny_llava, method="fastv", budget=16, fastv_layer=2)
    before, h1 = _layer_input(tiny_llava, 1)
    at, h2 = _layer_input(tiny_llava, 2)
    try:
        _logits(tiny_llava, x)
    finally:
        h1.remove(), h2.remove()
    S = x["input_ids"].shape[1]
    assert before[0].shape[1] == S and at[0].shape[1] == S - (N - 16)
    assert tiny_llava.svdprune.kept_indices.shape == (3, 16)


@pytest.mark.parametrize("method", ["svd", "fastv", "sparsevlm", *PEERS])
def test_left_padded_batch_equals_rows_one_by_one(tiny_llava, method):
    x = build_llava_inputs(MIXED)
    patch_llava(tiny_llava, method=method, budget=16)
    seq, logits = _greedy(tiny_llava, x)
    kept = tiny_llava.svdprune.kept_indices
    S = x["input_ids"].shape[1]
    for b in range(3):
        one = _row(x, b)
        s1, l1 = _greedy(tiny_llava, one)
        assert torch.equal(seq[b, S:], s1[0, one["input_ids"].shape[1]:])
        torch.testing.assert_close(logits[b], l1[0], atol=1e-4, rtol=1e-4)
        assert torch.equal(tiny_llava.svdprune.kept_indices[0], kept[b])


def test_rows_with_different_image_counts_are_repadded_correctly(tiny_llava):
    x = build_llava_inputs([(3, 2, 4), (9, 1, 2)])  # row 0 loses twice as many placeholders as row 1
    patch_llava(tiny_llava, method="svd", budget=16)
    seq, logits = _greedy(tiny_llava, x)
    S = x["input_ids"].shape[1]
    for b, first_image in [(0, 0), (1, 2)]:
        one = _row(x, b, images_before=first_image)
        s1, l1 = _greedy(tiny_llava, one)
        assert torch.equal(seq[b, S:], s1[0, one["input_ids"].shape[1]:])
        torch.testing.assert_close(logits[b], l1[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["svd", "fastv", "sparsevlm", *PEERS])
def test_generate_with_cache_equals_without(tiny_llava, method):
    x = build_llava_inputs(MIXED)
    patch_llava(tiny_llava, method=method, budget=16)
    # without a cache every step re-reads the whole sequence, where a generated placeholder id would count as an
    # image token (unpatched too): the random model is kept from generating it
    seq, logits = _greedy(tiny_llava, x, n=6, suppress_tokens=[127])
    kept = tiny_llava.svdprune.kept_indices.clone()
    seq_nc, logits_nc = _greedy(tiny_llava, x, n=6, use_cache=False, suppress_tokens=[127])
    assert torch.equal(seq, seq_nc)
    torch.testing.assert_close(logits, logits_nc, atol=1e-4, rtol=1e-4)
    assert torch.equal(kept, tiny_llava.svdprune.kept_indices)


def test_fastv_is_faithful(tiny_llava):
    """Layer-K inputs of the kept tokens equal the unpruned run's; the kept image tokens are the top-K
    by last-token attention at layer K−1 (heads averaged), read from an eager twin's attention weights."""
    x = build_llava_inputs(MIXED[:2])
    K_layer, budget = 2, 16
    full, h = _layer_input(tiny_llava, K_layer)
    try:
        _logits(tiny_llava, x)
    finally:
        h.remove()
    patch_llava(tiny_llava, method="fastv", budget=budget, fastv_layer=K_layer)
    pruned, h = _layer_input(tiny_llava, K_layer)
    try:
        _logits(tiny_llava, x)
    finally:
        h.remove()
    kept = tiny_llava.svdprune.kept_indices  # (2, budget)
    img = x["input_ids"] == 127
    start = img.int().argmax(1)
    rows = torch.sort(torch.cat([(~img).nonzero()[:, 1].view(2, -1), start[:, None] + kept], 1), 1).values
    assert torch.equal(pruned[0], full[0].gather(1, rows[..., None].expand(-1, -1, full[0].shape[-1])))

    eager = build_tiny_llava(attn="eager")
    with torch.no_grad():
        att = eager(**x, output_attentions=True).attentions[K_layer - 1]  # (B, H, S, S)
    last = att[:, :, -1].mean(1)
    for b in range(2):
        scores = last[b, start[b]:start[b] + N]
        assert torch.equal(kept[b], torch.topk(scores, budget).indices.sort().values)


def test_unpatch_restores_never_patched_behaviour(tiny_llava):
    x = build_llava_inputs(MIXED[:2])
    ref_logits, (ref_seq, _) = _logits(tiny_llava, x), _greedy(tiny_llava, x)
    n_hooks = _hook_count(tiny_llava)
    for method in ("fastv", "cls_attention", "svd"):
        patch_llava(tiny_llava, method=method, budget=8)
        _logits(tiny_llava, x), _greedy(tiny_llava, x)
    unpatch_llava(tiny_llava)
    assert not hasattr(tiny_llava, "svdprune")
    assert {"forward", "generate"}.isdisjoint(vars(tiny_llava)) and "get_image_features" not in vars(tiny_llava.model)
    assert _hook_count(tiny_llava) == n_hooks
    assert torch.equal(_logits(tiny_llava, x), ref_logits) and torch.equal(_greedy(tiny_llava, x)[0], ref_seq)
    unpatch_llava(tiny_llava)  # unpatching an unpatched model is a no-op


def test_unpatch_restores_an_existing_instance_attribute(tiny_llava):
    own = tiny_llava.forward  # e.g. accelerate's hooks set `model.forward` on the instance
    tiny_llava.forward = own
    patch_llava(tiny_llava, budget=8)
    assert tiny_llava.forward is not own
    unpatch_llava(tiny_llava)
    assert vars(tiny_llava)["forward"] is own


def test_errors(tiny_llava):
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=32))
    for wrong in (llama, torch.nn.Linear(2, 2)):
        with pytest.raises(TypeError, match=type(wrong).__name__):
            patch_llava(wrong)
    for budget in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="budget"):
            patch_llava(tiny_llava, budget=budget)
    with pytest.raises(ValueError, match="pivoted_qr"):  # the message lists the registry
        patch_llava(tiny_llava, method="nope")
    with pytest.raises(ValueError, match="feature"):
        patch_llava(tiny_llava, feature="pixels")
    for layer in (0, 4):
        with pytest.raises(ValueError, match="fastv_layer"):
            patch_llava(tiny_llava, method="fastv", fastv_layer=layer)
    assert not hasattr(tiny_llava, "svdprune")  # failed patches leave nothing behind
    patch_llava(tiny_llava, method="svd", budget=8)
    with pytest.raises(ValueError, match="budget"):
        patch_llava(tiny_llava, budget=0)
    assert tiny_llava.svdprune.budget == 8  # a failed re-patch keeps the previous one
    tiny_llava.svdprune.budget = 0
    with pytest.raises(ValueError, match="budget"):
        _logits(tiny_llava, build_llava_inputs(MIXED[:1]))


def test_fastv_refuses_other_caches(tiny_llava):
    x = build_llava_inputs(MIXED[:1])
    patch_llava(tiny_llava, method="fastv", budget=8)
    cache = StaticCache(config=tiny_llava.config.text_config, max_cache_len=700)
    with pytest.raises(TypeError, match="DynamicCache"):
        tiny_llava(**x, cache=cache, use_cache=True)
    assert tiny_llava.svdprune._call is None  # no per-call state left behind


@pytest.mark.parametrize(("method", "feature", "extra"), [
    ("svd", "vision", {}), ("svd", "projected", {}), ("svd", "vision", {"rank": 4, "center": True}),
    ("norm", "vision", {}), ("cls_attention", "vision", {}), ("uniform", "vision", {}),
])
def test_kept_indices_equal_select_tokens_on_the_same_features(tiny_llava, method, feature, extra):
    x = build_llava_inputs(MIXED[:2])
    with torch.no_grad():
        out = tiny_llava.model.get_image_features(pixel_values=x["pixel_values"])
        eager_tower = build_tiny_llava(attn="eager").model.vision_tower
        att = eager_tower(x["pixel_values"], output_attentions=True).attentions[0]  # layer whose output is hs[-2]
    feats = out.hidden_states[-2][:, 1:] if feature == "vision" else torch.stack(out.pooler_output)
    cls = att[:, :, 0, 1:].mean(1)
    expected = select_tokens(feats, 24, method=method, attention=cls, grid=(24, 24), **extra)
    patch_llava(tiny_llava, method=method, budget=24, feature=feature, **extra)
    seen, lm_in = [], []
    h1 = tiny_llava.get_input_embeddings().register_forward_hook(lambda m, a, o: seen.append(a[0]))
    h2 = tiny_llava.model.language_model.register_forward_pre_hook(
        lambda m, a, k: lm_in.append(k["inputs_embeds"]), with_kwargs=True)
    try:
        _logits(tiny_llava, x)
    finally:
        h1.remove(), h2.remove()
    assert torch.equal(tiny_llava.svdprune.kept_indices, expected)
    # and the LLM's inputs at the 24 placeholders of each row are the kept tokens' projected features, in order
    ids, emb = seen[0], lm_in[0]
    for i in range(2):
        assert torch.equal(emb[i][ids[i] == 127], out.pooler_output[i][expected[i]])


def test_patching_twice_replaces_and_budget_is_a_live_knob(tiny_llava):
    x = build_llava_inputs(MIXED[:2])
    n_hooks = _hook_count(tiny_llava)
    patch_llava(tiny_llava, method="svd", budget=64)
    patch_llava(tiny_llava, method="norm", budget=16)
    assert _hook_count(tiny_llava) == n_hooks + len(tiny_llava.model.language_model.layers)
    seen = []
    handle = tiny_llava.get_input_embeddings().register_forward_hook(lambda m, a, o: seen.append(a[0]))
    try:
        _logits(tiny_llava, x)
        tiny_llava.svdprune.budget = 32
        _logits(tiny_llava, x)
    finally:
        handle.remove()
    assert (seen[0] == 127).sum(1).tolist() == [16, 16] and (seen[1] == 127).sum(1).tolist() == [32, 32]
    feats = tiny_llava.model.vision_tower(x["pixel_values"], output_hidden_states=True).hidden_states[-2][:, 1:]
    assert torch.equal(tiny_llava.svdprune.kept_indices, select_tokens(feats, 32, method="norm"))
    tiny_llava.svdprune.method, tiny_llava.svdprune.budget = "fastv", 8  # the method is a knob too
    at, h = _layer_input(tiny_llava, 2)
    try:
        _logits(tiny_llava, x)
    finally:
        h.remove()
    assert at[0].shape[1] == x["input_ids"].shape[1] - (N - 8)


def test_capture_attention_matches_eager_weights_and_cleans_up(tiny_llava):
    x = build_llava_inputs(MIXED[:2])
    n_hooks = _hook_count(tiny_llava)
    maps = capture_attention(tiny_llava, x, layers=[0, -1])
    assert _hook_count(tiny_llava) == n_hooks
    eager = build_tiny_llava(attn="eager")
    with torch.no_grad():
        out = eager(**x, output_attentions=True)
        vis = eager.model.vision_tower(x["pixel_values"], output_attentions=True).attentions[0]
    img = (x["input_ids"] == 127).nonzero()[:, 1].view(2, N)
    S = x["input_ids"].shape[1]
    for layer in (0, 3):
        ref = out.attentions[layer].mean(1).gather(2, img[:, None, :].expand(-1, S, -1))
        assert maps.lm[layer].shape == (2, S, N) and torch.equal(maps.image_positions[layer], img)
        torch.testing.assert_close(maps.lm[layer], ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(maps.vision, vis[:, :, 0, 1:].mean(1), atol=1e-5, rtol=1e-4)
    per_head = capture_attention(tiny_llava, x, layers=[1], per_head=True)
    assert per_head.lm[1].shape == (2, 4, S, N) and per_head.vision.shape == (2, 2, N)

    bad = dict(x, pixel_values=x["pixel_values"][:1])  # one image for two placeholder runs: the model raises
    with pytest.raises(Exception):
        capture_attention(tiny_llava, bad)
    assert _hook_count(tiny_llava) == n_hooks


def test_capture_attention_on_a_fastv_patched_model(tiny_llava):
    x = build_llava_inputs(MIXED[:2])
    patch_llava(tiny_llava, method="fastv", budget=16)
    maps = capture_attention(tiny_llava, x)
    S = x["input_ids"].shape[1]
    assert maps.lm[1].shape == (2, S, N) and maps.lm[2].shape == (2, S - N + 16, 16)
    # text before the image is never pruned, so the 16 kept image tokens start where the image did
    start = maps.image_positions[1][:, :1]
    assert torch.equal(maps.image_positions[2], start + torch.arange(16))
    assert bool((maps.lm[2].sum(-1) < maps.lm[1].sum(-1)[:, -1:].max() + 1).all())  # finite shares <= 1


def test_divprune_scores_the_projected_features_by_default(tiny_llava):
    """As its authors' code does (the LLM's input); feature="vision" still overrides."""
    x = build_llava_inputs(MIXED[:2])
    with torch.no_grad():
        out = tiny_llava.model.get_image_features(pixel_values=x["pixel_values"])
    proj, vis = torch.stack(out.pooler_output), out.hidden_states[-2][:, 1:]
    patch_llava(tiny_llava, method="divprune", budget=24)
    _logits(tiny_llava, x)
    assert torch.equal(tiny_llava.svdprune.kept_indices, select_tokens(proj, 24, method="divprune"))
    tiny_llava.svdprune.feature = "vision"
    _logits(tiny_llava, x)
    assert torch.equal(tiny_llava.svdprune.kept_indices, select_tokens(vis, 24, method="divprune"))
    assert not torch.equal(select_tokens(proj, 24, method="divprune"), select_tokens(vis, 24, method="divprune"))


def test_patch_llava_points_other_families_to_patch_model():
    """patch_llava stays LLaVA-1.5 only: LLaVA-NeXT and Qwen2.5-VL models (tiny, random, built here) are refused
    with a message pointing to patch_model, and nothing of theirs is touched."""
    from transformers import (CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration, Qwen2_5_VLConfig,
                              Qwen2_5_VLForConditionalGeneration)

    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, vocab_size=64)
    nxt = LlavaNextForConditionalGeneration(LlavaNextConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=28, patch_size=14),
        text_config=LlamaConfig(**text), image_token_index=63, image_grid_pinpoints=[[28, 28]]))
    qwen = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(**text, rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16),
        image_token_id=60, video_token_id=61, vision_start_token_id=62, vision_end_token_id=63))
    for model in (nxt, qwen):
        before = dict(vars(model))
        with pytest.raises(TypeError, match=f"got {type(model).__name__} — use patch_model for this family"):
            patch_llava(model, budget=4)
        assert vars(model).keys() == before.keys() and not hasattr(model, "svdprune")
