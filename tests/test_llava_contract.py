"""The patched LLaVA keeps generate's and forward's whole contract (issue: right padding, cache continuation,
length limits, deepcopy, labels, inputs_embeds, positional generation_config, towers without CLS, hand-written
loops, streamers, precomputed image features, static caches, stored selections). Tiny random models in-process."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    IMAGE_TOKEN_ID,
    build_llava_inputs,
    build_siglip_llava,
    build_tiny_llava,
    kept_per_image,
    second_turn,
)
from helpers import kept_rows_reference
from transformers import GenerationConfig

from svdprune_utils.hf.attention import capture_attention
from svdprune_utils.hf.patch import patch_llava, prune_inputs, unpatch_llava

N = 576
METHODS = ["svd", "fastv", "sparsevlm", "cls_attention", "random", "vispruner", "cdpruner", "visionzip"]


def _gen(model, x, n=4, **kw):
    with torch.no_grad():
        return model.generate(**x, max_new_tokens=n, do_sample=False, **kw)

def _same_generation(model, a: dict, b: dict) -> bool:
    """Greedy generate on ``a`` and ``b`` gives the same tokens and the same logits at every step (tokens alone can
    agree on a tiny random model while the logits show attended pads)."""
    ra, rb = (_gen(model, x, return_dict_in_generate=True, output_logits=True) for x in (a, b))
    return torch.equal(ra.sequences, rb.sequences) and all(torch.equal(p, q) for p, q in zip(ra.logits, rb.logits))


def _solo(x, b, first_image):
    keep = x["attention_mask"][b].bool()
    n_img = int((x["input_ids"][b] == IMAGE_TOKEN_ID).sum()) // N
    return {"input_ids": x["input_ids"][b][keep][None], "attention_mask": x["attention_mask"][b][keep][None],
            "pixel_values": x["pixel_values"][first_image:first_image + n_img]}


# ---------------------------------------------------------------------------------------- 1. right padding
@pytest.mark.parametrize("method", ["fastv", "sparsevlm", "svd"])
def test_right_padded_batch_equals_rows_alone(tiny_llava, method):
    x = build_llava_inputs([(3, 1, 4), (9, 1, 2)], pad_left=False)
    patch_llava(tiny_llava, method=method, budget=16)
    with torch.no_grad():
        batch = tiny_llava(**x).logits
    kept = tiny_llava.svdprune.kept_indices.clone()
    for b in range(2):
        one = _solo(x, b, b)
        with torch.no_grad():
            solo = tiny_llava(**one).logits[0]
        assert torch.equal(tiny_llava.svdprune.kept_indices[0], kept[b])
        torch.testing.assert_close(batch[b, : solo.shape[0]], solo, atol=1e-4, rtol=1e-4)


def test_fastv_capture_attention_right_padded_equals_rows_alone(tiny_llava):
    x = build_llava_inputs([(3, 1, 4), (9, 1, 2)], pad_left=False)
    patch_llava(tiny_llava, method="fastv", budget=16)
    maps = capture_attention(tiny_llava, x, layers=[1, 2])
    for b in range(2):
        solo = capture_attention(tiny_llava, _solo(x, b, b), layers=[1, 2])
        for layer in (1, 2):
            Q = solo.lm[layer].shape[1]
            torch.testing.assert_close(maps.lm[layer][b, :Q], solo.lm[layer][0], atol=1e-5, rtol=1e-4)
            assert torch.equal(maps.image_positions[layer][b], solo.image_positions[layer][0])


# ---------------------------------------------------------------------------------------- 2. continuation
@pytest.mark.parametrize("method", METHODS)
def test_continuing_the_returned_cache_equals_one_generate(tiny_llava, method):
    x = build_llava_inputs([(3, 1, 4), (9, 1, 2)])
    patch_llava(tiny_llava, method=method, budget=16)
    one = _gen(tiny_llava, x, n=6)
    first = _gen(tiny_llava, x, n=3, return_dict_in_generate=True)
    mask = torch.cat([x["attention_mask"], torch.ones(2, 3, dtype=torch.long)], 1)
    with torch.no_grad():
        cont = tiny_llava.generate(first.sequences, attention_mask=mask, past_key_values=first.past_key_values,
                                   max_new_tokens=3, do_sample=False)
    assert torch.equal(cont, one)
    assert one.shape[1] == x["input_ids"].shape[1] + 6


def test_continuation_with_a_changed_budget_is_refused(tiny_llava):
    x = build_llava_inputs([(3, 1, 4)])
    patch_llava(tiny_llava, method="svd", budget=16)
    first = _gen(tiny_llava, x, n=2, return_dict_in_generate=True)
    tiny_llava.svdprune.budget = 32
    mask = torch.cat([x["attention_mask"], torch.ones(1, 2, dtype=torch.long)], 1)
    with pytest.raises(ValueError, match="built with 16 tokens per image"):
        tiny_llava.generate(first.sequences, attention_mask=mask, past_key_values=first.past_key_values,
                            max_new_tokens=2)


# ---------------------------------------------------------------------------------------- 3/7. length limits
@pytest.mark.parametrize("method", ["svd", "fastv", "sparsevlm"])
def test_max_length_counts_the_callers_prompt(tiny_llava, method):
    x = build_llava_inputs([(3, 1, 4), (9, 1, 2)])
    S = x["input_ids"].shape[1]
    ref = tiny_llava.generate(**x, max_length=S + 5, do_sample=False)
    assert ref.shape[1] == S + 5
    patch_llava(tiny_llava, method=method, budget=16)
    with torch.no_grad():
        by_kwarg = tiny_llava.generate(**x, max_length=S + 5, do_sample=False)
        cfg = GenerationConfig(max_length=S + 5, do_sample=False, pad_token_id=0)
        by_config = tiny_llava.generate(x["input_ids"], cfg, attention_mask=x["attention_mask"],
                                        pixel_values=x["pixel_values"])  # item 7: both positional
    assert by_kwarg.shape[1] == S + 5 and torch.equal(by_config, by_kwarg)
    assert torch.equal(by_kwarg, _gen(tiny_llava, x, n=5))


def test_min_length_counts_the_callers_prompt():
    model = build_tiny_llava()
    x = build_llava_inputs([(3, 1, 4)])
    S = x["input_ids"].shape[1]
    patch_llava(model, method="svd", budget=16)
    free = _gen(model, x, n=8)
    model.generation_config.eos_token_id = int(free[0, S + 1])  # an EOS that ends the free answer early
    by_new = model.generate(**x, min_new_tokens=4, max_new_tokens=30, do_sample=False)
    by_length = model.generate(**x, min_length=S + 4, max_new_tokens=30, do_sample=False)
    assert S + 4 <= by_new.shape[1] < S + 30  # the EOS did end it
    assert torch.equal(by_length, by_new)  # min_length = the caller's prompt + 4, as unpatched


# ---------------------------------------------------------------------------------------- 4. deepcopy / save
def test_deepcopy_runs_itself_with_its_own_knobs(tiny_llava, tmp_path):
    x = build_llava_inputs([(3, 1, 4)])
    ref_logits = tiny_llava(**x).logits.detach()
    patch_llava(tiny_llava, method="svd", budget=32)
    twin = copy.deepcopy(tiny_llava)
    twin.svdprune.budget = 8
    with torch.no_grad():
        out = twin(**x).logits
    assert twin.svdprune.kept_indices.shape == (1, 8)
    assert tiny_llava.svdprune.kept_indices is None and tiny_llava.svdprune.budget == 32
    assert out.shape[1] == x["input_ids"].shape[1] - N + 8
    with torch.no_grad():  # the copy's weights, not the original's
        next(twin.model.language_model.parameters()).add_(1.0)
        assert not torch.equal(twin(**x).logits, out)
        tiny_llava.svdprune.budget = 8
        assert torch.equal(tiny_llava(**x).logits, out)
    tiny_llava.save_pretrained(tmp_path)
    from transformers import LlavaForConditionalGeneration

    plain = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert not hasattr(plain, "svdprune")
    with torch.no_grad():
        torch.testing.assert_close(plain(**x).logits, ref_logits, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------- 5. labels
def test_fastv_loss_is_over_the_processed_sequence(tiny_llava):
    x = build_llava_inputs([(3, 1, 4), (9, 1, 2)])
    labels = x["input_ids"].masked_fill((x["input_ids"] == IMAGE_TOKEN_ID) | (x["attention_mask"] == 0), -100)
    patch_llava(tiny_llava, method="fastv", budget=16)
    with torch.no_grad():
        out = tiny_llava(**x, labels=labels)
    kept = tiny_llava.svdprune.kept_indices
    img = x["input_ids"] == IMAGE_TOKEN_ID
    start = img.int().argmax(1)
    rows = torch.sort(torch.cat([(~img).nonzero()[:, 1].view(2, -1), start[:, None] + kept], 1), 1).values
    lab = labels.gather(1, rows)
    ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]).float(), lab[:, 1:].reshape(-1),
                          ignore_index=-100)
    assert out.logits.shape[1] == rows.shape[1]
    torch.testing.assert_close(out.loss, ref)


def test_pre_llm_loss_uses_the_cut_labels(tiny_llava):
    x = build_llava_inputs([(3, 1, 4), (9, 1, 2)])
    labels = x["input_ids"].masked_fill((x["input_ids"] == IMAGE_TOKEN_ID) | (x["attention_mask"] == 0), -100)
    patch_llava(tiny_llava, method="svd", budget=16)
    with torch.no_grad():
        out = tiny_llava(**x, labels=labels)
    keep = ~(x["input_ids"] == IMAGE_TOKEN_ID) & (x["attention_mask"] == 1)
    texts = [labels[b][keep[b]] for b in range(2)]  # every text label, in order; the image labels are -100
    L = out.logits.shape[1]
    lab = torch.full((2, L), -100)
    for b, t in enumerate(texts):
        ids = x["input_ids"][b][x["attention_mask"][b].bool()]
        i = int((ids == IMAGE_TOKEN_ID).int().argmax())
        row = torch.cat([t[:i], torch.full((16,), -100), t[i:]])
        lab[b, L - len(row):] = row
    ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), lab[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ref)


# ---------------------------------------------------------------------------------------- 6. inputs_embeds
@pytest.mark.parametrize("method", ["svd", "fastv", "sparsevlm"])
def test_inputs_embeds_with_pixel_values_is_pruned(tiny_llava, method):
    x = build_llava_inputs([(3, 1, 4), (9, 1, 2)])
    emb = tiny_llava.get_input_embeddings()(x["input_ids"]).detach()
    xe = {"inputs_embeds": emb, "attention_mask": x["attention_mask"], "pixel_values": x["pixel_values"]}
    patch_llava(tiny_llava, method=method, budget=16)
    with torch.no_grad():
        by_ids = tiny_llava(**x).logits
        kept = tiny_llava.svdprune.kept_indices.clone()
        tiny_llava.svdprune.kept_indices = None
        by_embeds = tiny_llava(**xe).logits
    assert torch.equal(tiny_llava.svdprune.kept_indices, kept)
    assert by_embeds.shape[1] == x["input_ids"].shape[1] - N + kept_per_image(tiny_llava, method, 16)
    torch.testing.assert_close(by_embeds, by_ids, atol=1e-5, rtol=1e-5)
    S = x["input_ids"].shape[1]
    new_ids = _gen(tiny_llava, x, n=4)[:, S:]
    assert torch.equal(_gen(tiny_llava, xe, n=4), new_ids)


# ---------------------------------------------------------------------------------------- 8. towers
@pytest.mark.parametrize(("strategy", "n"), [("full", 576), ("default", 575)])
@pytest.mark.parametrize("method", ["svd", "fastv", "sparsevlm"])
def test_tower_without_cls(strategy, n, method):
    model = build_siglip_llava(strategy)
    x = build_llava_inputs([(3, 1, 4), (9, 1, 2)], n_patches=n)
    ref = _gen(model, x)
    patch_llava(model, method=method, budget=n)
    assert torch.equal(_gen(model, x), ref)  # budget >= N: the unpatched run
    model.svdprune.budget = 16
    with torch.no_grad():
        logits = model(**x).logits
    k = kept_per_image(model, method, 16, n)
    assert model.svdprune.kept_indices.shape == (2, k) and int(model.svdprune.kept_indices.max()) < n
    assert logits.shape[1] == x["input_ids"].shape[1] - n + k
    model.svdprune.method = "cls_attention"
    with pytest.raises(ValueError, match="CLS"):
        model(**x)


def test_strategy_passed_at_call_time_sets_the_token_count(tiny_llava):
    x = build_llava_inputs([(3, 1, 4)], n_patches=577)  # "full": CLS + 576 patches
    patch_llava(tiny_llava, method="svd", budget=16)
    with torch.no_grad():
        logits = tiny_llava(**x, vision_feature_select_strategy="full").logits
    assert tiny_llava.svdprune.kept_indices.shape == (1, 16) and logits.shape[1] == x["input_ids"].shape[1] - 561


# ---------------------------------------------------------------------------------------- 9. hand-written loops
def test_manual_decode_loop_equals_generate_on_rows_with_different_image_counts(tiny_llava):
    x = build_llava_inputs([(3, 2, 4), (9, 1, 2)])  # row 0 loses twice as many placeholders as row 1
    patch_llava(tiny_llava, method="svd", budget=16)
    S = x["input_ids"].shape[1]
    ref = _gen(tiny_llava, x, n=5)[:, S:]
    p = prune_inputs(tiny_llava, **x)
    assert torch.equal(p.kept, tiny_llava.svdprune.kept_indices) and p.kept.shape == (3, 16)
    mask = p.inputs["attention_mask"]
    toks = []
    with torch.no_grad():
        out = tiny_llava(**p.inputs, use_cache=True)
        for _ in range(5):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            toks.append(nxt)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            out = tiny_llava(input_ids=nxt, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
    assert torch.equal(torch.cat(toks, 1), ref)
    # index maps every kept entry back to the caller's column
    idx = p.index
    got = torch.where(idx >= 0, x["input_ids"].gather(1, idx.clamp_min(0)), 0)
    assert torch.equal(got, p.inputs["input_ids"])


# ---------------------------------------------------------------------------------------- 10. smaller items
class _Recorder:
    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.clone())

    def end(self):
        pass


def test_streamer_first_receives_the_callers_prompt(tiny_llava):
    x = build_llava_inputs([(3, 1, 4)])
    patch_llava(tiny_llava, method="svd", budget=16)
    rec = _Recorder()
    out = tiny_llava.generate(**x, max_new_tokens=3, do_sample=False, streamer=rec)
    assert torch.equal(rec.chunks[0], x["input_ids"])
    assert torch.equal(torch.cat([c.view(1, -1) for c in rec.chunks], 1), out)


def test_precomputed_image_features_are_pruned(tiny_llava):
    x = build_llava_inputs([(3, 1, 4), (9, 1, 2)])
    with torch.no_grad():
        images = tiny_llava.model.get_image_features(pixel_values=x["pixel_values"], return_dict=True)
    pre = {"input_ids": x["input_ids"], "attention_mask": x["attention_mask"], "mm_encoder_outputs": {"image": images}}
    patch_llava(tiny_llava, method="svd", budget=16)
    with torch.no_grad():
        ref = tiny_llava(**x).logits
        kept = tiny_llava.svdprune.kept_indices.clone()
        assert torch.equal(tiny_llava(**pre).logits, ref)
    assert torch.equal(tiny_llava.svdprune.kept_indices, kept)
    images.hidden_states = None
    with pytest.raises(ValueError, match="hidden_states"):
        tiny_llava(**pre)
    tiny_llava.svdprune.feature = "projected"
    with torch.no_grad():
        assert tiny_llava(**pre).logits.shape == ref.shape


def test_fastv_with_a_static_cache_at_full_budget_is_unpatched(tiny_llava):
    x = build_llava_inputs([(3, 1, 4)])
    ref = _gen(tiny_llava, x, cache_implementation="static")
    patch_llava(tiny_llava, method="fastv", budget=N)
    assert torch.equal(_gen(tiny_llava, x, cache_implementation="static"), ref)
    tiny_llava.svdprune.budget = 16
    with pytest.raises(TypeError, match="DynamicCache"):
        _gen(tiny_llava, x, cache_implementation="static")


def test_fastv_refuses_prompt_lookup_clearly(tiny_llava):
    x = build_llava_inputs([(3, 1, 4)])
    patch_llava(tiny_llava, method="fastv", budget=16)
    with pytest.raises(NotImplementedError, match="prompt-lookup"):
        _gen(tiny_llava, x, prompt_lookup_num_tokens=3)


@pytest.mark.parametrize("method", ["svd", "fastv"])
def test_a_stored_selection_replays_exactly(tiny_llava, method):
    x = build_llava_inputs([(3, 1, 4), (9, 1, 2)])
    patch_llava(tiny_llava, method=method, budget=16)
    with torch.no_grad():
        ref = tiny_llava(**x).logits
    stored = tiny_llava.svdprune.kept_indices.clone()
    patch_llava(tiny_llava, method=method if method == "fastv" else "random", kept=stored)
    with torch.no_grad():
        assert torch.equal(tiny_llava(**x).logits, ref)
    assert torch.equal(tiny_llava.svdprune.kept_indices, stored)
    with pytest.raises(ValueError, match="holds 2 images"):
        tiny_llava(**build_llava_inputs([(3, 1, 4)]))
    unpatch_llava(tiny_llava)


def test_fastv_equals_a_hand_built_pruned_run():
    """Layers >= K run on the kept rows at their ORIGINAL positions, causal among themselves, padding masked:
    rebuilt here with transformers' own decoder layers, rotary embedding, norm and head (eager twin)."""
    model = build_tiny_llava(attn="eager")
    x = build_llava_inputs([(3, 1, 4), (9, 1, 2)])
    K = 2
    box = []
    h = model.model.language_model.layers[K].register_forward_pre_hook(lambda m, a: box.append(a[0]))
    with torch.no_grad():
        model(**x)
    h.remove()
    patch_llava(model, method="fastv", budget=16, fastv_layer=K)
    with torch.no_grad():
        got = model(**x).logits
    kept = model.svdprune.kept_indices
    img = x["input_ids"] == IMAGE_TOKEN_ID
    start = img.int().argmax(1)
    rows = torch.sort(torch.cat([(~img).nonzero()[:, 1].view(2, -1), start[:, None] + kept], 1), 1).values
    ref, real = kept_rows_reference(model, box[0], rows, x["attention_mask"], K, rows, rows)
    assert got.shape == ref.shape
    torch.testing.assert_close(got[real], ref[real], atol=1e-4, rtol=1e-4)


