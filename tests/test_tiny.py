"""The embedded tiny LLaVA: offline tokenizer/processor, fast paths equal to the HF path, a smoke run of
the training recipe, and training-time token dropping. (The shipped model: tests/test_tiny_shipped.py.)"""
import csv
import json

import numpy as np
import pytest
import torch

from svdprune_utils.testbed import shapes as S
from svdprune_utils.testbed import tiny as T


@pytest.fixture(scope="module")
def items():
    ds = S.ShapesVQA("test", n=6, seed=0)
    return [ds[i] for i in range(len(ds))]


@pytest.fixture(scope="module")
def small_model():
    return T.build_model(T.TinySizes(vision_hidden=32, text_hidden=32, vision_heads=2, text_heads=2), seed=0).eval()


def test_processor_matches_fast_encoding(items):
    proc = T.build_processor()
    inp = proc(images=[s["image"] for s in items], text=[T.prompt(s["question"]) for s in items],
               return_tensors="pt", padding=True)
    ids, mask = T.encode_ids([s["question"] for s in items])
    assert torch.equal(inp["input_ids"], ids) and torch.equal(inp["attention_mask"], mask)
    assert int((ids[0] == proc.tokenizer.convert_tokens_to_ids("<image>")).sum()) == 576
    assert torch.allclose(inp["pixel_values"], T.pixel_values([s["image"] for s in items]), atol=1e-6)
    assert proc.tokenizer.unk_token_id not in ids  # every question word is in the vocabulary


def test_fast_path_equals_hf_path(small_model, items):
    m = small_model
    proc = T.build_processor()
    inp = proc(images=[s["image"] for s in items], text=[T.prompt(s["question"]) for s in items],
               return_tensors="pt", padding=True)
    with torch.no_grad():
        hs = m.model.vision_tower(inp["pixel_values"], output_hidden_states=True).hidden_states
        assert torch.equal(T.vision_features(m, inp["pixel_values"]), hs[m.config.vision_feature_layer])
        ref = m(**inp).logits[:, -1]
        feats = m.model.multi_modal_projector(T.vision_features(m, inp["pixel_values"])[:, 1:])
        got = m(inputs_embeds=T.embed_inputs(m, inp["input_ids"], feats),
                attention_mask=inp["attention_mask"]).logits[:, -1]
    assert torch.allclose(ref, got, atol=1e-5)
    inv = {i: w for w, i in T.vocab().items()}
    assert T.answer(m, [s["image"] for s in items], [s["question"] for s in items]) == \
        [inv[int(i)] for i in ref.argmax(-1)]


def test_token_dropping_keeps_objects_and_full_sequence_positions(small_model):
    m = small_model
    enc = T._Encoded(S.ShapesVQA("train", n=2, seed=0, balanced=False), questions=2)
    pv, dense, present, qas, regions = T._collate([enc[i] for i in range(2)])
    assert [len(q) for q in qas] == [2, 2] and [r.shape for r in regions] == [(2, 576)] * 2
    image = torch.tensor([0, 0, 1, 1])
    ids, mask, labels = T._rows([qa for q in qas for qa in q])
    regions = torch.cat(regions)
    rows = dense[image]
    img_id = m.config.image_token_id
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    ids2, mask2, lab2, pos, kept = T._thin_image_tokens(ids, mask, labels, rows, img_id, 128, gen())
    assert kept.shape == (4, 128) and ((ids2 == img_id).sum(1) == 128).all()
    assert torch.equal(lab2[lab2 != -100], labels[labels != -100])  # every answer token survives
    for i in range(4):
        objects = set((rows[i, 1] < len(S.SHAPES) + 1).nonzero().flatten().tolist())
        assert objects <= set(kept[i].tolist())
        real = mask2[i].bool()
        first = int((ids[i] == img_id).nonzero()[0])  # where patch 0 sits in the full prompt
        assert torch.equal(pos[i][ids2[i] == img_id], first - int((~mask[i].bool()).sum()) + kept[i])
        assert torch.equal(pos[i][real][-1], (mask[i].sum() - 1))  # the last token keeps its full position
    with torch.no_grad():  # all 576 kept: the same loss as the plain forward (RoPE is relative)
        tower = T.vision_features(m, pv)[:, 1:][image]
        full = T._stage2_loss(m, tower, rows, ids, mask, labels, regions)
        assert torch.equal(full, T._stage2_loss(m, tower, rows, ids, mask, labels, regions, n_keep=576, generator=gen(),
                                                background_weight=True))
        ids3, mask3, lab3, pos3, kept3 = T._thin_image_tokens(ids, mask, labels, rows, img_id, 576, gen())
        feats = m.model.multi_modal_projector(tower)
        same = m(inputs_embeds=T.embed_inputs(m, ids3, feats), attention_mask=mask3, position_ids=pos3,
                 labels=lab3).loss
    assert torch.allclose(full, same, atol=1e-5)


