"""ShapesVQA: determinism, answer-region masks, answer balance, chance table."""
import numpy as np
import pytest

from svdprune_utils.testbed import shapes as S


@pytest.fixture(scope="module")
def test_slice():
    ds = S.ShapesVQA("test", n=48, seed=0)
    return [ds[i] for i in range(len(ds))]


def test_same_seed_same_samples(test_slice):
    ds = S.ShapesVQA("test", n=48, seed=0)
    for i in (0, 7, 31, 47):  # random access, any order
        a, b = test_slice[i], ds[i]
        assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
        assert (a["question"], a["answer"], a["qtype"]) == (b["question"], b["answer"], b["qtype"])
        assert np.array_equal(a["mask"], b["mask"])


def test_seeds_and_splits_differ():
    imgs = [np.asarray(S.ShapesVQA(sp, n=1, seed=sd)[0]["image"]) for sp, sd in
            [("test", 0), ("test", 1), ("val", 0), ("train", 0)]]
    for i in range(len(imgs)):
        for j in range(i + 1, len(imgs)):
            assert not np.array_equal(imgs[i], imgs[j])


def test_no_global_rng_use():
    np.random.seed(123)
    before = np.random.random()
    np.random.seed(123)
    S.ShapesVQA("train", n=5, seed=3)[4]
    assert np.random.random() == before


def test_sample_format(test_slice):
    for s in test_slice:
        assert s["image"].size == (336, 336) and s["image"].mode == "RGB"
        assert s["mask"].shape == (24, 24) and s["mask"].dtype == bool
        assert s["answer"] in S.ANSWERS[s["qtype"]]
        assert len(s["answer"].split()) == 1
        assert set(s["question"].split()) <= set(S.question_vocab())
    # balanced=True cycles the types
    assert [s["qtype"] for s in test_slice[:6]] == list(S.QTYPES)


def test_mask_covers_answer_object_patches(test_slice):
    for s in test_slice:
        idmap = s["idmap"]
        if s["qtype"] == "exist" and s["answer"] == "no":
            region = [k for k, o in enumerate(s["objects"]) if o["kind"] == "object"]
        else:
            region = [k for k, o in enumerate(s["objects"]) if o["target"]]
        assert region
        touched = np.isin(idmap, region).reshape(24, 14, 24, 14).any(axis=(1, 3))
        assert np.array_equal(s["mask"], touched)
        # the answer object's pixels really are drawn in its colour (not hidden by another object)
        for k in region:
            assert (idmap == k).sum() > 30


def test_answers_consistent_with_scene(test_slice):
    for s in test_slice:
        objs = [o for o in s["objects"] if o["kind"] == "object"]
        words = s["question"].split()
        if s["qtype"] == "color":
            match = [o for o in objs if o["shape"] == words[4]]
            assert len(match) == 1 and match[0]["color"] == s["answer"]
        elif s["qtype"] == "shape":
            match = [o for o in objs if o["color"] == words[4]]
            assert len(match) == 1 and match[0]["shape"] == s["answer"]
        elif s["qtype"] == "exist":
            found = any(o["color"] == words[3] and o["shape"] == words[4] for o in objs)
            assert s["answer"] == ("yes" if found else "no")
        elif s["qtype"] == "count":
            shape = {v: k for k, v in S.PLURALS.items()}[words[2]]
            assert str(sum(o["shape"] == shape for o in objs)) == s["answer"]
        elif s["qtype"] == "quadrant":
            ys, xs = np.nonzero(s["mask"])
            v = "top" if ys.max() < 12 else "bottom" if ys.min() >= 12 else None
            h = "left" if xs.max() < 12 else "right" if xs.min() >= 12 else None
            assert f"{v}-{h}" == s["answer"]
        elif s["qtype"] == "digit":
            (card,) = [o for o in s["objects"] if o["kind"] == "card"]
            assert card["digit"] == s["answer"]