def test_explicit_position_ids_are_cut_with_the_sequence(tiny_llava):
    x = build_llava_inputs([(3, 1, 4)])
    S = x["input_ids"].shape[1]
    patch_llava(tiny_llava, method="svd", budget=16)
    with torch.no_grad():
        ref = tiny_llava(**x).logits
        got = tiny_llava(**x, position_ids=torch.arange(S)[None]).logits
    assert torch.equal(got, ref)


def test_placeholder_runs_of_the_wrong_length_are_refused(tiny_llava):
    x = build_llava_inputs([(3, 1, 4)], n_patches=575)
    patch_llava(tiny_llava, method="svd", budget=16)
    with pytest.raises(ValueError, match="runs of 576"):
        tiny_llava(**x)


@pytest.mark.parametrize("method", ["svd", "fastv", "sparsevlm"])
def test_beam_search_and_several_return_sequences(tiny_llava, method):
    x = build_llava_inputs([(3, 1, 4), (9, 1, 2)])
    S = x["input_ids"].shape[1]
    patch_llava(tiny_llava, method=method, budget=16)
    beams = _gen(tiny_llava, x, n=4, num_beams=3, num_return_sequences=2)
    assert beams.shape == (4, S + 4) and torch.equal(beams[:, :S], x["input_ids"].repeat_interleave(2, 0))
    for b in range(2):  # the batch returns what each row returns alone
        one = _solo(x, b, b)
        solo = _gen(tiny_llava, one, n=4, num_beams=3, num_return_sequences=2)
        assert torch.equal(beams[2 * b:2 * b + 2, S:], solo[:, one["input_ids"].shape[1]:])
    torch.manual_seed(0)
    a = tiny_llava.generate(**x, max_new_tokens=4, do_sample=True, num_return_sequences=2)
    torch.manual_seed(0)
    b_ = tiny_llava.generate(**x, max_new_tokens=4, do_sample=True, num_return_sequences=2)
    assert torch.equal(a, b_) and torch.equal(a[:, :S], x["input_ids"].repeat_interleave(2, 0))