def test_grounding_loss_rewards_attention_on_the_named_patches():
    v = T.vocab()
    ds = S.ShapesVQA("train", n=1, seed=0, qtypes=("color",))
    sample = ds[0]
    pv, dense, present, qas, regions = T._collate([T._Encoded(ds)[0]])
    ids, mask, labels = T._rows(qas[0])
    regions = regions[0]
    assert torch.equal(regions[0], torch.as_tensor(sample["mask"]).reshape(-1))
    L, kept = ids.shape[1], torch.arange(576)[None]
    img = (ids[0] == v["<image>"]).nonzero().squeeze(1)
    shape = sample["question"].split()[4]  # "what color is the {shape} ?": its one key word
    p = int((ids[0] == v[shape]).nonzero()[0])
    named = img[dense[0, 1] == S.SHAPES.index(shape)]
    region = img[regions[0]]

    def focused(cols):  # uniform attention except query p (head 0), which looks only at cols
        a = torch.full((1, 2, L, L), 1.0 / L)
        a[0, 0, p] = 0.0
        a[0, 0, p, cols] = 1.0 / len(cols)
        return a

    uniform = torch.full((1, 2, L, L), 1.0 / L)
    loss = lambda a: float(T._grounding_loss(a, ids, dense, regions, kept, v["<image>"]))  # noqa: E731
    # layer 0 is graded on the patches the word names, layer 1 on the question's answer region
    assert loss((focused(named), focused(region))) < 1e-3 < loss((focused(named), uniform)) < loss((uniform, uniform))
    expected = -(np.log(len(named) / L + 1e-4) + np.log(len(region) / L + 1e-4)) / 2
    assert loss((uniform, uniform)) == pytest.approx(expected, rel=1e-5)
    assert loss((uniform,)) == pytest.approx(-np.log(len(named) / L + 1e-4), rel=1e-5)  # one layer: layer 0 only


def test_grounding_loss_count_target_leaves_one_share_on_bos():
    """Count questions: layer 1's query at the plural is graded against n/(n+1) on the objects of that shape
    and 1/(n+1) on <s>; the exact minimum sits there, not at all attention on the objects."""
    v = T.vocab()
    ds = S.ShapesVQA("train", n=1, seed=0, qtypes=("count",))
    sample = ds[0]
    pv, dense, present, qas, regions = T._collate([T._Encoded(ds)[0]])
    ids, mask, labels = T._rows(qas[0][:1])
    region, n = regions[0][:1], int(sample["answer"])
    L, kept = ids.shape[1], torch.arange(576)[None]
    img = (ids[0] == v["<image>"]).nonzero().squeeze(1)[region[0]]
    p, bos = int((ids[0] == v[sample["question"].split()[2]]).nonzero()[0]), int((ids[0] == v["<s>"]).nonzero()[0])
    assert len(img) == n  # aligned objects: one patch each

    def layer1(on_objects, on_bos):
        a = torch.full((1, 2, L, L), 1.0 / L)
        a[0, 0, p] = (1.0 - on_objects - on_bos) / (L - n - 1)
        a[0, 0, p, img] = on_objects / n
        a[0, 0, p, bos] = on_bos
        return a

    none = torch.zeros(1, 2, L, L)  # layer 0: the plural is not graded there, and nothing else is a key word
    loss = lambda a: float(T._grounding_loss((none, a), ids, dense, region, kept, v["<image>"]))  # noqa: E731
    best = loss(layer1(n / (n + 1), 1 / (n + 1)))
    assert best == pytest.approx(-(n * np.log(n / (n + 1) + 1e-4) + np.log(1 / (n + 1) + 1e-4)) / (n + 1), rel=1e-5)
    assert best < loss(layer1(0.999, 0.0)) and best < loss(layer1(0.5 * n / (n + 1), 0.5))


