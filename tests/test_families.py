"""patch_model on LLaVA-NeXT (anyres) and Qwen2.5-VL: the LLaVA-1.5 patch contract on tiny random models built
in-process, against independent references (the model's own full-sequence path, transformers' own packing and
rotary positions, hand-built pruned runs of the language model)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (IMAGE_TOKEN_ID, QWEN_IDS, build_tiny_llava_next, build_tiny_qwen, next_inputs, qwen_inputs,
                      second_turn)
from helpers import kept_rows_reference

from svdprune_utils import select_tokens
from svdprune_utils.hf.patch import patch_llava, patch_model, prune_inputs, unpatch_model

NEXT_ROWS = [(3, [(100, 60)], 4), (2, [(40, 120), (56, 56)], 3)]  # row 1: two images of different lengths
QWEN_ROWS = [(3, [(8, 12)], 4), (2, [(4, 8), (8, 8)], 3)]


@pytest.fixture(scope="module")
def next_model():
    return build_tiny_llava_next()


@pytest.fixture(scope="module")
def qwen_model():
    return build_tiny_qwen()


@pytest.fixture(autouse=True)
def _unpatched(request):
    yield
    for name in ("next_model", "qwen_model"):
        if name in request.fixturenames:
            unpatch_model(request.getfixturevalue(name))


def _family(request, name):
    if name == "next":
        model = request.getfixturevalue("next_model")
        return model, lambda rows=NEXT_ROWS, **k: next_inputs(model, rows, **k), IMAGE_TOKEN_ID
    model = request.getfixturevalue("qwen_model")
    return model, lambda rows=QWEN_ROWS, **k: qwen_inputs(rows, **k), QWEN_IDS["image_token_id"]


def _gen(model, x, n=4, **kw):
    with torch.no_grad():
        return model.generate(**x, max_new_tokens=n, do_sample=False, **kw)

def _same_generation(model, a: dict, b: dict) -> bool:
    """Greedy generate on ``a`` and ``b`` gives the same tokens and the same logits at every step (tokens alone can
    agree on a tiny random model while the logits show attended pads)."""
    ra, rb = (_gen(model, x, return_dict_in_generate=True, output_logits=True) for x in (a, b))
    return torch.equal(ra.sequences, rb.sequences) and all(torch.equal(p, q) for p, q in zip(ra.logits, rb.logits))


def _logits(model, x):
    with torch.no_grad():
        return model(**x).logits


def _row(x: dict, b: int, images: list) -> dict:
    """Row b of a batch alone (its padding removed), with its own images."""
    real = x["attention_mask"][b].bool()
    out = {k: v[b:b + 1][:, real] for k, v in x.items() if k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    if "image_sizes" in x:
        out |= {"pixel_values": x["pixel_values"][images], "image_sizes": x["image_sizes"][images]}
    else:
        grid = x["image_grid_thw"]
        sizes = grid.prod(-1).tolist()
        pix = torch.split(x["pixel_values"], sizes)
        out |= {"pixel_values": torch.cat([pix[i] for i in images]), "image_grid_thw": grid[images]}
    return out


IMAGES_OF_ROW = {0: [0], 1: [1, 2]}


# --------------------------------------------------------------------------------------------- identity
@pytest.mark.parametrize("family", ["next", "qwen"])
def test_budget_at_least_n_is_the_unpatched_model(request, family):
    model, inputs, _ = _family(request, family)
    x = inputs()
    ref_logits, ref_gen = _logits(model, x), _gen(model, x)
    patch_model(model, "svd", budget=10_000)
    assert torch.equal(_logits(model, x), ref_logits) and torch.equal(_gen(model, x), ref_gen)
    counts = [int(k.numel()) for k in model.svdprune.kept_indices]
    assert counts == [int(p.shape[0]) for p in _image_features(model, x).pooler_output]
    unpatch_model(model)
    assert torch.equal(_logits(model, x), ref_logits) and "generate" not in vars(model)


def _image_features(model, x):
    with torch.no_grad():
        if "image_sizes" in x:
            return model.model.get_image_features(pixel_values=x["pixel_values"], image_sizes=x["image_sizes"],
                                                  return_dict=True)
        return model.model.get_image_features(x["pixel_values"], x["image_grid_thw"], return_dict=True)


@pytest.mark.parametrize("family", ["next", "qwen"])
def test_keeping_every_token_through_the_cut_equals_unpatched(request, family):
    """A stored selection of every placeholder goes through the whole apply path (cut, re-pad, Qwen's gathered
    3-D positions, mm_encoder_outputs) and must give the unpatched logits at every real column."""
    model, inputs, _ = _family(request, family)
    x = inputs()
    ref = _logits(model, x)
    every = [torch.arange(p.shape[0]) for p in _image_features(model, x).pooler_output]
    patch_model(model, "random", budget=1, kept=every)
    out = _logits(model, x)
    real = x["attention_mask"].bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ the pruned run, by hand
def _hand_pruned_logits(model, x, kept):
    """The language model on the full prompt's own input embeddings (image features scattered by the unpatched
    model's rule) with the dropped placeholders removed: LLaVA-NeXT with consecutive positions from the cut mask,
    Qwen with the full prompt's 3-D positions (``get_rope_index`` on the full prompt) at the kept columns."""
    img = x["input_ids"] == (QWEN_IDS["image_token_id"] if "image_grid_thw" in x else IMAGE_TOKEN_ID)
    feats = _image_features(model, x).pooler_output
    with torch.no_grad():
        emb = model.get_input_embeddings()(x["input_ids"]).clone()
        emb[img] = torch.cat(list(feats))
    keep = ~img & x["attention_mask"].bool()
    i = 0
    for b in range(img.shape[0]):
        cols = img[b].nonzero().flatten()
        start = 0
        while start < len(cols) and i < len(kept):
            n = feats[i].shape[0]
            keep[b, cols[start:start + n][kept[i]]] = True
            start += n
            i += 1
    out = []
    for b in range(img.shape[0]):
        e = emb[b][keep[b]][None]
        kw = {}
        if "image_grid_thw" in x:
            pos, _ = model.model.get_rope_index(x["input_ids"], mm_token_type_ids=x["mm_token_type_ids"],
                                                image_grid_thw=x["image_grid_thw"],
                                                attention_mask=x["attention_mask"])
            kw["position_ids"] = pos[:, b:b + 1, keep[b]]
        with torch.no_grad():
            h = model.model.language_model(inputs_embeds=e, **kw).last_hidden_state
            out.append(model.lm_head(h)[0])
    return out