def test_multi_turn_continuation_equals_a_fresh_run_of_the_conversation(tiny_llava):
    """Turn 2 appends text to turn 1's sequences and continues the cache: a pre-LLM selection depends only on
    the image, so this equals generating from the whole conversation afresh."""
    x = build_llava_inputs([(3, 1, 4), (9, 1, 2)])
    patch_llava(tiny_llava, method="svd", budget=16)
    first = _gen(tiny_llava, x, n=3, return_dict_in_generate=True)
    conv, mask = second_turn(x, first.sequences)
    with torch.no_grad():
        cont = tiny_llava.generate(conv, attention_mask=mask, cache=first.past_key_values, max_new_tokens=4,
                                   do_sample=False)
        fresh = tiny_llava.generate(conv, attention_mask=mask, pixel_values=x["pixel_values"], max_new_tokens=4,
                                    do_sample=False)
    assert torch.equal(cont, fresh) and cont.shape[1] == conv.shape[1] + 4


# ------------------------------------------------------------------- found by a user's break-it pass
class _ForceFirst:
    """A logits processor making the ``at``-th generated token (0: the first) the image placeholder id."""

    def __init__(self, at: int = 0):
        self.step, self.at = 0, at

    def __call__(self, ids, scores):
        if self.step == self.at:
            scores[:] = -1e9
            scores[:, IMAGE_TOKEN_ID] = 0
        self.step += 1
        return scores