def test_feature_pool_and_pool_batches(small_model):
    m = small_model
    pool = T.feature_pool(m, 5, questions=3, seed=7, batch_size=2, progress=False)
    ds = T._Encoded(S.ShapesVQA("train", n=5, seed=7, balanced=False), questions=3)
    assert pool["feats"].shape == (5, 576, 32) and pool["feats"].dtype == torch.float16
    pv, dense, _, qas, regions = T._collate([ds[i] for i in range(5)])
    with torch.no_grad():
        ref = T.vision_features(m, pv)[:, 1:]
    assert torch.allclose(pool["feats"].float(), ref, atol=2e-2 * float(ref.abs().max()))
    assert torch.equal(pool["dense"].long(), dense) and pool["qas"] == qas
    assert all(torch.equal(a, b) for a, b in zip(pool["regions"], regions))
    batches = [T._pool_batch(pool, np.random.default_rng(0), 4, True, "cpu") for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*batches))  # the generator alone decides
    feats, dense4, ids, mask, labels, reg = batches[0]
    scenes = [int((pool["feats"].float() == f.float()).all(-1).all(-1).nonzero()) for f in feats]
    assert len(set(scenes)) == 4  # distinct scenes, one question each, its region and labels alongside
    v, inv = T.vocab(), {i: w for w, i in T.vocab().items()}
    for r, i in enumerate(scenes):
        q = " ".join(inv[int(t)] for t in ids[r, mask[r].bool()][578:-3])
        k = [qq for qq, _ in pool["qas"][i]].index(q)
        assert inv[int(ids[r, -2])] == pool["qas"][i][k][1] and torch.equal(reg[r], pool["regions"][i][k])
        assert torch.equal(dense4[r], pool["dense"][i].long()) and (labels[r] != -100).sum() == 3  # key word + answer + </s>
    with pytest.raises(ValueError, match="distinct scenes"):
        T.train_tiny("/nonexistent", stage2_images=3, batch_size=4, progress=False)


def test_background_mask_stands_each_kept_background_token_for_the_dropped_ones():
    """16 object patches + 16 of 560 background patches kept: each kept background key gets log(35) added
    (softmax then equals that over the background repeated 35 times); causal and padding entries are masked."""
    v = T.vocab()
    dense = torch.zeros(2, 4, 576, dtype=torch.long)
    dense[:, 1] = len(S.SHAPES) + 1  # background
    objects = torch.arange(0, 576, 36)  # 16 covered patches
    dense[:, 1, objects] = 0
    ids, mask, labels = T._rows([("what digit is on the card ?", "3"), ("how many circles are there ?", "2")])
    ids2, mask2, lab2, pos, kept = T._thin_image_tokens(ids, mask, labels, dense, v["<image>"], 32,
                                                       torch.Generator().manual_seed(0))
    m4 = T._background_mask(ids2, mask2, dense, kept, v["<image>"])
    L, low = ids2.shape[1], torch.finfo(torch.float32).min
    assert m4.shape == (2, 1, L, L)
    for r in range(2):
        img = (ids2[r] == v["<image>"]).nonzero().squeeze(1)
        bg = img[~torch.isin(kept[r], objects)]
        assert len(bg) == 16
        last = m4[r, 0, -1]
        assert torch.allclose(last[bg], torch.full((16,), float(np.log(35.0))))
        rest = torch.ones(L, dtype=torch.bool)
        rest[bg] = False
        real = mask2[r].bool()
        assert (last[rest & real] == 0).all() and (last[~real] == low).all()  # pads (row 1 is left-padded)
        q = int(img[0])  # causal: a query sees no later key
        assert (m4[r, 0, q, q + 1:] == low).all()
        z = torch.randn(L)
        p = torch.softmax(z + last, 0)
        rep = torch.cat([z[rest & real]] + [z[bg]] * 35)
        p_rep = torch.softmax(rep, 0)
        assert torch.allclose(p[rest & real], p_rep[:int((rest & real).sum())], atol=1e-6)
        assert torch.allclose(p[bg] / 35, p_rep[int((rest & real).sum()):][:16], atol=1e-6)
    assert (~mask2[1].bool()).any()


def test_recipe_validation():  # (the lr schedules are transformers' get_*_schedule_with_warmup)
    with pytest.raises(ValueError, match="stage2_schedule"):
        T.train_tiny("/nonexistent", stage2_schedule="linear", progress=False)
    with pytest.raises(ValueError, match="background_weight_from"):
        T.train_tiny("/nonexistent", background_weight_from=1.5, progress=False)


