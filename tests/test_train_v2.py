"""Recipe v2 of the tiny LLaVA: rows stand for prompts pruned by the patch (compact positions), the budget
emulation's arithmetic, balanced rows, the dense targets, and resuming an interrupted run bit-identically."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from svdprune_utils.testbed import shapes as S
from svdprune_utils.testbed import tiny as T
from svdprune_utils.testbed import train_v2 as V

V_ = T.vocab()
IMG, PAD = V_["<image>"], V_["<pad>"]


def _row(q="what color is the circle ?", a="red"):
    ids, mask, labels = T._rows([(q, a)], key_words=True)
    return ids[0], mask[0], labels[0]


def test_a_row_at_a_small_budget_is_the_prompt_with_that_many_placeholders():
    ids, mask, labels = _row()
    kept = np.array([3, 50, 51, 200, 575])
    covered = np.zeros(576, bool)
    r_ids, r_pos, r_lab, bias, index = V.row_inputs(ids, mask, labels, kept, kept, covered, IMG, PAD, weight=True)
    ref_ids, _ = T.encode_ids(["what color is the circle ?"], ["red"], n_image=5)
    assert torch.equal(r_ids, ref_ids[0]) and torch.equal(r_pos, torch.arange(len(r_ids)))
    assert torch.equal(bias, torch.zeros(len(r_ids))) and torch.equal(index, torch.as_tensor(kept))
    lab = torch.full_like(r_ids, -100)
    ans = (r_ids == V_["red"]).nonzero()[0, 0]
    assert r_lab[ans] == V_["red"] and r_lab[ans + 1] == V_["</s>"]  # the answer (and </s>) labelled
    key = (r_ids == V_["circle"]).nonzero()[0, 0]
    assert r_lab[key + 1] == V_["red"]  # key-word label: the answer also predicted after the last key word
    assert int((r_lab != -100).sum()) == 3 and lab.shape == r_lab.shape


def test_a_row_standing_for_a_larger_budget_has_its_positions_and_background_weights():
    ids, mask, labels = _row()
    B = 100
    rng = np.random.default_rng(0)
    covered = np.zeros(576, bool)
    covered[[10, 11, 300]] = True
    region = np.zeros(576, bool)
    region[300] = True
    kept, present = V.row_subsets(rng, region, covered, B, 32)
    assert len(kept) == B and len(present) == 32 and set(present) <= set(kept) and {10, 11, 300} <= set(present)
    r_ids, r_pos, _, bias, index = V.row_inputs(ids, mask, labels, kept, present, covered, IMG, PAD, weight=True)
    p0 = int((ids == IMG).nonzero()[0])  # the first placeholder's position (no padding in a single row)
    img = r_ids == IMG
    rank = np.searchsorted(kept, present)
    assert torch.equal(r_pos[img], torch.as_tensor(p0 + rank))  # each present token at its place among the B
    n_text_after = int(len(ids) - p0 - 576)
    assert torch.equal(r_pos[-n_text_after:], torch.arange(p0 + B, p0 + B + n_text_after))
    assert torch.equal(r_pos[:p0], torch.arange(p0))
    w = math.log((B - 3) / (32 - 3))  # background tokens at B / present
    expect = torch.as_tensor(np.where(covered[present], 0.0, w), dtype=torch.float32)
    assert torch.allclose(bias[img], expect) and torch.all(bias[~img] == 0)
    _, _, _, bias0, _ = V.row_inputs(ids, mask, labels, kept, present, covered, IMG, PAD, weight=False)
    assert torch.all(bias0 == 0)
    assert torch.equal(index, torch.as_tensor(present))


def test_row_subsets_keep_the_region_and_draw_at_random():
    region = np.zeros(576, bool)
    region[[5, 6, 7]] = True
    covered = region.copy()
    covered[[100, 101]] = True
    for b in (3, 16, 31, 32, 64, 575, 576):
        kept, present = V.row_subsets(np.random.default_rng(b), region, covered, b, 32)
        assert len(kept) == b and len(present) == min(b, 32) and {5, 6, 7} <= set(present)
        if b >= 32:
            assert {100, 101} <= set(present)
    big = np.ones(576, bool)  # a region larger than the present tokens (background): random tokens of it
    kept, present = V.row_subsets(np.random.default_rng(0), big, covered, 16, 32)
    assert len(present) == 16
    firsts = [V.row_subsets(np.random.default_rng(i), region, covered, 8, 32)[1] for i in range(200)]
    others = np.concatenate([f[~np.isin(f, [5, 6, 7])] for f in firsts])
    assert len(np.unique(others)) > 300  # the fill is spread over the image, not a fixed choice


def test_budgets_follow_the_recipe():
    r = V.RecipeV2(full_fraction=0.25)
    rng = np.random.default_rng(0)
    b = np.array([V.draw_budget(rng, r) for _ in range(4000)])
    assert b.min() >= 16 and b.max() == 576
    assert abs((b == 576).mean() - 0.25) < 0.03
    part = b[b < 576]
    assert abs(np.mean(np.log(part)) - (np.log(16) + np.log(576)) / 2) < 0.05  # log-uniform


def test_batch_inputs_mask_is_causal_padded_and_biased():
    rows = [(torch.tensor([1, 4, 4, 7]), torch.tensor([0, 1, 5, 9]), torch.full((4,), -100),
             torch.tensor([0.0, 0.0, 0.7, 0.0]), torch.tensor([0, 1])),
            (torch.tensor([1, 7]), torch.tensor([0, 1]), torch.full((2,), -100), torch.zeros(2), torch.tensor([]))]
    ids, pos, lab, m, valid = V.batch_inputs(rows, PAD)
    assert ids[1].tolist() == [PAD, PAD, 1, 7] and valid[1].tolist() == [False, False, True, True]
    neg = torch.finfo(torch.float32).min
    assert m[0, 0, 3, 2] == pytest.approx(0.7) and m[0, 0, 1, 2] == neg  # bias on the key; causal
    assert m[1, 0, 3, 0] == neg and m[1, 0, 3, 2] == 0.0  # padding masked


def test_qtype_of_and_balanced_rows():
    ds = S.ShapesVQA("train", n=40, seed=3, qtypes=S.ALL_QTYPES)
    for i in range(40):
        assert V.qtype_of(ds[i]["question"]) == ds[i]["qtype"]
    with pytest.raises(ValueError, match="not a ShapesVQA question"):
        V.qtype_of("what is this ?")


def test_dense_targets_of_the_new_types():
    ds = S.ShapesVQA("test", n=8, seed=5, qtypes=S.NEW_QTYPES)
    s = ds[1]  # big
    d = V.dense_targets(s)
    assert d.shape == (7, 576)
    assert np.array_equal(d[4].reshape(24, 24) == 1, s["mask"])  # the big flag = the big object's 4 patches
    obj = d[1] < len(S.SHAPES)
    assert np.all(d[5][obj] >= 0) and np.all(d[5][~obj] == -100)
    grey = np.asarray(s["image"], dtype=float).mean(-1)[:14, :14].mean()
    assert d[6][0] == round(grey / 255 * 1000)


def test_training_resumes_bit_identically(tmp_path):
    r = V.RecipeV2(stage1_init="scratch", stage1_samples=32, stage1_batch_size=16, stage2_images=12,
                   stage2_questions=3, stage2_steps=4, batch_size=4, eval_n=10, eval_every=2, log_every=1,
                   checkpoint_every=1, finetune=(dict(stage2_steps=3, stage2_images=8, stage2_lr=1e-4,
                                                      qtype_weight={"twins": 3.0}),
                                                 dict(stage2_steps=2, full_fraction=1.0, eval_every=1)))
    V.train_v2(tmp_path / "a", seed=0, recipe=r, progress=False)
    calls = 0
    while True:  # stopped at every checkpoint, resumed from it
        out = V.train_v2(tmp_path / "b", seed=0, recipe=r, progress=False, time_budget=0)
        calls += 1
        if "stopped" not in out:
            break
    assert calls >= 4 + 3 + 2
    stages = [int(line.split(",")[0]) for line in (tmp_path / "a" / "train_log.csv").read_text().splitlines()[1:]]
    assert sorted(set(stages)) == [1, 2, 3, 4] and stages == sorted(stages)
    from safetensors.torch import load_file
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "train_log.csv").read_text().count("\n") == \
        (tmp_path / "b" / "train_log.csv").read_text().count("\n")
    assert not (tmp_path / "b" / "train_state.pt").exists()
    with pytest.raises(ValueError, match="another recipe or seed"):
        V.train_v2(tmp_path / "c", seed=0, recipe=r, progress=False, time_budget=0)
        V.train_v2(tmp_path / "c", seed=1, recipe=r, progress=False)


def test_stage1_starts_from_the_v1_tower(tmp_path):
    from safetensors.torch import load_file
    r = V.RecipeV2(finetune=(), stage1_samples=16, stage1_batch_size=16, stage2_images=8, stage2_questions=2,
                   stage2_steps=1, batch_size=4, eval_n=10, eval_every=1, log_every=1)
    V.train_v2(tmp_path / "m", seed=0, recipe=r, progress=False, stage1_from=T.V1_PATH)
    new, v1 = load_file(tmp_path / "m" / "model.safetensors"), load_file(T.V1_PATH / "model.safetensors")
    tower = [k for k in v1 if "vision_tower" in k]
    assert tower and all(new[k].shape == v1[k].shape for k in tower)
    # one warmup step of lr 1e-5 away from the v1 tower (a fresh init differs by O(0.1))
    assert max(float((new[k] - v1[k]).abs().max()) for k in tower) < 1e-3
    with pytest.raises(ValueError, match="stage1_init must be"):
        V.train_v2(tmp_path / "x", recipe=V.RecipeV2(stage1_init="clip"), progress=False)


def test_a_left_padded_prompt_gives_the_same_row_as_unpadded():
    ids, mask, labels = T._rows([("what color is the circle ?", "red"), ("is the red circle left of the blue "
                                                                          "square ?", "no")], key_words=True)
    assert mask[0, 0] == 0  # the shorter question is left-padded
    solo = _row()
    kept = np.arange(0, 576, 40)
    covered = np.zeros(576, bool)
    a = V.row_inputs(ids[0], mask[0], labels[0], kept, kept, covered, IMG, PAD, weight=False)
    b = V.row_inputs(*solo, kept, kept, covered, IMG, PAD, weight=False)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_without_stage1_from_the_v1_stage_1_runs_first(tmp_path, monkeypatch):
    from safetensors.torch import load_file
    calls = []

    def fake_train_tiny(out_dir, **kw):  # stands in for the 10k-scene v1 stage 1: a tower of its own seed
        calls.append((out_dir, kw))
        T.build_model(seed=123).save_pretrained(out_dir)

    monkeypatch.setattr(T, "train_tiny", fake_train_tiny)
    r = V.RecipeV2(finetune=(), stage1_samples=16, stage1_batch_size=16, stage2_images=8, stage2_questions=2,
                   stage2_steps=1, batch_size=4, eval_n=10, eval_every=1, log_every=1)
    V.train_v2(tmp_path / "m", seed=0, recipe=r, progress=False)
    assert len(calls) == 1 and calls[0][0] == tmp_path / "m" / "v1_stage1"
    assert calls[0][1]["stage2_steps"] == 0 and calls[0][1]["seed"] == 0
    new, src = load_file(tmp_path / "m" / "model.safetensors"), load_file(tmp_path / "m" / "v1_stage1" /
                                                                          "model.safetensors")
    tower = [k for k in src if "vision_tower" in k]
    assert max(float((new[k] - src[k]).abs().max()) for k in tower) < 1e-3


def test_early_image_attention_is_the_image_share_of_text_after_the_image():
    # one row: <s> img img q1 q2 ; layer 0 attention rows hand-made (1 head)
    ids = torch.tensor([[V_["<s>"], IMG, IMG, V_["what"], V_["?"]]])
    img = ids == IMG
    a = torch.zeros(1, 1, 5, 5)
    a[0, 0, 3] = torch.tensor([0.2, 0.3, 0.1, 0.4, 0.0])  # q1: 0.4 on the image
    a[0, 0, 4] = torch.tensor([0.1, 0.6, 0.2, 0.05, 0.05])  # q2: 0.8 on the image
    a[0, 0, 0, 0] = a[0, 0, 1, :2].fill_(0.5)[0] * 2  # rows of <s> and the image tokens do not count
    b = torch.zeros(1, 1, 5, 5)
    b[0, 0, 3:, 1] = 1.0  # layer 1: all on the image
    assert float(V.early_image_attention([a, b, b], ids, img, 1)) == pytest.approx((0.4 + 0.8) / 2)
    assert float(V.early_image_attention([a, b, b], ids, img, 2)) == pytest.approx(((0.4 + 0.8) / 2 + 1.0) / 2)


def test_init_from_fine_tunes_every_weight_of_a_v2_model(tmp_path):
    from safetensors.torch import load_file
    src = T.DEFAULT_PATH
    r = V.RecipeV2(finetune=(), stage2_images=8, stage2_questions=2, stage2_steps=2, batch_size=4, eval_n=10,
                   eval_every=2, log_every=1, early_image_attention=1.0)
    V.train_v2(tmp_path / "f", seed=0, recipe=r, progress=False, init_from=src)
    new, old = load_file(tmp_path / "f" / "model.safetensors"), load_file(src / "model.safetensors")
    assert new.keys() == old.keys()
    assert max(float((new[k] - old[k]).abs().max()) for k in old) < 1e-3  # two warmup steps away (lr 0, then 1e-5)
    assert not all(torch.equal(new[k], old[k]) for k in old if "language_model" in k)


def test_a_fine_tuning_phase_equals_a_separate_run_from_the_previous_weights(tmp_path):
    # the shipped model's phases were run as separate init_from calls (data/README.md): the one command must give
    # the same weights
    from dataclasses import replace

    from safetensors.torch import load_file
    src = T.DEFAULT_PATH
    phase = dict(stage2_steps=3, stage2_images=8, stage2_lr=1e-4, warmup_steps=1, full_fraction=0.5,
                 qtype_weight={"twins": 3.0, "count": 2.0}, early_image_attention=1.0, eval_every=3)
    r = V.RecipeV2(stage2_images=8, stage2_questions=2, stage2_steps=2, batch_size=4, eval_n=10, eval_every=2,
                   log_every=1, finetune=(phase,))
    V.train_v2(tmp_path / "one", seed=0, recipe=r, progress=False, init_from=src)
    V.train_v2(tmp_path / "s2", seed=0, recipe=replace(r, finetune=()), progress=False, init_from=src)
    V.train_v2(tmp_path / "s3", seed=0, recipe=replace(r, finetune=(), **phase), progress=False,
               init_from=tmp_path / "s2")
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "s3" / "model.safetensors")
    c = load_file(tmp_path / "s2" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the phase trained


def test_phases_and_type_weights_are_checked():
    r = V.RecipeV2(finetune=(dict(stage2_steps=5), dict(stage1_lr=1.0)))
    with pytest.raises(ValueError, match=r"finetune phase 2: \['stage1_lr'\] are not stage-2 fields"):
        V.phase_recipes(r)
    for w in ({"colour": 1.0}, {"twins": -1.0}, {q: 0.0 for q in S.ALL_QTYPES}, {"twins": float("nan")}):
        with pytest.raises(ValueError, match="qtype_weight"):
            V.phase_recipes(V.RecipeV2(finetune=(dict(qtype_weight=w),)))
    ph = V.phase_recipes(V.RecipeV2())
    assert len(ph) == 1 + len(V.FINETUNE) and ph[1].stage2_steps == 3000 and ph[2].qtype_weight["twins"] == 3.0
    a, b = V.RecipeV2(), V.RecipeV2()
    a.finetune[1]["qtype_weight"]["twins"] = 9.0  # each recipe owns its phases
    assert b.finetune[1]["qtype_weight"]["twins"] == 3.0 == V.FINETUNE[1]["qtype_weight"]["twins"]


def test_type_weights_set_the_share_of_rows():
    from collections import Counter

    qas = [[(S.TEMPLATES["twins"].format(color="red", plural="circles"), "2")],
           [(S.TEMPLATES["color"].format(shape="circle"), "red")],
           [(S.TEMPLATES["digit"], "3")]]
    index = V.balanced_index(qas)
    pool = dict(qas=qas, regions=[torch.zeros(1, 576, dtype=torch.bool)] * 3,
                dense=torch.zeros(3, V.N_DENSE, 576, dtype=torch.int16), feats=torch.zeros(3, 576, 64))
    r = V.RecipeV2(batch_size=600, qtype_weight={"twins": 4.0, "digit": 0.0})
    b = V.stage2_batch(pool, index, np.random.default_rng(0), r, weight=False)
    n = Counter(b["answers"])
    assert n["3"] == 0 and abs(n["2"] / 600 - 0.8) < 0.05 and abs(n["red"] / 600 - 0.2) < 0.05