@pytest.mark.parametrize("family", ["next", "qwen"])
@pytest.mark.parametrize("method", ["svd", "divprune", "cdpruner"])
def test_pruned_forward_equals_the_hand_built_pruned_run(request, family, method):
    model, inputs, _ = _family(request, family)
    x = inputs(pad_left=True)
    patch_model(model, method, budget=5)
    out = _logits(model, x)
    kept = model.svdprune.kept_indices
    assert [len(k) for k in kept] == [5, 5, 5]
    ref = _hand_pruned_logits(model, x, kept)
    for b in range(2):
        torch.testing.assert_close(out[b, -len(ref[b]):], ref[b], atol=1e-5, rtol=1e-5)


def test_next_selection_scores_the_packed_vision_features(next_model):
    """svd on LLaVA-NeXT scores the layer −2 patch features of every tile, packed as transformers packs them
    (pack_image_features on the vision features themselves, no newlines): the kept placeholders must carry the
    projector's output of exactly the tokens select_tokens picks there."""
    x = next_inputs(next_model, NEXT_ROWS)
    patch_model(next_model, "svd", budget=6)
    kept = prune_inputs(next_model, **x).kept
    full = _image_features(next_model, x)
    with torch.no_grad():
        out = next_model.model.vision_tower(next_model_pixels(next_model, x), output_hidden_states=True)
        vision = out.hidden_states[-2][:, 1:]
        tiles = [t.shape[0] for t in torch.split(vision, _tiles(next_model, x))]
        packed, _ = next_model.model.pack_image_features(list(torch.split(vision, tiles)), x["image_sizes"],
                                                         "default", image_newline=None)
        for i, v in enumerate(packed):
            ref = select_tokens(v[None], 6, "svd")[0]
            proj = next_model.model.multi_modal_projector(v[ref])
            torch.testing.assert_close(full.pooler_output[i][kept[i]], proj, atol=1e-5, rtol=1e-5)


def _tiles(model, x):
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    return [image_size_to_num_patches(s, model.config.image_grid_pinpoints, 56) for s in x["image_sizes"]]


def next_model_pixels(model, x):
    return torch.cat([p[:t] for p, t in zip(x["pixel_values"], _tiles(model, x))])


def test_qwen_vision_features_are_the_mergers_input(qwen_model):
    """Qwen's "vision" features (the last block's output regrouped 2×2 in raster order) must be what the merger
    turns into the LLM's image features: merger(features) == pooler_output, image by image."""
    from svdprune_utils.hf.families import FAMILIES

    fam = FAMILIES["qwen2_5_vl"]
    x = qwen_inputs(QWEN_ROWS)
    out = _image_features(qwen_model, x)
    lay = fam.layout(qwen_model, x)
    feats = fam.features(qwen_model, x, out, lay, None, list(out.pooler_output), "vision")
    with torch.no_grad():
        for f, p in zip(feats, out.pooler_output):
            torch.testing.assert_close(qwen_model.model.visual.merger(f.reshape(-1, 32)), p, atol=1e-6, rtol=1e-5)
    patch_model(qwen_model, "svd", budget=4)
    kept = prune_inputs(qwen_model, **x).kept
    for f, k in zip(feats, kept):
        assert torch.equal(k, select_tokens(f[None], 4, "svd")[0])


# ---------------------------------------------------------------------------------- generate contract
@pytest.mark.parametrize("family", ["next", "qwen"])
@pytest.mark.parametrize("pad_left", [True, False])
def test_batch_equals_each_row_alone(request, family, pad_left):
    model, inputs, _ = _family(request, family)
    x = inputs(pad_left=pad_left)
    patch_model(model, "svd", budget=5)
    out = _logits(model, x)
    kept = [k.clone() for k in model.svdprune.kept_indices]
    gen = _gen(model, x) if pad_left else None
    S = x["input_ids"].shape[1]
    for b in range(2):
        one = _row(x, b, IMAGES_OF_ROW[b])
        solo = _logits(model, one)
        assert all(torch.equal(kept[i], k) for i, k in zip(IMAGES_OF_ROW[b], model.svdprune.kept_indices))
        n = solo.shape[1]
        got = out[b, -n:] if pad_left else out[b, :n]
        torch.testing.assert_close(got, solo[0], atol=1e-5, rtol=1e-5)
        if gen is not None:
            assert torch.equal(gen[b, S:], _gen(model, one)[0, one["input_ids"].shape[1]:])


@pytest.mark.parametrize("family", ["next", "qwen"])
def test_generate_with_cache_equals_without(request, family):
    model, inputs, _ = _family(request, family)
    x = inputs()
    patch_model(model, "svd", budget=5)
    a = _gen(model, x, n=5)
    b = _gen(model, x, n=5, use_cache=False)
    assert torch.equal(a, b) and torch.equal(a[:, :x["input_ids"].shape[1]], x["input_ids"])