def test_build_is_seeded_without_global_rng():
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    a = T.build_model(T.TinySizes(vision_hidden=32, text_hidden=32, vision_heads=2, text_heads=2), seed=1)
    assert torch.equal(torch.rand(1), before)
    b = T.build_model(T.TinySizes(vision_hidden=32, text_hidden=32, vision_heads=2, text_heads=2), seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_train_tiny_smoke(tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    sizes = T.TinySizes(vision_hidden=32, text_hidden=32, vision_heads=2, text_heads=2, vision_layers=2,
                        text_layers=1)
    kw = dict(sizes=sizes, stage1_samples=16, stage1_batch_size=8, stage2_images=6, stage2_questions=3,
              batch_size=4, eval_n=6, log_every=1, eval_every=2, progress=False)
    res = T.train_tiny(tmp_path, seed=0, device="cpu", stage2_steps=3, **kw)
    assert 0.0 <= res["overall"] <= 1.0
    with open(tmp_path / "train_log.csv") as f:
        log = list(csv.DictReader(f))
    assert [(r["stage"], r["step"], bool(r.get("val_overall"))) for r in log] == \
        [("1", "1", False), ("1", "2", False), ("1", "2", False), ("2", "1", False), ("2", "2", True), ("2", "3", True)]
    assert log[2]["patch_shape"] and log[-1]["samples"] == "12"
    assert json.loads((tmp_path / "recipe.json").read_text())["seed"] == 0
    first = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    ev = T.evaluate_tiny(tmp_path, n_test=12, budgets=(None, 16))  # writes eval.json next to the weights
    assert json.loads((tmp_path / "eval.json").read_text()) == json.loads(json.dumps(ev))
    assert set(ev) >= {"576", "random16", "slice200", "chance"} and 0.0 <= ev["slice200"]["overall"] <= 1.0
    assert AutoProcessor.from_pretrained(tmp_path).tokenizer("yes").input_ids[-1] == T.vocab()["yes"]
    # stage1_from: stage 2 only, on the earlier run's tower (and its stage-1 log rows)
    T.train_tiny(tmp_path / "again", seed=0, device="cpu", stage2_steps=1, stage1_from=tmp_path, **kw)
    again = LlavaForConditionalGeneration.from_pretrained(tmp_path / "again")
    tower = lambda m: m.model.vision_tower.state_dict()  # noqa: E731
    assert all(torch.equal(v, tower(again)[k]) for k, v in tower(first).items())
    rows = (tmp_path / "again" / "train_log.csv").read_text().splitlines()
    assert rows[1].startswith("1,") and rows[-1].startswith("2,")


def test_encode_turns(items):
    s = items[0]
    one = T.encode_turns([[(s["question"], s["answer"])]])
    ids, mask = T.encode_ids([s["question"]], [s["answer"]])
    assert torch.equal(one[0], ids) and torch.equal(one[1], mask)
    v = T.vocab()
    ids, mask, labels = T.encode_turns([[("what digit is on the card ?", "3"), ("is there a red circle ?", "no")],
                                        [("what digit is on the card ?", "1")]])
    assert int((ids[0] == v["<image>"]).sum()) == 576 and int((ids[0] == v["USER:"]).sum()) == 2
    assert labels[0][labels[0] != -100].tolist() == [v["3"], v["</s>"], v["no"], v["</s>"]]
    assert labels[1][labels[1] != -100].tolist() == [v["1"], v["</s>"]]
    assert mask[1].sum() < mask[0].sum() and mask[1, 0] == 0  # left padding
    with pytest.raises(ValueError, match="at least one"):
        T.encode_turns([[]])


def test_key_word_labels():
    """The answer is also the target of the question's last key word (the label sits one token later:
    position t predicts label t + 1); ids, the answer's own labels and the input are left unchanged."""
    v = T.vocab()
    inv = {i: w for w, i in v.items()}
    ids, mask, labels = T.encode_turns([[("what color is the circle ?", "red")], [("how many crosses are there ?", "2")],
                                        [("what digit is on the card ?", "3")], [("where is the red square ?", "top-left")]],
                                       n_image=2)
    before = labels.clone()
    out = T._key_word_labels(ids, labels)
    assert torch.equal(labels, before)
    pairs = [[(inv[int(ids[r, t])], inv[int(out[r, t + 1])]) for t in range(ids.shape[1] - 1) if out[r, t + 1] >= 0]
             for r in range(len(ids))]
    assert pairs == [[("circle", "red"), ("ASSISTANT:", "red"), ("red", "</s>")],
                     [("crosses", "2"), ("ASSISTANT:", "2"), ("2", "</s>")],
                     [("card", "3"), ("ASSISTANT:", "3"), ("3", "</s>")],
                     [("square", "top-left"), ("ASSISTANT:", "top-left"), ("top-left", "</s>")]]