def test_small_objects_and_whole_image_positions():
    ds = S.ShapesVQA("val", n=60, seed=5)
    sizes, centres = [], []
    for i in range(len(ds)):
        for o in ds[i]["objects"]:
            x0, y0, x1, y1 = o["box"]
            sizes.append(x1 - x0)
            centres.append(((x0 + x1) / 2, (y0 + y1) / 2))
    centres = np.array(centres)
    assert min(sizes) <= 15  # down to about one patch
    assert centres.min() < 40 and centres.max() > 296  # objects reach the borders
    c = S.ShapesVQA("val", n=30, seed=5, position="center")
    cc = np.array([((o["box"][0] + o["box"][2]) / 2) for i in range(len(c)) for o in c[i]["objects"]])
    assert np.abs(cc - 168).mean() < np.abs(centres[:, 0] - 168).mean()


def test_chance_table():
    ch = S.chance_accuracy()
    assert set(ch) == set(S.QTYPES) | {"overall"}
    assert ch["exist"] == 0.5 and ch["color"] == 1 / len(S.COLORS) and ch["digit"] == 1 / len(S.DIGITS)
    assert ch["overall"] == pytest.approx(np.mean([ch[q] for q in S.QTYPES]))
    # answers are uniform by construction: the empirical majority answer is near chance
    ds = S.ShapesVQA("val", n=120, seed=0, qtypes=("exist",), balanced=False)
    yes = np.mean([ds[i]["answer"] == "yes" for i in range(len(ds))])
    assert 0.35 < yes < 0.65


def test_collate():
    import torch

    ds = S.ShapesVQA("test", n=4, seed=0)
    batch = S.collate([ds[i] for i in range(4)])
    assert isinstance(batch["mask"], torch.Tensor) and batch["mask"].shape == (4, 24, 24)
    assert len(batch["question"]) == 4