@pytest.mark.parametrize("family", ["next", "qwen"])
def test_generated_tokens_follow_the_pruned_runs_logits(request, family):
    """Greedy generation's tokens are the argmax of a no-cache forward over the pruned prompt + tokens so far
    (each step through the patched forward: cut, positions, new tokens numbered on from the prompt)."""
    model, inputs, _ = _family(request, family)
    x = inputs()
    patch_model(model, "svd", budget=5)
    seq = _gen(model, x, n=3)
    S = x["input_ids"].shape[1]
    for t in range(3):
        y = dict(x, input_ids=seq[:, :S + t],
                 attention_mask=torch.cat([x["attention_mask"], torch.ones(2, t, dtype=torch.long)], 1))
        if "mm_token_type_ids" in x:
            y["mm_token_type_ids"] = torch.cat([x["mm_token_type_ids"], torch.zeros(2, t, dtype=torch.long)], 1)
        assert torch.equal(_logits(model, y)[:, -1].argmax(-1), seq[:, S + t])


@pytest.mark.parametrize("family", ["next", "qwen"])
def test_continuing_the_returned_cache(request, family):
    model, inputs, _ = _family(request, family)
    x = inputs()
    patch_model(model, "svd", budget=5)
    one = _gen(model, x, n=6)
    first = _gen(model, x, n=3, return_dict_in_generate=True)
    mask = torch.cat([x["attention_mask"], torch.ones(2, 3, dtype=torch.long)], 1)
    with torch.no_grad():
        cont = model.generate(first.sequences, attention_mask=mask, cache=first.past_key_values,
                              max_new_tokens=3, do_sample=False)
    assert torch.equal(cont, one)
    first = _gen(model, x, n=3, return_dict_in_generate=True)  # (the continuation above grew the cache)
    conv, cmask = second_turn(x, first.sequences)  # a second turn: new text after the first answer
    extra = {k: v for k, v in x.items() if k in ("pixel_values", "image_sizes", "image_grid_thw")}
    fresh_kw = dict(extra)
    if "mm_token_type_ids" in x:
        fresh_kw["mm_token_type_ids"] = torch.cat(
            [x["mm_token_type_ids"], torch.zeros(2, conv.shape[1] - x["input_ids"].shape[1], dtype=torch.long)], 1)
    with torch.no_grad():
        cont = model.generate(conv, attention_mask=cmask, cache=first.past_key_values, max_new_tokens=4,
                              do_sample=False)
        fresh = model.generate(conv, attention_mask=cmask, max_new_tokens=4, do_sample=False, **fresh_kw)
    assert torch.equal(cont, fresh)
    first = _gen(model, x, n=3, return_dict_in_generate=True)
    model.svdprune.method = "norm"  # another pre-LLM method: refused, as another budget is
    with pytest.raises(ValueError, match="built by svd; the patch's method is now norm"):
        model.generate(first.sequences, attention_mask=mask, cache=first.past_key_values, max_new_tokens=2)
    model.svdprune.method = "svd"
    model.svdprune.budget = 6
    with pytest.raises(ValueError, match="built with 5 tokens per image"):
        model.generate(first.sequences, attention_mask=mask, cache=first.past_key_values,
                       max_new_tokens=2)


@pytest.mark.parametrize("family", ["next", "qwen"])
def test_beams_sampling_and_lengths(request, family):
    model, inputs, _ = _family(request, family)
    x = inputs()
    S = x["input_ids"].shape[1]
    patch_model(model, "svd", budget=5)
    beams = _gen(model, x, n=4, num_beams=3, num_return_sequences=2)
    assert beams.shape == (4, S + 4) and torch.equal(beams[:, :S], x["input_ids"].repeat_interleave(2, 0))
    for b in range(2):
        one = _row(x, b, IMAGES_OF_ROW[b])
        solo = _gen(model, one, n=4, num_beams=3, num_return_sequences=2)
        assert torch.equal(beams[2 * b:2 * b + 2, S:], solo[:, one["input_ids"].shape[1]:])
    torch.manual_seed(0)
    a = model.generate(**x, max_new_tokens=4, do_sample=True, num_return_sequences=2)
    torch.manual_seed(0)
    assert torch.equal(a, model.generate(**x, max_new_tokens=4, do_sample=True, num_return_sequences=2))
    with torch.no_grad():
        out = model.generate(**x, max_length=S + 3, do_sample=False)
    assert out.shape[1] == S + 3 and torch.equal(out, _gen(model, x, n=3))


@pytest.mark.parametrize("family", ["next", "qwen"])
def test_labels_deepcopy_and_unpatch(request, family):
    model, inputs, _ = _family(request, family)
    x = inputs()
    ref = _logits(model, x)
    patch_model(model, "svd", budget=5)
    with torch.no_grad():
        out = model(**x, labels=x["input_ids"])
    L = out.logits.shape[1]
    p = prune_inputs(model, **x)
    labels = p.inputs["input_ids"].masked_fill(p.inputs["attention_mask"] == 0, -100)
    logits, target = out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
    assert L == labels.shape[1]
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(logits, target), atol=1e-5, rtol=1e-5)
    twin = copy.deepcopy(model)
    twin.svdprune.budget = 10_000
    assert torch.equal(_logits(twin, x), ref) and model.svdprune.budget == 5
    assert _logits(model, x).shape[1] == L
    unpatch_model(model)
    assert torch.equal(_logits(model, x), ref)


