"""VisPruner, CDPruner and VisionZip through patch_llava: the patch computes each method's signals itself, and
what it keeps (or merges) equals the core selector / reducer run on signals computed here independently —
transformers' own eager attention weights and hidden states, keys by ``k_proj`` on the layer's input, the
instruction embedding by hand. The generic patch tests (full budget, K tokens per image, batch = rows alone,
cache = no cache, cache continuation) run these methods too (tests/test_llava.py, tests/test_llava_contract.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import BOS_ID, IMAGE_TOKEN_ID, PAD_ID, build_llava_inputs, build_siglip_llava, build_tiny_llava
from conftest import second_turn

from svdprune_utils.core.reduction import reduce_visionzip
from svdprune_utils.core.selection import select_tokens
from svdprune_utils.hf.patch import patch_llava

N = 576
TWO = [(3, 1, 4), (9, 1, 2)]  # two left-padded prompts of different lengths, one image each


def _tower_reference(x):
    """From an eager twin (same seed, same weights): the CLS→patch attention (B, heads, N) of the layer whose
    output is hidden_states[-2] (``attentions[-2]``, as the official code indexes it), the layer −2 patch
    features (B, N, d), and that layer's keys averaged over heads (B, N, hd) computed directly:
    ``k_proj(layer_norm1(layer input))`` split into heads."""
    tower = build_tiny_llava(attn="eager").model.vision_tower
    with torch.no_grad():
        out = tower(x["pixel_values"], output_attentions=True, output_hidden_states=True)
        layer = tower.encoder.layers[-2]
        k = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[-3]))  # (B, T, heads * hd)
        keys = k.view(*k.shape[:2], layer.self_attn.num_heads, -1).mean(2)
    return out.attentions[-2][:, :, 0, 1:], out.hidden_states[-2][:, 1:], keys[:, 1:]


def _projected(model, x):
    with torch.no_grad():
        return torch.stack(model.model.get_image_features(pixel_values=x["pixel_values"]).pooler_output)


def _llm_image_inputs(model, x):
    """One forward; the LLM's input embeddings at each row's image placeholders, in sequence order."""
    seen, lm_in = [], []
    h1 = model.get_input_embeddings().register_forward_hook(lambda m, a, o: seen.append(a[0]))
    h2 = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: lm_in.append(k["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**x)
    finally:
        h1.remove(), h2.remove()
    ids, emb = seen[0], lm_in[0]
    return [emb[b][ids[b] == IMAGE_TOKEN_ID] for b in range(ids.shape[0])]


def _row(x, b, first_image):
    keep = x["attention_mask"][b].bool()
    n_img = int((x["input_ids"][b] == IMAGE_TOKEN_ID).sum()) // N
    return {"input_ids": x["input_ids"][b][keep][None], "attention_mask": x["attention_mask"][b][keep][None],
            "pixel_values": x["pixel_values"][first_image:first_image + n_img]}


# ------------------------------------------------------------------------------------------- VisPruner
def test_vispruner_equals_the_selector_on_eager_cls_attention(tiny_llava):
    x = build_llava_inputs(TWO)
    cls, feats, _ = _tower_reference(x)
    proj = _projected(tiny_llava, x)
    patch_llava(tiny_llava, method="vispruner", budget=24)
    seen = _llm_image_inputs(tiny_llava, x)
    expected = select_tokens(feats, 24, method="vispruner", attention=cls.mean(1))  # VisPruner: mean over heads
    assert torch.equal(tiny_llava.svdprune.kept_indices, expected)
    for b in range(2):
        assert torch.equal(seen[b], proj[b][expected[b]])
    # the diversity half is at work (not plain CLS top-K), and important_ratio reaches the selector
    assert not torch.equal(expected, select_tokens(feats, 24, method="cls_attention", attention=cls.mean(1)))
    tiny_llava.svdprune.selector_kwargs = {"important_ratio": 0.75}
    _llm_image_inputs(tiny_llava, x)
    at_75 = select_tokens(feats, 24, method="vispruner", attention=cls.mean(1), important_ratio=0.75)
    assert torch.equal(tiny_llava.svdprune.kept_indices, at_75) and not torch.equal(at_75, expected)


# ------------------------------------------------------------------------------------------- VisionZip
def _placed(reduction, b, project):
    """Independent of ``Reduction.in_raster_order``: output token -> (its position, its LLM feature), then
    sorted by position (the order of the kept placeholders)."""
    slot = dict(zip(reduction.kept[b].tolist(), project(reduction.features[b])))
    order = sorted(slot)
    return order, torch.stack([slot[p] for p in order])


def test_visionzip_merges_as_the_reducer_does_on_eager_signals(tiny_llava):
    x = build_llava_inputs(TWO)
    cls, feats, keys = _tower_reference(x)
    proj = _projected(tiny_llava, x)
    K = 24  # 20 dominant + 4 contextual (round(24 * 54 / 64))
    red = reduce_visionzip(feats, K, attention=cls.sum(1), keys=keys)  # VisionZip: heads summed, keys head-mean
    patch_llava(tiny_llava, method="visionzip", budget=K)
    seen = _llm_image_inputs(tiny_llava, x)
    projector = tiny_llava.model.multi_modal_projector
    for b in range(2):
        with torch.no_grad():
            order, want = _placed(red, b, projector)
        assert tiny_llava.svdprune.kept_indices[b].tolist() == order
        torch.testing.assert_close(seen[b], want, atol=1e-5, rtol=1e-5)
        dominant = set(red.kept[b, :20].tolist())
        for j, p in enumerate(order):  # dominant tokens are the unmerged patches; contextual ones are merges
            same = torch.allclose(seen[b][j], proj[b][p], atol=1e-5, rtol=1e-5)
            assert same == (p in dominant), (b, j, p)


def test_visionzip_knobs_feature_and_dominant(tiny_llava):
    x = build_llava_inputs(TWO)
    cls, _, keys = _tower_reference(x)
    proj = _projected(tiny_llava, x)
    patch_llava(tiny_llava, method="visionzip", budget=24, feature="projected")  # merged in the LLM's space
    seen = _llm_image_inputs(tiny_llava, x)
    red = reduce_visionzip(proj, 24, attention=cls.sum(1), keys=keys)
    for b in range(2):
        order, want = _placed(red, b, lambda f: f)
        assert tiny_llava.svdprune.kept_indices[b].tolist() == order
        torch.testing.assert_close(seen[b], want, atol=1e-5, rtol=1e-5)
    patch_llava(tiny_llava, method="visionzip", budget=24, dominant=24)  # no contextual token: CLS top-K
    _llm_image_inputs(tiny_llava, x)
    assert torch.equal(tiny_llava.svdprune.kept_indices,
                       select_tokens(proj, 24, method="cls_attention", attention=cls.mean(1)))


# -------------------------------------------------------------------------------------------- CDPruner
def _text_mean(model, x, b):
    """The mean LLM input embedding of row b's text: real tokens that are neither placeholders nor BOS/pad."""
    ids = x["input_ids"][b][x["attention_mask"][b].bool()]
    ids = ids[(ids != IMAGE_TOKEN_ID) & (ids != BOS_ID) & (ids != PAD_ID)]
    with torch.no_grad():
        return model.get_input_embeddings()(ids).double().mean(0)