def test_aligned_layout_one_object_per_cell(test_slice):
    for s in test_slice:
        used = []
        for k, o in enumerate(s["objects"]):
            cells = np.argwhere(s["coverage"][k] > 0)
            if o["kind"] == "object":  # one cell, never a neighbour of another object's cells
                assert len(cells) == 1
            else:  # the card: 3x3 cells, the digit's dark pixels all inside the centre patch
                assert len(cells) == 9
                (r, c), img = cells.mean(0).astype(int), np.asarray(s["image"]).min(-1)
                x0, y0, x1, y1 = (int(round(v)) for v in o["box"])
                ink = np.argwhere(img[y0 + 1:y1 - 2, x0 + 1:x1 - 2] < 80) + (y0 + 1, x0 + 1)
                assert len(ink) > 10 and set(map(tuple, ink // S.PATCH)) == {(r, c)}
            for cell in cells:
                assert all(np.abs(cell - u).max() >= 2 for u in used)
            used += list(cells)


def test_free_layout_and_config_errors():
    ds = S.ShapesVQA("val", n=12, seed=1, align=False, min_size=20, max_size=40)
    spans = [(s["coverage"][k] > 0).sum() for s in (ds[i] for i in range(12))
             for k, o in enumerate(s["objects"]) if o["kind"] == "object"]
    assert max(spans) > 1  # freely placed 20-40 px objects span several patches
    with pytest.raises(ValueError, match="max_size"):
        S.SceneConfig(max_size=14)
    with pytest.raises(ValueError, match="min_objects"):
        S.SceneConfig(min_objects=5, max_objects=3)
    with pytest.raises(ValueError, match="unknown question types"):
        S.SceneConfig(qtypes=("colour",))


def test_scene_questions_contain_the_sample_question_and_agree_with_it(test_slice):
    for s in test_slice:
        qs = S.scene_questions(s["objects"], s["idmap"])
        assert (s["question"], s["answer"]) in qs[s["qtype"]]
        # every listed question has one answer, of its type
        for qt, pairs in qs.items():
            assert len({q for q, _ in pairs}) == len(pairs)
            assert all(a in S.ANSWERS[qt] for _, a in pairs)
        assert len(qs["exist"]) == len(S.SHAPES) * len(S.COLORS) and len(qs["digit"]) == 1
    free = S.ShapesVQA("test", n=24, seed=0, align=False, min_size=14, max_size=40)
    for s in (free[i] for i in range(len(free))):  # the same answers for freely placed objects too
        assert (s["question"], s["answer"]) in S.scene_questions(s["objects"], s["idmap"])[s["qtype"]]


def test_extra_turns_deterministic_distinct_and_valid(test_slice):
    rng = lambda: np.random.default_rng(7)  # noqa: E731
    for s in test_slice[:12]:
        a, b = S.extra_turns(s, rng(), 5), S.extra_turns(s, rng(), 5)
        assert a == b and 1 <= len(a) <= 5
        assert s["question"] not in [q for q, _ in a] and len({q for q, _ in a}) == len(a)
        valid = {qa for pairs in S.scene_questions(s["objects"], s["idmap"]).values() for qa in pairs}
        assert set(a) <= valid
        assert len(S.extra_turns(s, rng(), 2)) <= 2


def test_question_region_covers_the_question_targets(test_slice):
    for s in test_slice:  # every question type, exist yes and no; make_sample flags the objects it asked about
        absent = s["qtype"] == "exist" and s["answer"] == "no"  # then every coloured object is the region
        about = [k for k, o in enumerate(s["objects"]) if (o["kind"] == "object" if absent else o["target"])]
        expected = (s["coverage"][about] > 0).any(0)
        assert np.array_equal(S.question_region(s["objects"], s["coverage"], s["question"]), expected), s["question"]
        assert np.array_equal(s["mask"], expected)
    s = test_slice[0]
    for q, _ in S.extra_turns(s, np.random.default_rng(0), 8):  # regions of extra turns lie on objects
        reg = S.question_region(s["objects"], s["coverage"], q)
        assert reg.any() and (s["coverage"].max(0)[reg] > 0).all()
    with pytest.raises(ValueError, match="not a ShapesVQA question"):
        S.question_region(s["objects"], s["coverage"], "what is this ?")


# ------------------------------------------------------------------------ the types added for the next testbed


def test_the_original_types_render_exactly_the_scenes_the_shipped_model_was_evaluated_on():
    # sha256 over the first 24 train and test scenes (pixels, question + answer, mask), computed with the shapes.py
    # of commit 7fd6ac1, before NEW_QTYPES existed: adding types must not move the original random stream
    import hashlib
    h = hashlib.sha256()
    for split in ("train", "test"):
        ds = S.ShapesVQA(split, n=24, seed=0)
        for i in range(24):
            s = ds[i]
            h.update(np.asarray(s["image"]).tobytes())
            h.update((s["question"] + s["answer"]).encode())
            h.update(s["mask"].tobytes())
    assert h.hexdigest() == "a4fd1bbcc58ba44bac54f1da1a09640f9eccf1971446bae3e5f2c81fe66eee5e"


@pytest.fixture(scope="module")
def new_slice():
    ds = S.ShapesVQA("test", n=160, seed=5, qtypes=S.NEW_QTYPES)
    return [ds[i] for i in range(len(ds))]


def _object_pixels(s, k):
    return np.asarray(s["image"])[s["idmap"] == k].astype(float)


def _nearest_color(rgb):
    return min(S.COLORS, key=lambda c: np.sum((np.asarray(S.COLORS[c], float) - rgb) ** 2))


def test_new_types_are_balanced_and_vocabulary_is_appended():
    ds = S.ShapesVQA("val", n=400, seed=1, qtypes=S.NEW_QTYPES)
    from collections import Counter
    c = Counter((ds[i]["qtype"], ds[i]["answer"]) for i in range(len(ds)))
    for q in S.NEW_QTYPES:
        counts = [c[(q, a)] for a in S.ANSWERS[q]]
        assert sum(counts) == 100 and min(counts) >= 100 / len(counts) * 0.5, (q, counts)
    assert S.chance_accuracy(S.SceneConfig(qtypes=S.ALL_QTYPES))["overall"] == pytest.approx(
        np.mean([1 / len(S.ANSWERS[q]) for q in S.ALL_QTYPES]))
    assert S.question_vocab() == sorted(set(S.question_vocab()))  # the original vocabulary is unchanged
    assert {"big", "left", "background", "light", "dark"} <= set(S.question_vocab(S.ALL_QTYPES) +
                                                                 S.answer_vocab(S.ALL_QTYPES))
    assert not {"big", "left", "background"} & set(S.question_vocab())
    with pytest.raises(ValueError, match="unknown question types"):
        S.SceneConfig(qtypes=("twins", "size"))


def test_twins_are_identical_and_counted_from_the_pixels(new_slice):
    for s in (s for s in new_slice if s["qtype"] == "twins"):
        w = s["question"].split()
        shape = {p: sh for sh, p in S.PLURALS.items()}[w[3]]
        twins = [k for k, o in enumerate(s["objects"]) if o.get("color") == w[2] and o.get("shape") == shape]
        assert str(len(twins)) == s["answer"], s["question"]
        px = [_object_pixels(s, k) for k in twins]
        assert all(len(p) == len(px[0]) for p in px)  # same size, same shape: the same number of pixels
        assert all(np.array_equal(p[0], px[0][0]) and (p == p[0]).all() for p in px)  # one RGB for all twins
        assert all(_nearest_color(p.mean(0)) == w[2] for p in px)
        others = [k for k, o in enumerate(s["objects"]) if o["kind"] == "object" and k not in twins]
        assert all((s["objects"][k]["shape"], s["objects"][k]["color"]) != (s["objects"][twins[0]]["shape"], w[2])
                   for k in others)
        assert np.array_equal(s["mask"], (s["coverage"][twins] > 0).any(0))


def test_big_object_spans_2x2_patches_and_its_color_is_the_answer(new_slice):
    for s in (s for s in new_slice if s["qtype"] == "big"):
        big = [k for k, o in enumerate(s["objects"]) if o.get("cells") == 2]
        assert len(big) == 1
        k = big[0]
        assert _nearest_color(_object_pixels(s, k).mean(0)) == s["answer"]
        rows, cols = np.nonzero(s["mask"])
        assert s["mask"].sum() == 4 and np.ptp(rows) == 1 and np.ptp(cols) == 1  # a 2×2 block of patches
        extent = [np.ptp(np.nonzero(s["idmap"] == j), axis=1).max() + 1 for j in range(len(s["objects"]))]
        assert extent[k] >= 20 and all(e <= 12 for j, e in enumerate(extent)
                                       if s["objects"][j]["kind"] == "object" and j != k)


def test_relation_is_read_off_the_drawn_pixels(new_slice):
    n = 0
    for s in (s for s in new_slice if s["qtype"] == "relation"):
        w = s["question"].split()  # is the C1 S1 left of the C2 S2 ?
        a = next(k for k, o in enumerate(s["objects"]) if o.get("color") == w[2] and o.get("shape") == w[3])
        b = next(k for k, o in enumerate(s["objects"]) if o.get("color") == w[7] and o.get("shape") == w[8])
        assert sum(o.get("color") == w[2] and o.get("shape") == w[3] for o in s["objects"]) == 1
        xa, xb = np.nonzero(s["idmap"] == a)[1], np.nonzero(s["idmap"] == b)[1]
        assert s["answer"] == ("yes" if xa.max() < xb.min() else "no")
        assert xa.max() < xb.min() or xb.max() < xa.min()
        assert np.array_equal(s["mask"], (s["coverage"][[a, b]] > 0).any(0))
        n += 1
    assert n == 40


def test_background_tone_and_region(new_slice):
    for s in (s for s in new_slice if s["qtype"] == "background"):
        bg = np.asarray(s["image"])[s["idmap"] == -1].astype(float).mean()
        assert (bg > 150) == (s["answer"] == "light"), bg
        assert np.array_equal(s["mask"], ~(s["coverage"] > 0).any(0)) and s["mask"].sum() > 500