def test_next_inputs_embeds_equals_input_ids(next_model):
    x = next_inputs(next_model, NEXT_ROWS)
    patch_model(next_model, "svd", budget=5)
    a = _logits(next_model, x)
    with torch.no_grad():
        emb = next_model.get_input_embeddings()(x["input_ids"])
    y = {k: v for k, v in x.items() if k != "input_ids"} | {"inputs_embeds": emb}
    torch.testing.assert_close(_logits(next_model, y), a, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------- LLaVA-NeXT's rules, stated
def _newline_offsets(model, x, i):
    """Offsets of image i's newline tokens: the packed rows equal to the model's image_newline."""
    p = _image_features(model, x).pooler_output[i]
    return (p == model.model.image_newline.to(p.dtype)).all(-1).nonzero().flatten()


def test_next_newlines_dropped_or_kept_per_grid_row(next_model):
    x = next_inputs(next_model, NEXT_ROWS)
    patch_model(next_model, "svd", budget=6)
    dropped = prune_inputs(next_model, **x).kept
    patch_model(next_model, "svd", budget=6, newlines="keep")
    kept = prune_inputs(next_model, **x).kept
    P = 16  # the base tile's patches come first and have no newline
    for i in range(3):
        nl = _newline_offsets(next_model, x, i)
        assert not set(dropped[i].tolist()) & set(nl.tolist()) and len(dropped[i]) == 6
        grid = [int(k) for k in dropped[i] if k >= P]
        rows = {int(nl[nl >= k][0]) for k in grid}  # a grid token's row ends at the next newline
        assert set(kept[i].tolist()) == set(dropped[i].tolist()) | rows
        assert torch.equal(kept[i], kept[i].sort().values)


def test_next_budget_per_tile(next_model):
    """scope='tile': the base tile and every grid tile keep min(budget, their tokens) each."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    x = next_inputs(next_model, [(3, [(100, 60)], 4)])
    patch_model(next_model, "svd", budget=3, scope="tile")
    kept = prune_inputs(next_model, **x).kept[0]
    gh, gw = get_anyres_image_grid_shape(x["image_sizes"][0], next_model.config.image_grid_pinpoints, 56)
    assert int((kept < 16).sum()) == 3
    assert len(kept) == 3 * (1 + gh * gw)  # each 4×4 tile keeps >= 3 tokens after unpadding 100×60 to its grid


# ------------------------------------------------------------------------------------- clear errors
def test_unsupported_configurations_are_refused_clearly(next_model, qwen_model):
    xq = qwen_inputs(QWEN_ROWS)
    for method in ("cls_attention", "vispruner", "visionzip"):
        with pytest.raises(ValueError, match="has no CLS token"):
            patch_model(qwen_model, method, budget=4)
        patch_model(qwen_model, "svd", budget=4)
        qwen_model.svdprune.method = method  # a knob set after patching is checked at the call
        with pytest.raises(ValueError, match="has no CLS token"):
            _logits(qwen_model, xq)
    with pytest.raises(ValueError, match="positions in \\('original',\\)"):
        patch_model(qwen_model, "svd", budget=4, positions="compact")
    with pytest.raises(ValueError, match="LLaVA-NeXT's knobs"):
        patch_model(qwen_model, "svd", budget=4, scope="tile")
    with pytest.raises(ValueError, match="scope must be"):
        patch_model(next_model, "svd", budget=4, scope="tiles")
    with pytest.raises(ValueError, match="per-token signals"):
        patch_model(next_model, "cdpruner", budget=4, relevance=torch.ones(3, 10))
    with pytest.raises(TypeError, match="use patch_model"):
        patch_llava(next_model, budget=4)
    with pytest.raises(TypeError, match="patch_model supports"):
        patch_model(torch.nn.Linear(2, 2))
    xn = next_inputs(next_model, NEXT_ROWS)
    patch_model(next_model, "uniform", budget=4)
    with pytest.raises(ValueError, match="uniform spreads its tokens over one patch grid"):
        _logits(next_model, xn)
    patch_model(next_model, "svd", budget=4)
    with pytest.raises(NotImplementedError, match="only vision_feature_select_strategy='default'"):
        _logits(next_model, xn | {"vision_feature_select_strategy": "full"})  # the call's own strategy counts
    with pytest.raises(ValueError, match="needs image_sizes"):
        _logits(next_model, {k: v for k, v in xn.items() if k != "image_sizes"})
    patch_model(qwen_model, "svd", budget=4)
    with pytest.raises(NotImplementedError, match="video inputs"):
        _logits(qwen_model, xq | {"pixel_values_videos": torch.zeros(4, 1176), "video_grid_thw": torch.ones(1, 3)})
    text_only = {k: xq[k] for k in ("input_ids", "attention_mask")}
    with pytest.raises(NotImplementedError, match="video inputs"):  # a call with videos only, too
        _logits(qwen_model, text_only | {"pixel_values_videos": torch.zeros(4, 1176),
                                         "video_grid_thw": torch.ones(1, 3)})
    with pytest.raises(ValueError, match="fastv_layer must be an int"):
        patch_model(qwen_model, "fastv", budget=4, fastv_layer="1")
    with torch.no_grad():
        emb = qwen_model.get_input_embeddings()(xq["input_ids"])
    with pytest.raises(ValueError, match="pruning needs input_ids"):
        _logits(qwen_model, {k: v for k, v in xq.items() if k != "input_ids"} | {"inputs_embeds": emb})
    with pytest.raises(ValueError, match="needs mm_token_type_ids"):
        _logits(qwen_model, {k: v for k, v in xq.items() if k != "mm_token_type_ids"})
    wrong = dict(xq, input_ids=xq["input_ids"].clone())
    wrong["input_ids"][0, wrong["input_ids"][0] == QWEN_IDS["image_token_id"]] = 5  # row 0 loses its image
    with pytest.raises(ValueError, match="row 1: image 0.s placeholders must be a run of 24"):
        _logits(qwen_model, wrong)
    with pytest.raises(ValueError, match="kept\\[1\\] must hold strictly ascending"):
        patch_model(qwen_model, "random", budget=1, kept=[torch.tensor([0, 1]), torch.tensor([2, 1])])
    patch_model(qwen_model, "random", budget=1, kept=[torch.tensor([0, 99])] * 3)
    with pytest.raises(ValueError, match="kept\\[0\\] must be strictly ascending indices in \\[0, 24\\)"):
        _logits(qwen_model, xq)


# ------------------------------------------------------------------------- every method, where it can run
def _pre_llm_methods():
    from svdprune_utils.core.reduction import REDUCERS
    from svdprune_utils.core.selection import SELECTORS

    return sorted((set(SELECTORS) | set(REDUCERS)) - {"fastv"})


@pytest.mark.parametrize("family", ["next", "qwen"])
@pytest.mark.parametrize("method", _pre_llm_methods())
def test_every_pre_llm_method_where_its_signals_exist(request, family, method):
    """Each image reaches the LLM with exactly `budget` tokens (rows hold 1 and 2 images), or the method is refused
    with the reason: Qwen's tower has no CLS token; LLaVA-NeXT's tokens form no single grid for uniform."""
    model, inputs, image_id = _family(request, family)
    x = inputs()
    if family == "qwen" and method in ("cls_attention", "vispruner", "visionzip"):
        with pytest.raises(ValueError, match="has no CLS token"):
            patch_model(model, method, budget=5)
        return
    patch_model(model, method, budget=5)
    if family == "next" and method == "uniform":
        with pytest.raises(ValueError, match="one patch grid"):
            prune_inputs(model, **x)
        return
    p = prune_inputs(model, **x)
    assert (p.inputs["input_ids"] == image_id).sum(1).tolist() == [5, 10]
    assert [len(k) for k in p.kept] == [5, 5, 5]
    with torch.no_grad():
        out = model(**x)
    assert out.logits.shape[1] == p.inputs["input_ids"].shape[1] and torch.isfinite(out.logits).all()
    again = prune_inputs(model, **x)  # deterministic
    assert all(torch.equal(a, b) for a, b in zip(again.kept, p.kept))


def test_qwen_uniform_spreads_over_each_images_merged_grid(qwen_model):
    from svdprune_utils.core.selection import select_uniform

    x = qwen_inputs(QWEN_ROWS)
    patch_model(qwen_model, "uniform", budget=4)
    kept = prune_inputs(qwen_model, **x).kept
    for k, (h, w) in zip(kept, [(4, 6), (2, 4), (4, 4)]):  # the merged grids of 8×12, 4×8 and 8×8 patches
        assert torch.equal(k, select_uniform(torch.zeros(1, h * w, 1), 4, grid=(h, w))[0])


def test_a_budget_ratio_keeps_a_share_of_each_image(qwen_model, next_model):
    x = qwen_inputs(QWEN_ROWS)
    patch_model(qwen_model, "svd", budget=0.25)
    assert [len(k) for k in prune_inputs(qwen_model, **x).kept] == [6, 2, 4]  # ceil(0.25 × 24, 8, 16)
    patch_model(qwen_model, "svd", budget=1.0)
    ref = _logits(qwen_model, x)
    unpatch_model(qwen_model)
    assert torch.equal(_logits(qwen_model, x), ref)
    import numpy as np

    patch_model(qwen_model, "svd", budget=np.float32(0.25))  # any real number is a ratio
    assert [len(k) for k in prune_inputs(qwen_model, **x).kept] == [6, 2, 4]
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="ratio of each image's tokens in \\(0, 1\\]"):
            patch_model(qwen_model, "svd", budget=bad)
    one = qwen_inputs([(3, [(8, 12)], 4)])
    patch_model(qwen_model, "fastv", budget=0.25, fastv_layer=1)
    with torch.no_grad():
        qwen_model(**one)
    assert [len(k) for k in qwen_model.svdprune.kept_indices] == [6]  # FastV's cut: ceil(0.25 × 24)
    xn = next_inputs(next_model, [(3, [(100, 60)], 4)])
    patch_model(next_model, "svd", budget=0.1)
    n_patches = 16 + sum(1 for v in _image_features(next_model, xn).pooler_output[0][16:]
                         if not torch.equal(v, next_model.model.image_newline))
    assert len(prune_inputs(next_model, **xn).kept[0]) == -(-n_patches // 10)


def test_next_cls_attention_is_each_tiles_cls_row_packed(next_model):
    """cls_attention on LLaVA-NeXT ranks every patch of every tile by its own tile's CLS→patch attention (heads
    averaged) at the feature layer; the reference reads eager attention weights from the tower and packs them
    with transformers' pack_image_features (no newlines)."""
    x = next_inputs(next_model, NEXT_ROWS)
    patch_model(next_model, "cls_attention", budget=6)
    kept = prune_inputs(next_model, **x).kept
    cfg = next_model.model.vision_tower.config
    before = cfg._attn_implementation
    cfg._attn_implementation = "eager"
    try:
        with torch.no_grad():
            att = next_model.model.vision_tower(next_model_pixels(next_model, x), output_attentions=True).attentions
    finally:
        cfg._attn_implementation = before
    cls = att[-2][:, :, 0, 1:].mean(1)  # layer −2's output is hidden_states[-2]: the attention of encoder layer −2
    tiles = _tiles(next_model, x)
    packed, _ = next_model.model.pack_image_features([c[..., None] for c in torch.split(cls, tiles)],
                                                     x["image_sizes"], "default", image_newline=None)
    full = _image_features(next_model, x).pooler_output
    nl = next_model.model.image_newline
    for i, a in enumerate(packed):
        cand = [j for j in range(full[i].shape[0]) if not torch.equal(full[i][j], nl)]
        ref = torch.tensor(cand)[a[:, 0].topk(6).indices].sort().values
        assert torch.equal(kept[i], ref)