@pytest.mark.parametrize("at", [0, 1])  # 1: the placeholder id is the uncached last token a continuation feeds
@pytest.mark.parametrize("method", ["svd", "cdpruner", "fastv", "sparsevlm"])
def test_a_generated_placeholder_id_is_a_plain_token(tiny_llava, method, at):
    from transformers import LogitsProcessorList

    x = build_llava_inputs([(3, 1, 2), (5, 1, 4)])
    S = x["input_ids"].shape[1]
    patch_llava(tiny_llava, method=method, budget=16)
    one = _gen(tiny_llava, x, n=4, logits_processor=LogitsProcessorList([_ForceFirst(at)]))
    first = _gen(tiny_llava, x, n=2, logits_processor=LogitsProcessorList([_ForceFirst(at)]),
                 return_dict_in_generate=True)
    mask = torch.cat([x["attention_mask"], torch.ones(2, 2, dtype=torch.long)], 1)
    with torch.no_grad():
        cont = tiny_llava.generate(first.sequences, attention_mask=mask, cache=first.past_key_values,
                                   max_new_tokens=2, do_sample=False)
    assert int(one[0, S + at]) == IMAGE_TOKEN_ID and torch.equal(cont, one)


def test_fastv_hand_written_loop_with_the_cache_the_model_made(tiny_llava):
    x = build_llava_inputs([(3, 1, 2), (5, 1, 4)])
    S = x["input_ids"].shape[1]
    patch_llava(tiny_llava, method="fastv", budget=16)
    ref = _gen(tiny_llava, x, n=4)[:, S:]
    mask, toks = x["attention_mask"], []
    with torch.no_grad():
        out = tiny_llava(**x, use_cache=True)
        for _ in range(4):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            toks.append(nxt)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            out = tiny_llava(input_ids=nxt, attention_mask=mask, cache=out.past_key_values, use_cache=True)
    assert torch.equal(torch.cat(toks, 1), ref)


