"""The patch's ``positions`` knob: "compact" (consecutive after the cut, the pre-LLM default) or "original" (each
kept token keeps its position in the full prompt; generation numbers on from the full prompt length). Checked
against positions rebuilt here from the caller's mask and against the unpatched model fed explicit position_ids.
Tiny random models in-process (conftest)."""

from __future__ import annotations

import pytest
import torch
from conftest import IMAGE_TOKEN_ID, build_llava_inputs, build_tiny_llava

from svdprune_utils.core.reduction import REDUCERS
from svdprune_utils.core.selection import SELECTORS
from svdprune_utils.hf.patch import patch_llava, prune_inputs, unpatch_llava

N = 576
PRE_LLM = sorted({*SELECTORS, *REDUCERS} - {"fastv"})  # sparsevlm (in the LLM too) is not in SELECTORS
MIXED = [(3, 1, 4), (9, 1, 2), (1, 1, 7)]  # left padded, one image per row
TWO_IMAGES = [(3, 2, 4), (9, 1, 2)]  # row 0 loses twice as many placeholders as row 1


def _gen(model, x, n=4, **kw):
    with torch.no_grad():
        out = model.generate(**x, max_new_tokens=n, do_sample=False, return_dict_in_generate=True,
                             output_logits=True, **kw)
    return out.sequences, torch.stack(out.logits, 1)


def _lm_positions(model):
    """Record the position_ids every language-model call receives (a pre-hook; remove the returned handle)."""
    box = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: box.append(k.get("position_ids")), with_kwargs=True)
    return box, handle


def _kept_columns(x, kept):
    """Per row, the caller's columns the LLM sees (real text + each image's kept patches), ascending: rebuilt
    from the placeholder runs, independently of ``keep_image_tokens``."""
    img, real = x["input_ids"] == IMAGE_TOKEN_ID, x["attention_mask"].bool()
    cols, i = [], 0
    for b in range(img.shape[0]):
        starts = [int(s) for s in img[b].nonzero().flatten()[::N]]
        keep = real[b] & ~img[b]
        for s in starts:
            keep[s + kept[i]] = True
            i += 1
        cols.append(keep.nonzero().flatten())
    return cols


def _original_positions(x, kept):
    """(B, L) what "original" must give: the full prompt's mask cumsum − 1 at the kept columns, rows left-padded
    with position 0 (as generate pads)."""
    full = x["attention_mask"].cumsum(-1) - 1
    rows = [full[b, c] for b, c in enumerate(_kept_columns(x, kept))]
    L = max(len(r) for r in rows)
    return torch.stack([torch.cat([torch.zeros(L - len(r), dtype=torch.long), r]) for r in rows])


def _solo(x, b, first_image):
    keep = x["attention_mask"][b].bool()
    n_img = int((x["input_ids"][b] == IMAGE_TOKEN_ID).sum()) // N
    return {"input_ids": x["input_ids"][b][keep][None], "attention_mask": x["attention_mask"][b][keep][None],
            "pixel_values": x["pixel_values"][first_image:first_image + n_img]}


# ------------------------------------------------------------------------------------------- (a) prompt positions
@pytest.mark.parametrize("method", PRE_LLM)
def test_prompt_positions_are_the_kept_tokens_original_positions(tiny_llava, method):
    x = build_llava_inputs(TWO_IMAGES)
    patch_llava(tiny_llava, method=method, budget=16, positions="original")
    seen, h = _lm_positions(tiny_llava)
    try:
        with torch.no_grad():
            tiny_llava(**x)
        kept = tiny_llava.svdprune.kept_indices.clone()
        _gen(tiny_llava, x, n=2)
    finally:
        h.remove()
    expected = _original_positions(x, kept)
    assert torch.equal(seen[0], expected)  # forward
    assert torch.equal(seen[1], expected)  # generate's prefill
    # the first new token of each row sits at that row's full prompt length, the next one after it
    full_len = x["attention_mask"].sum(1, keepdim=True)
    assert torch.equal(seen[2], full_len)
    assert torch.equal(tiny_llava.svdprune.kept_indices, kept)