def test_qwen2_vl_shares_the_adapter():
    """Qwen2-VL (no windowed attention in its tower): keeping every token through the cut is the unpatched model,
    its vision features are the merger's input, and a pruned batch equals its rows alone."""
    from conftest import build_tiny_qwen2_vl

    from svdprune_utils.hf.families import FAMILIES

    model = build_tiny_qwen2_vl()
    x = qwen_inputs(QWEN_ROWS)
    ref = _logits(model, x)
    out = _image_features(model, x)
    fam = FAMILIES["qwen2_5_vl"]
    feats = fam.features(model, x, out, fam.layout(model, x), None, list(out.pooler_output), "vision")
    with torch.no_grad():
        for f, p in zip(feats, out.pooler_output):
            torch.testing.assert_close(model.model.visual.merger(f.reshape(-1, 32)), p, atol=1e-6, rtol=1e-5)
    patch_model(model, "random", budget=1, kept=[torch.arange(p.shape[0]) for p in out.pooler_output])
    real = x["attention_mask"].bool()
    torch.testing.assert_close(_logits(model, x)[real], ref[real], atol=1e-5, rtol=1e-5)
    patch_model(model, "svd", budget=5)
    gen = _gen(model, x)
    S = x["input_ids"].shape[1]
    for b in range(2):
        one = _row(x, b, IMAGES_OF_ROW[b])
        assert torch.equal(gen[b, S:], _gen(model, one)[0, one["input_ids"].shape[1]:])