def test_fastv_loss_keeps_transformers_output_contract(tiny_llava):
    x = build_llava_inputs([(3, 1, 4), (9, 1, 2)])
    labels = x["input_ids"].masked_fill((x["input_ids"] == IMAGE_TOKEN_ID) | (x["attention_mask"] == 0), -100)
    patch_llava(tiny_llava, method="fastv", budget=16)
    with torch.no_grad():
        out = tiny_llava(**x, labels=labels)
        tup = tiny_llava(**x, labels=labels, return_dict=False)
        summed = tiny_llava(**x, labels=labels, num_items_in_batch=torch.tensor(40))
    assert torch.equal(tup[0], out.loss) and torch.equal(tup[1], out.logits)  # loss first, as unpatched
    n_items = int((labels[:, 1:] != -100).sum())  # the kept rows' labels are the same text labels
    torch.testing.assert_close(summed.loss, out.loss * n_items / 40)


@pytest.mark.parametrize("method", ["fastv", "cls_attention", "svd"])
def test_gradient_checkpointing_gives_the_same_gradients(method):
    x = build_llava_inputs([(3, 1, 4)])
    labels = x["input_ids"].masked_fill(x["input_ids"] == IMAGE_TOKEN_ID, -100)
    grads = []
    for ckpt in (False, True):
        model = build_tiny_llava().train()
        if ckpt:
            model.gradient_checkpointing_enable()
        patch_llava(model, method=method, budget=16)
        model(**x, labels=labels).loss.backward()
        grads.append(model.model.language_model.layers[3].mlp.down_proj.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0])