def test_compact_prompt_positions_are_left_to_transformers(tiny_llava):
    """compact: no position_ids are passed (transformers numbers the shortened sequence), as before the knob."""
    x = build_llava_inputs(MIXED)
    patch_llava(tiny_llava, method="svd", budget=16)
    seen, h = _lm_positions(tiny_llava)
    try:
        with torch.no_grad():
            tiny_llava(**x)
        _gen(tiny_llava, x, n=2)
    finally:
        h.remove()
    assert seen[0] is None
    pruned_mask = prune_inputs(tiny_llava, **x).inputs["attention_mask"]
    assert torch.equal(seen[1], (pruned_mask.cumsum(-1) - 1).clamp_min(0))  # generate's own rule on the cut mask
    assert torch.equal(seen[2], pruned_mask.sum(1, keepdim=True))


# ---------------------------------------------------------------------------------- (e) the unpatched model by hand
@pytest.mark.parametrize("method", ["svd", "visionzip"])
def test_generation_equals_the_unpatched_model_fed_original_positions(method):
    """Each row: the unpatched model, called (no cache) with inputs_embeds of the kept tokens + the tokens generated
    so far and explicit position_ids = their original positions, then full_len, full_len + 1, ...: transformers'
    own path. Its logits at every step equal the patched batch's."""
    model = build_tiny_llava()
    x = build_llava_inputs(TWO_IMAGES)
    S, n_new = x["input_ids"].shape[1], 3
    patch_llava(model, method=method, budget=16, positions="original")
    seq, logits = _gen(model, x, n=n_new)
    kept = model.svdprune.kept_indices
    captured = []  # the features the patched LLM received at the placeholders (VisionZip merges them)
    h = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: captured.append(k["inputs_embeds"]), with_kwargs=True)
    with torch.no_grad():
        model(**x)
    h.remove()
    pruned_ids = prune_inputs(model, **x).inputs["input_ids"]
    unpatch_llava(model)
    feats = captured[0]
    cols = _kept_columns(x, kept)
    full = x["attention_mask"].cumsum(-1) - 1
    emb = model.get_input_embeddings()
    for b in range(2):
        L = len(cols[b])
        ids = x["input_ids"][b, cols[b]]
        assert torch.equal(pruned_ids[b, -L:], ids)  # the patch cut these columns (left padding: at the end)
        with torch.no_grad():
            prompt = emb(ids).masked_scatter((ids == IMAGE_TOKEN_ID)[:, None],
                                             feats[b, -L:][ids == IMAGE_TOKEN_ID])
            new = emb(seq[b, S:S + n_new - 1])
            full_len = int(x["attention_mask"][b].sum())
            pos = torch.cat([full[b, cols[b]], full_len + torch.arange(n_new - 1)])
            ref = model(inputs_embeds=torch.cat([prompt, new])[None], position_ids=pos[None]).logits[0, L - 1:]
        torch.testing.assert_close(logits[b], ref, atol=1e-4, rtol=1e-4)
        assert torch.equal(seq[b, S:], ref.argmax(-1))


# --------------------------------------------------------------------------------------- (b), (c), (d)
@pytest.mark.parametrize("method", ["svd", "cdpruner", "visionzip"])
def test_original_generate_with_cache_equals_without(tiny_llava, method):
    x = build_llava_inputs(TWO_IMAGES)
    patch_llava(tiny_llava, method=method, budget=16, positions="original")
    seq, logits = _gen(tiny_llava, x, n=6, suppress_tokens=[IMAGE_TOKEN_ID])
    seq_nc, logits_nc = _gen(tiny_llava, x, n=6, use_cache=False, suppress_tokens=[IMAGE_TOKEN_ID])
    assert torch.equal(seq, seq_nc)
    torch.testing.assert_close(logits, logits_nc, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["svd", "visionzip"])