@pytest.mark.parametrize("family", ["next", "qwen"])
def test_hand_written_decode_loop_equals_generate(request, family):
    """prune_inputs, one forward on the cut prompt, then decode steps that pass only the new token and the grown
    mask (no position_ids): the patch numbers them from the cache's record as generate does."""
    model, inputs, _ = _family(request, family)
    x = inputs()
    patch_model(model, "svd", budget=5)
    ref = _gen(model, x, n=4)
    p = prune_inputs(model, **x)
    mask = p.inputs["attention_mask"]
    with torch.no_grad():
        out = model(**p.inputs, use_cache=True)
        toks = [out.logits[:, -1].argmax(-1)]
        for _ in range(3):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
            out = model(input_ids=toks[-1][:, None], attention_mask=mask, cache=out.cache, use_cache=True)
            toks.append(out.logits[:, -1].argmax(-1))
    assert torch.equal(torch.stack(toks, 1), ref[:, x["input_ids"].shape[1]:])


@pytest.mark.parametrize("family", ["next", "qwen"])
def test_static_cache(request, family):
    model, inputs, _ = _family(request, family)
    x = inputs()
    patch_model(model, "svd", budget=5)
    assert torch.equal(_gen(model, x, cache_implementation="static"), _gen(model, x))


# ---------------------------------------------------------------- found by a fresh-eyes review of this code
@pytest.mark.parametrize("family", ["next", "qwen"])
def test_continuing_a_cache_filled_with_several_return_sequences(request, family):
    """generate repeats every prompt row before the cache fills (num_return_sequences): continuing that cache
    cuts each repeated row's images as the prompt's were; each continued row equals its row run alone afresh."""
    model, inputs, _ = _family(request, family)
    x = inputs()
    S = x["input_ids"].shape[1]
    patch_model(model, "svd", budget=5)
    special = torch.tensor([IMAGE_TOKEN_ID, *QWEN_IDS.values()])
    for seed in range(20):  # a sample whose new tokens hold no image/vision id (a fresh run would read it as one)
        torch.manual_seed(seed)
        with torch.no_grad():
            first = model.generate(**x, max_new_tokens=3, do_sample=True, num_return_sequences=2,
                                   return_dict_in_generate=True)
        if not torch.isin(first.sequences[:, S:], special).any():
            break
    with torch.no_grad():
        mask = torch.cat([x["attention_mask"].repeat_interleave(2, 0), torch.ones(4, 3, dtype=torch.long)], 1)
        cont = model.generate(first.sequences, attention_mask=mask, cache=first.past_key_values, max_new_tokens=2,
                              do_sample=False)
    assert cont.shape == (4, S + 5) and torch.equal(cont[:, :S + 3], first.sequences)
    for j in range(4):
        b = j // 2
        one = _row(x, b, IMAGES_OF_ROW[b])
        new = first.sequences[j:j + 1, S:]
        one["input_ids"] = torch.cat([one["input_ids"], new], 1)
        one["attention_mask"] = torch.ones_like(one["input_ids"])
        if "mm_token_type_ids" in one:
            one["mm_token_type_ids"] = torch.cat([one["mm_token_type_ids"], torch.zeros_like(new)], 1)
        assert torch.equal(cont[j, S + 3:], _gen(model, one, n=2)[0, -2:])


def test_next_tile_budget_covering_every_tile_is_the_unpatched_model(next_model):
    x = next_inputs(next_model, NEXT_ROWS)
    ref = _logits(next_model, x)
    patch_model(next_model, "svd", budget=16, scope="tile")  # 16 = a tile's patches (56 px, patch 14)
    assert torch.equal(_logits(next_model, x), ref)
    patch_model(next_model, "svd", budget=15, scope="tile")
    assert _logits(next_model, x).shape[1] < ref.shape[1]


def test_qwen_with_the_callers_own_position_ids(qwen_model):
    """A caller passing the full prompt's 3-D positions (get_rope_index's) gets what the patch computes itself."""
    x = qwen_inputs(QWEN_ROWS)
    pos, _ = qwen_model.model.get_rope_index(x["input_ids"], mm_token_type_ids=x["mm_token_type_ids"],
                                             image_grid_thw=x["image_grid_thw"], attention_mask=x["attention_mask"])
    patch_model(qwen_model, "svd", budget=5)
    ref = _logits(qwen_model, x)
    assert torch.equal(_logits(qwen_model, dict(x, position_ids=pos)), ref)
    text = (x["attention_mask"].cumsum(-1) - 1).clamp_min(0)  # generate's 4-row form: text positions first
    assert torch.equal(_logits(qwen_model, dict(x, position_ids=torch.cat([text[None], pos]))), ref)
    with pytest.raises(ValueError, match="position_ids must be"):
        _logits(qwen_model, dict(x, position_ids=pos[None]))