def test_cdpruner_relevance_is_each_rows_own_text(tiny_llava):
    x = build_llava_inputs([(3, 2, 4), (9, 1, 2)])  # row 0's two images share row 0's text
    x["input_ids"] = x["input_ids"].masked_fill(x["attention_mask"] == 0, 50)  # padding by an id not declared as pad
    proj = _projected(tiny_llava, x)
    text = torch.stack([_text_mean(tiny_llava, x, b) for b in (0, 0, 1)])
    raw = F.cosine_similarity(proj.double(), text[:, None, :], dim=-1)  # (3, N)
    expected = select_tokens(proj, 24, method="cdpruner", relevance=raw)
    patch_llava(tiny_llava, method="cdpruner", budget=24)
    with torch.no_grad():
        tiny_llava(**x)
    assert torch.equal(tiny_llava.svdprune.kept_indices, expected)
    swapped = F.cosine_similarity(proj.double(), text[[2, 2, 0]][:, None, :], dim=-1)  # the other row's text
    assert not torch.equal(select_tokens(proj, 24, method="cdpruner", relevance=swapped), expected)
    for b, first in ((0, 0), (1, 2)):  # each row alone selects the same tokens
        with torch.no_grad():
            tiny_llava(**_row(x, b, first))
        assert torch.equal(tiny_llava.svdprune.kept_indices, expected[first:first + (2 if b == 0 else 1)])
    emb = tiny_llava.get_input_embeddings()(x["input_ids"]).detach()  # inputs_embeds: same text, same choice
    with torch.no_grad():
        tiny_llava(inputs_embeds=emb, attention_mask=x["attention_mask"], pixel_values=x["pixel_values"])
    assert torch.equal(tiny_llava.svdprune.kept_indices, expected)