def test_changing_knobs_mid_conversation(tiny_llava):
    x = build_llava_inputs([(3, 1, 4)])
    mask = torch.cat([x["attention_mask"], torch.ones(1, 2, dtype=torch.long)], 1)
    patch_llava(tiny_llava, method="fastv", budget=16)
    one = _gen(tiny_llava, x, n=4)
    first = _gen(tiny_llava, x, n=2, return_dict_in_generate=True)
    with torch.no_grad():  # a FastV cache is continued as it was pruned
        cont = tiny_llava.generate(first.sequences, attention_mask=mask, cache=first.past_key_values,
                                   max_new_tokens=2, do_sample=False)
    assert torch.equal(cont, one)
    tiny_llava.svdprune.budget = 576  # as a pre-LLM cache, it refuses a budget it was not built with
    with pytest.raises(ValueError, match="built by fastv at budget 16"):
        tiny_llava.generate(first.sequences, attention_mask=mask, cache=first.past_key_values, max_new_tokens=2)
    tiny_llava.svdprune.method = "svd"
    with pytest.raises(ValueError, match="built by fastv"):
        tiny_llava.generate(first.sequences, attention_mask=mask, cache=first.past_key_values, max_new_tokens=2)
    tiny_llava.svdprune.budget = 16
    first = _gen(tiny_llava, x, n=2, return_dict_in_generate=True)
    tiny_llava.svdprune.method = "fastv"
    with pytest.raises(ValueError, match="pre-LLM method"):
        tiny_llava.generate(first.sequences, attention_mask=mask, cache=first.past_key_values, max_new_tokens=2)