# ------------------------------------------------------------------- found by a second user break-it pass
@pytest.mark.parametrize("family", ["next", "qwen"])
def test_generate_without_attention_mask_infers_it_from_the_pad_tokens(request, family):
    """Unpatched, generate infers a left-padded batch's mask from its pad tokens (pad id 0, no eos). The patch cuts
    the prompt before transformers would; it must infer the same mask first, not re-pad the pads as real tokens."""
    model, inputs, _ = _family(request, family)
    x = inputs()
    assert (x["attention_mask"] == 0).any() and model.generation_config.pad_token_id == 0
    no_mask = {k: v for k, v in x.items() if k != "attention_mask"}
    assert _same_generation(model, no_mask, x)  # transformers' own inference, unpatched
    patch_model(model, "svd", budget=5)
    assert _same_generation(model, no_mask, x)


@pytest.mark.parametrize("family", ["next", "qwen"])
@pytest.mark.parametrize("kept", [5, 5.0, "0,1,2", torch.tensor(3)])
def test_kept_that_is_not_a_list_of_index_rows_is_refused_clearly(request, family, kept):
    model, _, _ = _family(request, family)
    with pytest.raises(ValueError, match="kept must be a list of 1-D integer index tensors"):
        patch_model(model, "svd", budget=4, kept=kept)


@pytest.mark.parametrize("family", ["next", "qwen"])
def test_selector_arguments_are_checked_when_the_patch_is_installed(request, family):
    """A misspelled or invalid selector argument fails at patch_model, also when no call would prune (a budget
    covering every image, a text-only call), where it used to be silently ignored."""
    model, _, _ = _family(request, family)
    with pytest.raises(TypeError, match=r"unknown signal\(s\) \['rnak'\]"):
        patch_model(model, "svd", budget=10**6, rnak=3)
    with pytest.raises(ValueError, match="rank must be an int >= 1 or a float in \\(0, 1\\], got -3"):
        patch_model(model, "svd", budget=1.0, rank=-3)
    with pytest.raises(ValueError, match="method must be one of"):
        patch_model(model, "svd", budget=4, solver="qr")
    if family == "next":  # vispruner reads CLS attention: Qwen refuses the method itself
        with pytest.raises(ValueError, match="important_ratio must be in"):
            patch_model(model, "vispruner", budget=4, important_ratio=2.0)
    patch_model(model, "divprune", budget=4, important_ratio=2.0)  # vispruner's signal: ignored
    patch_model(model, "svd", budget=4, rank=2, center=True, solver="approx", seed=3)  # valid values pass
    model.svdprune.selector_kwargs = {"rnak": 3}  # knobs are plain attributes: checked again at every call
    with pytest.raises(TypeError, match="rnak"):
        _gen(model, {"input_ids": torch.tensor([[1, 5, 6]])})


def test_qwen_refuses_cls_methods_when_patched(qwen_model):
    """The README's promise: a CLS method on Qwen's tower (no CLS) raises — at patch time, so also when the budget
    covers every image and nothing would be scored."""
    for method in ("cls_attention", "vispruner", "visionzip"):
        with pytest.raises(ValueError, match="has no CLS token"):
            patch_model(qwen_model, method, budget=10**6)


# ------------------------------------------------------------------------------------ FastV, inside the LLM
FASTV_ROWS = {"next": [(3, [(100, 60)], 4), (6, [(100, 60)], 2)], "qwen": [(3, [(8, 12)], 4), (6, [(8, 12)], 2)]}


def _last_token_attention(model, x, layer):
    """(B, S): the attention of each row's last token at decoder layer ``layer``, heads averaged, read from the
    unpatched model's eager attention weights (output_attentions) on a deep copy."""
    twin = copy.deepcopy(model)
    unpatch_model(twin)
    twin.config.text_config._attn_implementation = "eager"
    with torch.no_grad():
        att = twin(**x, output_attentions=True).attentions[layer]
    return att[:, :, -1].mean(1)