def test_cdpruner_takes_the_official_signals_when_given(tiny_llava):
    x = build_llava_inputs(TWO)
    proj = _projected(tiny_llava, x)
    g = torch.Generator().manual_seed(3)
    rel = torch.rand(2, N, generator=g)
    patch_llava(tiny_llava, method="cdpruner", budget=24, relevance=rel)
    with torch.no_grad():
        tiny_llava(**x)
    assert torch.equal(tiny_llava.svdprune.kept_indices, select_tokens(proj, 24, method="cdpruner", relevance=rel))
    ie, te = torch.randn(2, N, 8, generator=g), torch.randn(3, 8, generator=g)
    tiny_llava.svdprune.selector_kwargs = {"image_embeds": ie, "text_embeds": te}
    with torch.no_grad():
        tiny_llava(**x)
    expected = select_tokens(proj, 24, method="cdpruner", image_embeds=ie, text_embeds=te)
    assert torch.equal(tiny_llava.svdprune.kept_indices, expected)


def test_cdpruner_continuation_keeps_the_prompts_selection(tiny_llava):
    """A second turn continuing the cache does not re-select with the new text: it equals a fresh run of the whole
    conversation that replays the first turn's kept tokens."""
    x = build_llava_inputs(TWO)
    patch_llava(tiny_llava, method="cdpruner", budget=16)
    with torch.no_grad():
        first = tiny_llava.generate(**x, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    stored = tiny_llava.svdprune.kept_indices.clone()
    conv, mask = second_turn(x, first.sequences)
    with torch.no_grad():
        cont = tiny_llava.generate(conv, attention_mask=mask, cache=first.past_key_values, max_new_tokens=4,
                                   do_sample=False)
        patch_llava(tiny_llava, method="random", kept=stored)
        fresh = tiny_llava.generate(conv, attention_mask=mask, pixel_values=x["pixel_values"], max_new_tokens=4,
                                    do_sample=False)
    assert torch.equal(cont, fresh)


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("method", ["vispruner", "visionzip"])
def test_a_tower_without_cls_is_refused(method):
    model = build_siglip_llava("full")
    x = build_llava_inputs(TWO, n_patches=576)
    patch_llava(model, method=method, budget=16)
    with pytest.raises(ValueError, match=f"{method} needs a vision tower with a CLS token"), torch.no_grad():
        model(**x)
    model.svdprune.method = "cdpruner"  # needs no CLS
    with torch.no_grad():
        model(**x)
    assert model.svdprune.kept_indices.shape == (2, 16)


def test_missing_or_misplaced_signals_are_clear_errors(tiny_llava):
    x = build_llava_inputs(TWO)
    with torch.no_grad():
        images = tiny_llava.model.get_image_features(pixel_values=x["pixel_values"], return_dict=True)
    pre = {"input_ids": x["input_ids"], "attention_mask": x["attention_mask"], "mm_encoder_outputs": {"image": images}}
    for method in ("vispruner", "visionzip"):
        patch_llava(tiny_llava, method=method, budget=16)
        with pytest.raises(ValueError, match="CLS attention.*pass pixel_values"), torch.no_grad():
            tiny_llava(**pre)
    for name in ("attention", "keys"):
        with pytest.raises(ValueError, match=f"`{name}` is computed by the patch"):
            patch_llava(tiny_llava, method="visionzip", budget=16, **{name: torch.ones(2, N)})
    with pytest.raises(ValueError, match="visionzip merges tokens"):
        patch_llava(tiny_llava, method="visionzip", kept=torch.arange(16).expand(2, -1))
    patch_llava(tiny_llava, method="cdpruner", budget=16, text_embeds=torch.ones(1, 8))  # half the official pair
    with pytest.raises(ValueError, match="image_embeds"), torch.no_grad():
        tiny_llava(**x)
    patch_llava(tiny_llava, method="cdpruner", budget=16)
    no_text = dict(x, input_ids=torch.where(x["input_ids"] == IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, BOS_ID))
    with pytest.raises(ValueError, match="row 0 has no text tokens"), torch.no_grad():
        tiny_llava(**no_text)
