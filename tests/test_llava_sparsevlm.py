"""SparseVLM v2.0 inside the LLM (svdprune_utils.hf.sparsevlm + the cut machinery of hf.fastv), against an
independent transcription of the official rules (Gumpest/SparseVLMs, main 26a5f48, USE_VERSION=2_0): the schedule
table and its counter, the raters, the RoPE gravity correction, head selection, and a whole pruned forward rebuilt
layer by layer with transformers' own decoder layers (eager twin). The generic contract (full budget = unpatched,
batch = rows, cache = no cache, continuation, beams, right padding, towers, inputs_embeds) runs in
tests/test_llava.py and tests/test_llava_contract.py, which include "sparsevlm"."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import IMAGE_TOKEN_ID, build_llava_inputs, build_tiny_llava
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from svdprune_utils.hf import sparsevlm as svlm
from svdprune_utils.hf.patch import patch_llava

N = 576


# --------------------------------------------------------------------------------------------- schedule
def test_official_schedule_and_its_counter():
    """score.py's v2.0 table at layers 2/6/15; the average is the official counter: layers 0-1 count 576, the
    pruning layer counts its pruned output (hand-computed: 64 -> (2*576 + 4*66 + 9*34 + 17*20) / 32 = 64.4375)."""
    table = {64: (66, 34, 20), 96: (246, 54, 28), 128: (238, 108, 60), 192: (300, 200, 118)}
    for budget, counts in table.items():
        s = svlm.schedule(budget, 32, 576)
        assert s.layers == (2, 6, 15) and s.counts == counts and s.official
        assert s.average == (2 * 576 + 4 * counts[0] + 9 * counts[1] + 17 * counts[2]) / 32
        assert s.cuts == (3, 7, 16)
    assert svlm.schedule(64, 32).average == 64.4375
    assert svlm.schedule(128, 32).average == 128.0
    s13 = svlm.schedule(128, 40)  # the 13B: the official code runs the same layers and counts
    assert s13.official and s13.counts == (238, 108, 60)
    assert s13.average == (2 * 576 + 4 * 238 + 9 * 108 + 25 * 60) / 40


@pytest.mark.parametrize(("n_layers", "layers"), [(32, (2, 6, 15)), (40, (2, 6, 15)), (17, (2, 6, 15)),
                                                  (16, (1, 3, 8)), (6, (0, 1, 3)), (4, (0, 1, 2)), (3, (0, 1)),
                                                  (2, (0,))])
def test_pruning_layers_keep_the_official_depth_fractions(n_layers, layers):
    # round(l * L / 32) of (2, 6, 15), capped at L - 2, for decoders whose last layer is not after 15
    assert svlm.schedule(400, n_layers).layers == layers


@pytest.mark.parametrize(("budget", "n_layers", "n"), [(37, 32, 576), (48, 32, 576), (200, 32, 576), (16, 6, 576),
                                                       (64, 6, 576), (192, 6, 576), (16, 4, 576), (16, 3, 576),
                                                       (100, 40, 576), (64, 32, 729), (10, 6, 50), (150, 40, 576)])
def test_other_budgets_reach_the_average(budget, n_layers, n):
    s = svlm.schedule(budget, n_layers, n)
    assert not s.official
    assert all(a > b for a, b in zip((n, *s.counts), s.counts)) and s.counts[-1] >= 1  # each stage drops one
    per_layer = s.per_layer(n, n_layers)  # tokens entering each layer; the counter counts a layer's output
    counter = [per_layer[i + 1] if i + 1 < n_layers else s.counts[-1] for i in range(n_layers)]
    assert s.average == pytest.approx(sum(counter) / n_layers)
    assert abs(s.average - budget) <= 0.5 * len(s.layers)  # counts are integers


def test_unreachable_budget_is_refused_with_the_minimum():
    with pytest.raises(ValueError, match=r"cannot average 16 .* first pruning layer is 2 of 32.* budget >= 37"):
        svlm.schedule(16, 32)
    with pytest.raises(ValueError, match="at least 2 layers"):
        svlm.schedule(16, 1)


# ------------------------------------------------------------------------------------------ pure rules
def test_raters_are_the_text_tokens_above_the_mean_relevance():
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(7, 5, generator=g), torch.randn(6, 5, generator=g)
    # transcription in float64: softmax over text of each image token's dot products, averaged over image tokens
    m = [0.0] * 6
    for i in range(7):
        dots = [float(image[i].double() @ text[j].double()) for j in range(6)]
        z = sum(math.exp(d) for d in dots)
        for j in range(6):
            m[j] += math.exp(dots[j]) / z / 7
    mean = sum(m) / 6
    assert svlm.raters(image, text).tolist() == [j for j in range(6) if m[j] > mean]
    assert svlm.raters(image, text[:1]).tolist() == [0]  # a single text token rates
    assert svlm.raters(image, torch.zeros(3, 5)).tolist() == [0, 1, 2]  # none above the mean: every one rates


def test_rope_gravity_is_the_cosine_sum_of_the_distance():
    """RoPE(1)·RoPE(1)ᵀ/√d computed as the official code does (all-ones q, k through apply_rotary_pos_emb) and in
    closed form (2/√d)·Σᵢ cos((m − n)θᵢ); the module's rule takes the layer's cos/sin."""
    model = build_tiny_llava()
    lm = model.model.language_model
    pos = torch.tensor([[0, 3, 4, 9, 40, 41]])
    cos, sin = lm.rotary_emb(torch.zeros(1, 6, 64), pos)
    d = cos.shape[-1]
    ones = torch.ones(1, 1, 6, d)
    q, k = apply_rotary_pos_emb(ones, ones, cos, sin)
    official = (q @ k.transpose(2, 3) / math.sqrt(d))[0, 0]
    theta = lm.rotary_emb.inv_freq.double()
    dist = (pos[0][:, None] - pos[0][None, :]).double()
    closed = 2 / math.sqrt(d) * torch.cos(dist[..., None] * theta).sum(-1)
    got = svlm.rope_gravity(cos[0], sin[0], d)
    torch.testing.assert_close(got.double(), closed, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, official, atol=1e-5, rtol=1e-5)


def test_heads_kept_is_fourteen_of_thirty_two():
    # the official topk(14) wherever it runs (>= 14 heads), the 7B's fraction below
    assert [svlm.heads_kept(h) for h in (32, 40, 16, 14, 13, 4, 2, 1)] == [14, 14, 14, 14, 6, 2, 1, 1]


# ------------------------------------------------------------------ a whole pruned forward, rebuilt by hand
def _reference(model, x, budget):
    """SparseVLM v2.0 on one unpadded row, transcribed from modelling_sparse_llama.py with transformers' decoder
    layers: the layer's attention from its own q/k projections (eager, fp32), gravity in closed form, heads by their
    rater x image attention, top-k of the mean; the layer runs on the current rows at their original positions and
    its output keeps the text and the kept image tokens. Returns (logits, kept patch indices per stage)."""
    lm = model.model.language_model
    box = []
    hook = lm.layers[0].register_forward_pre_hook(lambda m, a: box.append(a[0]))
    with torch.no_grad():
        model(**x)
    hook.remove()
    h = box[0]  # the decoder's input embeddings (image features in place)
    ids = x["input_ids"][0]
    img = (ids == IMAGE_TOKEN_ID).nonzero().flatten()
    v0, t0 = int(img[0]), int(img[-1]) + 1
    m = torch.softmax(h[0, v0:t0].double() @ h[0, t0:].double().T, dim=1).mean(0)
    raters = t0 + (m > m.mean()).nonzero().flatten()
    sched = svlm.schedule(budget, len(lm.layers), N)
    rows = torch.arange(ids.shape[0])
    image = img.clone()  # current image tokens (full positions)
    theta = lm.rotary_emb.inv_freq.double()
    stages = []
    with torch.no_grad():
        for i, layer in enumerate(lm.layers):
            cos, sin = lm.rotary_emb(h, rows[None])
            allowed = rows[None, :] <= rows[:, None]
            mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[None, None]
            if i in sched.layers:
                att = layer.self_attn
                hd = att.head_dim
                xn = layer.input_layernorm(h)
                q = att.q_proj(xn).view(1, -1, att.config.num_attention_heads, hd).transpose(1, 2)
                k = att.k_proj(xn).view(1, -1, att.config.num_key_value_heads, hd).transpose(1, 2)
                q, k = apply_rotary_pos_emb(q, k, cos, sin)
                k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
                probs = torch.softmax((q @ k.transpose(2, 3)).double() / math.sqrt(hd) + mask.double(), dim=-1)[0]
                dist = (rows[:, None] - rows[None, :]).double()
                grav = 2 / math.sqrt(hd) * torch.cos(dist[..., None] * theta).sum(-1)
                a = probs / grav
                r = torch.searchsorted(rows, raters)
                c = torch.searchsorted(rows, image)
                per_head = torch.stack([a[hh][r][:, c].sum() for hh in range(a.shape[0])])
                n_heads = round(14 * a.shape[0] / 32)
                heads = sorted(range(a.shape[0]), key=lambda hh: (-float(per_head[hh]), hh))[:n_heads]
                score = a[heads][:, r][:, :, c].mean(0).mean(0)
                kcount = min(sched.counts[sched.layers.index(i)], image.numel() - 1)
                order = sorted(range(image.numel()), key=lambda j: (-float(score[j]), j))[:kcount]
                keep_img = image[sorted(order)]
            h = layer(h, attention_mask=mask, position_ids=rows[None], position_embeddings=(cos, sin))
            h = h[0] if isinstance(h, tuple) else h
            if i in sched.layers:
                new_rows = torch.sort(torch.cat([rows[~torch.isin(rows, image)], keep_img])).values
                h = h[:, torch.searchsorted(rows, new_rows)]
                rows, image = new_rows, keep_img
                stages.append(image - v0)
        logits = model.lm_head(lm.norm(h))
    return logits, stages


@pytest.mark.parametrize(("budget", "prompt"), [(64, (3, 1, 9)), (16, (1, 1, 4)), (200, (6, 1, 2))])
def test_sparsevlm_equals_a_hand_built_pruned_run(budget, prompt):
    model = build_tiny_llava(attn="eager")
    x = build_llava_inputs([prompt])
    ref, stages = _reference(model, x, budget)
    patch_llava(model, method="sparsevlm", budget=budget)
    with torch.no_grad():
        got = model(**x).logits
    assert torch.equal(model.svdprune.kept_indices[0], stages[-1])
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_each_stage_keeps_a_subset_and_differs_from_fastv(tiny_llava):
    x = build_llava_inputs([(3, 1, 9)])
    patch_llava(tiny_llava, method="sparsevlm", budget=64)
    with torch.no_grad():
        tiny_llava(**x)
    s = svlm.schedule(64, 4)
    kept = tiny_llava.svdprune.kept_indices
    assert kept.shape == (1, s.counts[-1])
    patch_llava(tiny_llava, method="fastv", budget=s.counts[-1], fastv_layer=s.cuts[-1])
    with torch.no_grad():
        tiny_llava(**x)
    assert not torch.equal(tiny_llava.svdprune.kept_indices, kept)  # raters, gravity, heads: not FastV's rule


# ------------------------------------------------------------------------------------------------ errors
def test_refusals_name_the_problem(tiny_llava):
    with pytest.raises(ValueError, match="cannot average"):
        patch_llava(build_tiny_llava(text_layers=32), method="sparsevlm", budget=16)
    with pytest.raises(ValueError, match="sparsevlm implements positions='original' only"):
        patch_llava(tiny_llava, method="sparsevlm", budget=64, positions="compact")
    with pytest.raises(ValueError, match="cuts at several layers"):
        patch_llava(tiny_llava, method="sparsevlm", kept=torch.arange(16)[None])
    patch_llava(tiny_llava, method="sparsevlm", budget=64)
    x = build_llava_inputs([(3, 1, 0)])
    x = {**x, "input_ids": x["input_ids"][:, :-2], "attention_mask": x["attention_mask"][:, :-2]}
    assert int(x["input_ids"][0, -1]) == IMAGE_TOKEN_ID  # the image ends the prompt: no text to rate it
    with pytest.raises(ValueError, match="text after the image"):
        tiny_llava(**x)


@pytest.mark.parametrize("pad_left", [False, True])
def test_padding_never_rates(pad_left):
    """Rows padded by many loud pad embeddings (which would dominate the raters' softmax) keep what they keep alone:
    the raters are chosen among each row's real tokens."""
    from conftest import PAD_ID

    model = build_tiny_llava()
    with torch.no_grad():
        model.get_input_embeddings().weight[PAD_ID] = 3.0
    x = build_llava_inputs([(1, 1, 2), (30, 1, 12)], pad_left=pad_left)
    patch_llava(model, method="sparsevlm", budget=64)
    with torch.no_grad():
        model(**x)
    kept = model.svdprune.kept_indices.clone()
    for b in range(2):
        keep = x["attention_mask"][b].bool()
        one = {"input_ids": x["input_ids"][b][keep][None], "attention_mask": x["attention_mask"][b][keep][None],
               "pixel_values": x["pixel_values"][b:b + 1]}
        with torch.no_grad():
            model(**one)
        assert torch.equal(model.svdprune.kept_indices[0], kept[b])


def test_schedule_refuses_what_it_cannot_schedule():
    with pytest.raises(ValueError, match=r"int in \[1, 2\)"):
        svlm.schedule(8, 32, 2)  # at or above the image's tokens nothing is pruned
    with pytest.raises(ValueError, match="needs more than 3 image tokens"):
        svlm.schedule(2, 32, 3)  # three stages each dropping one token need four
    for bad in (0, -1, 64.5, True, "64", None):
        with pytest.raises(ValueError, match="budget must be an int"):
            svlm.schedule(bad, 32)
    s = svlm.schedule(96, 17)  # the official table only where the official code runs it (32 or 40 layers)
    assert not s.official and abs(s.average - 96) <= 1.5


def test_a_continued_cache_refuses_another_method_or_budget(tiny_llava):
    x = build_llava_inputs([(3, 1, 4)])
    patch_llava(tiny_llava, method="sparsevlm", budget=64)
    with torch.no_grad():
        out = tiny_llava.generate(**x, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    mask = torch.cat([x["attention_mask"], torch.ones(1, 2, dtype=torch.long)], 1)
    for method, budget in (("sparsevlm", 32), ("fastv", 64)):
        tiny_llava.svdprune.method, tiny_llava.svdprune.budget = method, budget
        with pytest.raises(ValueError, match="built by sparsevlm at budget 64"), torch.no_grad():
            tiny_llava.generate(out.sequences, attention_mask=mask, cache=out.past_key_values, max_new_tokens=1)


def test_selector_signals_are_refused(tiny_llava):
    for method in ("sparsevlm", "fastv"):
        with pytest.raises(ValueError, match="takes no selector signals"):
            patch_llava(tiny_llava, method=method, budget=64, foo=4)


def test_capture_attention_refuses_layers_out_of_range(tiny_llava):
    from svdprune_utils.hf.attention import capture_attention

    x = build_llava_inputs([(3, 1, 4)])
    for bad in ([4], [-5]):
        with pytest.raises(ValueError, match=r"layers must lie in \[-4, 4\)"):
            capture_attention(tiny_llava, x, layers=bad)
    assert sorted(capture_attention(tiny_llava, x, layers=[-1, 0]).lm) == [0, 3]