def test_fastv_at_full_budget_allows_assisted_decoding(tiny_llava):
    x = build_llava_inputs([(3, 1, 4)])
    ref = _gen(tiny_llava, x, prompt_lookup_num_tokens=3)
    patch_llava(tiny_llava, method="fastv", budget=N)
    assert torch.equal(_gen(tiny_llava, x, prompt_lookup_num_tokens=3), ref)


def test_stored_selections_are_validated(tiny_llava):
    for bad in (torch.zeros(2, 3, dtype=torch.long), torch.tensor([[3, 1]]), torch.tensor([[0, 576]]),
                torch.tensor([[0.0, 1.0]])):
        for method in ("fastv", "svd"):
            with pytest.raises(ValueError, match="kept"):
                patch_llava(tiny_llava, method=method, kept=bad)
    patch_llava(tiny_llava, kept=[[0, 5, 9]])  # a nested list is taken as a tensor
    assert tiny_llava.svdprune.budget == 3


def test_a_patched_model_pickles(tiny_llava):
    import io

    x = build_llava_inputs([(3, 1, 4)])
    patch_llava(tiny_llava, method="svd", budget=16)
    buf = io.BytesIO()
    torch.save(tiny_llava, buf)
    buf.seek(0)
    twin = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert torch.equal(twin(**x).logits, tiny_llava(**x).logits)
    assert twin.svdprune.kept_indices.shape == (1, 16) and twin.forward.model is twin