def test_original_left_padded_batch_equals_rows_alone(tiny_llava, method):
    x = build_llava_inputs(TWO_IMAGES)
    patch_llava(tiny_llava, method=method, budget=16, positions="original")
    seq, logits = _gen(tiny_llava, x, n=5)
    S = x["input_ids"].shape[1]
    for b, first_image in [(0, 0), (1, 2)]:
        one = _solo(x, b, first_image)
        s1, l1 = _gen(tiny_llava, one, n=5)
        assert torch.equal(seq[b, S:], s1[0, one["input_ids"].shape[1]:])
        torch.testing.assert_close(logits[b], l1[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["svd", "cdpruner", "visionzip"])
def test_original_continuing_the_returned_cache_equals_one_generate(tiny_llava, method):
    x = build_llava_inputs(TWO_IMAGES)
    patch_llava(tiny_llava, method=method, budget=16, positions="original")
    one, one_logits = _gen(tiny_llava, x, n=6)
    with torch.no_grad():
        first = tiny_llava.generate(**x, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        mask = torch.cat([x["attention_mask"], torch.ones(2, 3, dtype=torch.long)], 1)
        cont = tiny_llava.generate(first.sequences, attention_mask=mask, past_key_values=first.past_key_values,
                                   max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                                   output_logits=True)
    assert torch.equal(cont.sequences, one)
    torch.testing.assert_close(torch.stack(cont.logits, 1), one_logits[:, 3:], atol=1e-4, rtol=1e-4)


def test_original_multi_turn_equals_a_fresh_run_of_the_conversation(tiny_llava):
    x = build_llava_inputs(MIXED[:2])
    patch_llava(tiny_llava, method="svd", budget=16, positions="original")
    with torch.no_grad():
        first = tiny_llava.generate(**x, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        turn = torch.randint(3, IMAGE_TOKEN_ID, (2, 5), generator=torch.Generator().manual_seed(1))
        conv = torch.cat([first.sequences, turn], 1)
        mask = torch.ones_like(conv)
        mask[:, : x["attention_mask"].shape[1]] = x["attention_mask"]
        cont = tiny_llava.generate(conv, attention_mask=mask, cache=first.past_key_values, max_new_tokens=4,
                                   do_sample=False)
        fresh = tiny_llava.generate(conv, attention_mask=mask, pixel_values=x["pixel_values"], max_new_tokens=4,
                                    do_sample=False)
    assert torch.equal(cont, fresh)


def test_a_cache_is_continued_with_the_positions_it_was_built_with(tiny_llava):
    x = build_llava_inputs(MIXED[:1])
    patch_llava(tiny_llava, method="svd", budget=16, positions="original")
    with torch.no_grad():
        first = tiny_llava.generate(**x, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    tiny_llava.svdprune.positions = "compact"
    mask = torch.cat([x["attention_mask"], torch.ones(1, 2, dtype=torch.long)], 1)
    with pytest.raises(ValueError, match="built with positions='original'"):
        tiny_llava.generate(first.sequences, attention_mask=mask, past_key_values=first.past_key_values,
                            max_new_tokens=2)


def test_original_with_inputs_embeds_static_cache_and_beams(tiny_llava):
    x = build_llava_inputs(MIXED[:2])
    S = x["input_ids"].shape[1]
    patch_llava(tiny_llava, method="svd", budget=16, positions="original")
    ref = _gen(tiny_llava, x)[0]
    xe = {"inputs_embeds": tiny_llava.get_input_embeddings()(x["input_ids"]).detach(),
          "attention_mask": x["attention_mask"], "pixel_values": x["pixel_values"]}
    assert torch.equal(_gen(tiny_llava, xe)[0], ref[:, S:])
    assert torch.equal(_gen(tiny_llava, x, cache_implementation="static")[0], ref)
    with torch.no_grad():
        beams = tiny_llava.generate(**x, max_new_tokens=4, do_sample=False, num_beams=3, num_return_sequences=2)
        for b in range(2):  # each row's beams run at its own original positions
            one = _solo(x, b, b)
            solo = tiny_llava.generate(**one, max_new_tokens=4, do_sample=False, num_beams=3, num_return_sequences=2)
            assert torch.equal(beams[2 * b:2 * b + 2, S:], solo[:, one["input_ids"].shape[1]:])


# ------------------------------------------------------------------------------------------ hand-written loops
def test_original_hand_written_loops_equal_generate(tiny_llava):
    """Two loops: on the model's own cache (prompt = the caller's inputs; decode steps without position_ids get
    them from the cache's record) and on prune_inputs (the loop passes position_ids, as documented)."""
    x = build_llava_inputs(MIXED)
    S = x["input_ids"].shape[1]
    patch_llava(tiny_llava, method="svd", budget=16, positions="original")
    ref = _gen(tiny_llava, x, n=5)[0][:, S:]
    p = prune_inputs(tiny_llava, **x)
    for own in (True, False):
        mask, toks = p.inputs["attention_mask"], []
        with torch.no_grad():
            out = tiny_llava(**(x if own else p.inputs), use_cache=True)
            for step in range(5):
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                toks.append(nxt)
                mask = torch.cat([mask, torch.ones_like(nxt)], 1)
                pos = {} if own else {"position_ids": p.inputs["position_ids"][:, -1:] + 1 + step}
                out = tiny_llava(input_ids=nxt, attention_mask=mask, cache=out.past_key_values, use_cache=True, **pos)
        assert torch.equal(torch.cat(toks, 1), ref), own


# ------------------------------------------------------------------------------------------ (f), knob, (h)
@pytest.mark.parametrize("method", ["svd", "visionzip", "fastv"])
def test_original_at_full_budget_is_unpatched(tiny_llava, method):
    x = build_llava_inputs(MIXED[:2])
    with torch.no_grad():
        ref_logits = tiny_llava(**x).logits
    ref_seq, ref_gen = _gen(tiny_llava, x)
    patch_llava(tiny_llava, method=method, budget=N, positions="original")
    with torch.no_grad():
        assert torch.equal(tiny_llava(**x).logits, ref_logits)
    seq, gen = _gen(tiny_llava, x)
    assert torch.equal(seq, ref_seq) and torch.equal(gen, ref_gen)


@pytest.mark.parametrize("method", ["svd", "visionzip", "random"])
def test_the_knob_changes_the_logits_below_full_budget(tiny_llava, method):
    x = build_llava_inputs(MIXED[:2])
    patch_llava(tiny_llava, method=method, budget=16)
    with torch.no_grad():
        compact = tiny_llava(**x).logits
        kept = tiny_llava.svdprune.kept_indices.clone()
        tiny_llava.svdprune.positions = "original"
        original = tiny_llava(**x).logits
    assert torch.equal(tiny_llava.svdprune.kept_indices, kept)  # same tokens, other positions
    assert compact.shape == original.shape
    assert (compact - original).abs().max() > 1e-2


def test_fastv_implements_original_positions_only(tiny_llava):
    x = build_llava_inputs(MIXED[:2])
    patch_llava(tiny_llava, method="fastv", budget=16)
    default = _gen(tiny_llava, x)
    patch_llava(tiny_llava, method="fastv", budget=16, positions="original")
    assert all(torch.equal(a, b) for a, b in zip(_gen(tiny_llava, x), default))
    with pytest.raises(ValueError, match="fastv implements positions='original' only"):
        patch_llava(tiny_llava, method="fastv", budget=16, positions="compact")
    patch_llava(tiny_llava, method="svd", budget=16, positions="compact")
    tiny_llava.svdprune.method = "fastv"  # the knobs are checked at every call
    with pytest.raises(ValueError, match="fastv implements"):
        tiny_llava(**x)


def test_a_bad_positions_value_is_refused(tiny_llava):
    for bad in ("orig", "", 0, "Original"):
        with pytest.raises(ValueError, match=r"positions must be one of \('compact', 'original'\)"):
            patch_llava(tiny_llava, method="svd", budget=16, positions=bad)
    assert not hasattr(tiny_llava, "svdprune")
    patch_llava(tiny_llava, method="svd", budget=16)
    tiny_llava.svdprune.positions = "shifted"
    with pytest.raises(ValueError, match="positions must be one of"):
        tiny_llava(**build_llava_inputs(MIXED[:1]))


@pytest.mark.parametrize("method", ["svd", "visionzip"])
def test_original_without_an_attention_mask_is_not_read_as_packed_sequences(tiny_llava, method):
    """No attention_mask, no cache: the gapped position ids must not split the prompt into 'packed sequences'
    (transformers' masking_utils does that to position ids that restart or jump when the mask is None)."""
    x = build_llava_inputs([(3, 1, 4)])
    bare = {"input_ids": x["input_ids"], "pixel_values": x["pixel_values"]}
    patch_llava(tiny_llava, method=method, budget=16, positions="original")
    with torch.no_grad():
        ref = tiny_llava(**x, use_cache=False).logits
        got = tiny_llava(**bare, use_cache=False).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