@pytest.mark.parametrize("family", ["next", "qwen"])
def test_fastv_on_other_families_equals_a_hand_built_run(request, family):
    """FastV at layer K: each image keeps the `budget` placeholders its row's last token attends to most at layer
    K−1 (eager weights, heads averaged); layers >= K run on the kept rows at their ORIGINAL positions (Qwen: the
    full prompt's 3-D positions), causal among themselves, padding masked — rebuilt with the model's own layers."""
    model, inputs, image_id = _family(request, family)
    x = inputs(FASTV_ROWS[family])
    K, budget = 1, 5
    lm = model.model.language_model
    box = []
    h = lm.layers[K].register_forward_pre_hook(lambda m, a, k: box.append(a[0] if a else k["hidden_states"]),
                                               with_kwargs=True)
    with torch.no_grad():
        model(**x)
    h.remove()
    att = _last_token_attention(model, x, K - 1)
    patch_model(model, "fastv", budget=budget, fastv_layer=K)
    with torch.no_grad():
        got = model(**x).logits
    kept = model.svdprune.kept_indices
    img = x["input_ids"] == image_id
    rows = []
    for b in range(2):
        run = img[b].nonzero().flatten()
        ref_kept = att[b, run].topk(budget).indices.sort().values
        assert torch.equal(kept[b], ref_kept)
        rows.append(torch.cat([(~img[b]).nonzero().flatten(), run[ref_kept]]).sort().values)
    rows = torch.stack(rows)
    if family == "qwen":
        full, _ = model.model.get_rope_index(x["input_ids"], mm_token_type_ids=x["mm_token_type_ids"],
                                             image_grid_thw=x["image_grid_thw"], attention_mask=x["attention_mask"])
        pos = full.gather(2, rows[None].expand(3, -1, -1))
        pid = None
    else:
        pos = (x["attention_mask"].cumsum(-1) - 1).clamp_min(0).gather(1, rows)
        pid = pos
    ref, real = kept_rows_reference(model, box[0], rows, x["attention_mask"], K, pos, pid)
    assert got.shape == ref.shape
    torch.testing.assert_close(got[real], ref[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["next", "qwen"])
def test_fastv_on_other_families_keeps_the_generate_contract(request, family):
    model, inputs, _ = _family(request, family)
    x = inputs(FASTV_ROWS[family])
    S = x["input_ids"].shape[1]
    ref = _gen(model, x)
    patch_model(model, "fastv", budget=10_000, fastv_layer=1)
    assert torch.equal(_gen(model, x), ref)
    patch_model(model, "fastv", budget=5, fastv_layer=1)
    gen = _gen(model, x, n=5)
    assert torch.equal(gen, _gen(model, x, n=5, use_cache=False))
    for b in range(2):  # a batch (same image layout per row, different padding) = each row alone
        one = _row(x, b, [b])
        assert torch.equal(gen[b, S:], _gen(model, one, n=5)[0, one["input_ids"].shape[1]:])
    first = _gen(model, x, n=2, return_dict_in_generate=True)
    mask = torch.cat([x["attention_mask"], torch.ones(2, 2, dtype=torch.long)], 1)
    with torch.no_grad():
        cont = model.generate(first.sequences, attention_mask=mask, cache=first.past_key_values, max_new_tokens=3,
                              do_sample=False)
    assert torch.equal(cont, gen)
    kept = [k.clone() for k in model.svdprune.kept_indices]
    patch_model(model, "fastv", budget=5, fastv_layer=1, kept=kept)  # a stored selection replays exactly
    assert torch.equal(_gen(model, x, n=5), gen)
    patch_model(model, "fastv", budget=5, fastv_layer=1)
    with pytest.raises(NotImplementedError, match="rows would keep .* columns after the cut"):
        _logits(model, inputs())  # rows whose images differ in number and length



def test_llava_cache_continued_with_another_pre_llm_method_is_refused():
    from conftest import build_llava_inputs, build_tiny_llava

    model = build_tiny_llava()
    x = build_llava_inputs([(3, 1, 4)])
    patch_llava(model, "svd", budget=16)
    first = _gen(model, x, n=2, return_dict_in_generate=True)
    mask = torch.cat([x["attention_mask"], torch.ones(1, 2, dtype=torch.long)], 1)
    model.svdprune.method = "norm"
    with pytest.raises(ValueError, match="built by svd; the patch's method is now norm"):
        model.generate(first.sequences, attention_mask=mask, cache=first.past_key_values, max_new_tokens=2)


@pytest.mark.parametrize("family", ["next", "qwen"])
def test_sparsevlm_on_other_families(request, family):
    """SparseVLM's rules as on LLaVA-1.5 (the mechanism is shared and tested against a hand-built run there): its
    schedule for the image's placeholder count, the last stage's tokens per image, cache = no cache, batch = rows
    alone, full budget = unpatched; images of different lengths in one call are refused clearly."""
    from svdprune_utils.hf.sparsevlm import schedule

    model, inputs, _ = _family(request, family)
    x = inputs(FASTV_ROWS[family])
    S = x["input_ids"].shape[1]
    n = int(_image_features(model, x).pooler_output[0].shape[0])
    ref = _gen(model, x)
    patch_model(model, "sparsevlm", budget=10_000)
    assert torch.equal(_gen(model, x), ref)
    budget = n // 3
    patch_model(model, "sparsevlm", budget=budget)
    with torch.no_grad():
        model(**x)
    last = schedule(budget, 2, n).counts[-1]
    assert [len(k) for k in model.svdprune.kept_indices] == [last, last]
    gen = _gen(model, x, n=4)
    assert torch.equal(gen, _gen(model, x, n=4, use_cache=False))
    for b in range(2):
        one = _row(x, b, [b])
        assert torch.equal(gen[b, S:], _gen(model, one, n=4)[0, one["input_ids"].shape[1]:])
    with pytest.raises(NotImplementedError, match="same number of placeholders"):
        _logits(model, inputs())


def test_sparsevlm_schedule_follows_the_images_placeholder_count():
    """On a 6-layer decoder SparseVLM cuts after layers 0, 1 and 3 with counts that depend on the image's token
    count: the stages keep what ``schedule(budget, 6, n)`` gives for this image's n, not for LLaVA-1.5's 576."""
    from conftest import build_tiny_qwen

    from svdprune_utils.hf.sparsevlm import schedule

    model = build_tiny_qwen(text_layers=6)
    x = qwen_inputs([(3, [(8, 12)], 4)])
    n = 24
    sched = schedule(12, 6, n)
    assert sched.counts != schedule(12, 6, 576).counts  # the check below can tell the two apart
    patch_model(model, "sparsevlm", budget=12)
    seen = []

    def length(module, args, kwargs):  # runs after the patch's own pre-hook: the sequence the layer processes
        seen.append((args[0] if args else kwargs["hidden_states"]).shape[1])

    hooks = [layer.register_forward_pre_hook(length, with_kwargs=True) for layer in model.model.language_model.layers]
    with torch.no_grad():
        model(**x)
    for h in hooks:
        h.remove()
    text = x["input_ids"].shape[1] - n
    stage = [max((j for j, c in enumerate(sched.cuts) if c <= i), default=None) for i in range(6)]
    want = [text + (n if s is None else sched.counts[s]) for s in stage]
    assert seen == want


def test_unpatching_something_that_is_not_a_model_says_so():
    with pytest.raises(TypeError, match="unpatch needs the patched model"):
        unpatch_model(None)