@pytest.mark.parametrize("method", [None, "svd", "fastv"])
def test_capture_attention_with_inputs_embeds(tiny_llava, method):
    x = build_llava_inputs([(3, 1, 4), (9, 1, 2)])
    xe = {"inputs_embeds": tiny_llava.get_input_embeddings()(x["input_ids"]).detach(),
          "attention_mask": x["attention_mask"], "pixel_values": x["pixel_values"]}
    if method:
        patch_llava(tiny_llava, method=method, budget=16)
    a, b = capture_attention(tiny_llava, x, layers=[1, 3]), capture_attention(tiny_llava, xe, layers=[1, 3])
    for layer in (1, 3):
        assert torch.equal(a.image_positions[layer], b.image_positions[layer])
        torch.testing.assert_close(a.lm[layer], b.lm[layer], atol=1e-5, rtol=1e-5)


def test_full_budget_prune_inputs_and_a_too_small_max_length(tiny_llava):
    x = build_llava_inputs([(3, 1, 4)])
    patch_llava(tiny_llava, method="svd", budget=N)
    p = prune_inputs(tiny_llava, **x)
    assert p.inputs["input_ids"] is x["input_ids"] and torch.equal(p.kept, torch.arange(N)[None])
    tiny_llava.svdprune.budget = 16
    S = x["input_ids"].shape[1]
    with pytest.raises(ValueError, match=f"Input length of input_ids is {S}, but `max_length` is set to 10"):
        tiny_llava.generate(**x, max_length=10)


# ------------------------------------------------------------- found by a second user break-it pass (families)
@pytest.mark.parametrize("method, positions, images", [("svd", None, 2), ("svd", "original", 1), ("fastv", None, 1)])
def test_generate_without_attention_mask_infers_it_from_the_pad_tokens(tiny_llava, method, positions, images):
    """transformers' generate infers a left-padded batch's mask from the pad tokens (pad id 0, no eos); the patch
    cuts the prompt before it would, so it infers the same mask first. Without that, rows cut by different amounts
    (1 and 2 images) or given "original" positions had their pads attended."""
    x = build_llava_inputs([(3, 1, 4), (12, images, 2)])
    no_mask = {k: v for k, v in x.items() if k != "attention_mask"}
    assert _same_generation(tiny_llava, no_mask, x)  # unpatched
    patch_llava(tiny_llava, method=method, budget=16, positions=positions)
    assert _same_generation(tiny_llava, no_mask, x)


def test_bad_kept_and_selector_arguments_are_refused_at_patch_time(tiny_llava):
    with pytest.raises(ValueError, match=r"kept must be an integer LongTensor \(n_images, K\).*got str"):
        patch_llava(tiny_llava, "svd", budget=16, kept="0,1,2")
    with pytest.raises(TypeError, match=r"unknown signal\(s\) \['rnak'\]"):
        patch_llava(tiny_llava, "svd", budget=N, rnak=3)  # budget N: no call would ever prune
    with pytest.raises(ValueError, match="rank must be"):
        patch_llava(tiny_llava, "svd", budget=N, rank=0)
