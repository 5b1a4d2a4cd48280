"""keep_image_tokens, the one apply step (kept image tokens -> the inputs the LLM sees), against hand-built rows."""

from __future__ import annotations

import pytest
import torch

from svdprune_utils.hf.inputs import image_runs, keep_image_tokens, kept_features

I = 9  # image placeholder id in these hand-made rows (N = 4 tokens per image)


def _batch(pad_left=True):
    # row 0: [5, I I I I, 6, 7]          (7 tokens)
    # row 1: [5, 6, I I I I, 7, I I I I] (two images, 11 tokens)
    rows = [[5, I, I, I, I, 6, 7], [5, 6, I, I, I, I, 7, I, I, I, I]]
    L = max(map(len, rows))
    ids = torch.zeros(2, L, dtype=torch.long)
    mask = torch.zeros(2, L, dtype=torch.long)
    for b, r in enumerate(rows):
        sl = slice(L - len(r), L) if pad_left else slice(0, len(r))
        ids[b, sl], mask[b, sl] = torch.tensor(r), 1
    return ids, mask


def test_compact_left_padding_by_hand():
    ids, mask = _batch()
    kept = torch.tensor([[1, 3], [0, 2], [3, 0][::-1]])  # three images, 2 tokens each
    labels = torch.where(ids == I, -100, ids * 10)
    out = keep_image_tokens({"input_ids": ids, "attention_mask": mask, "labels": labels}, kept,
                            image_mask=ids == I, tokens_per_image=4, pad_token_id=0)
    # row 0 keeps 5 tokens, row 1 keeps 7: re-padded on the left to 7
    assert out["input_ids"].tolist() == [[0, 0, 5, I, I, 6, 7], [5, 6, I, I, 7, I, I]]
    assert out["attention_mask"].tolist() == [[0, 0, 1, 1, 1, 1, 1], [1] * 7]
    assert out["labels"].tolist() == [[-100, -100, 50, -100, -100, 60, 70], [50, 60, -100, -100, 70, -100, -100]]
    # the caller's columns: row 0 was padded by 4 on the left
    assert out["index"].tolist() == [[-1, -1, 4, 6, 8, 9, 10], [0, 1, 2, 4, 6, 7, 10]]
    assert "position_ids" not in out  # compact positions: the model derives them from the mask


def test_original_positions_and_right_padding_by_hand():
    ids, mask = _batch(pad_left=False)
    kept = torch.tensor([[2, 3], [0, 1], [1, 3]])
    out = keep_image_tokens({"input_ids": ids, "attention_mask": mask}, kept, image_mask=ids == I,
                            tokens_per_image=4, positions="original", pad_token_id=0)
    assert out["input_ids"].tolist() == [[5, I, I, 6, 7, 0, 0], [5, 6, I, I, 7, I, I]]
    assert out["position_ids"].tolist() == [[0, 3, 4, 5, 6, 0, 0], [0, 1, 2, 3, 6, 8, 10]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0], [1] * 7]


def test_caller_position_ids_are_made_contiguous_in_compact_mode():
    ids = torch.tensor([[5, I, I, I, I, 6, 7]])
    pos = torch.arange(7)[None] + 100
    out = keep_image_tokens({"input_ids": ids, "position_ids": pos}, torch.tensor([[0, 2]]), image_mask=ids == I,
                            tokens_per_image=4)
    assert out["position_ids"].tolist() == [[100, 101, 102, 103, 104]]


def test_embeds_rows_follow_the_ids_and_nothing_is_mutated():
    ids, mask = _batch()
    emb = torch.randn(2, ids.shape[1], 3)
    before = (ids.clone(), mask.clone(), emb.clone())
    kept = torch.tensor([[1, 3], [0, 2], [0, 3]])
    a = keep_image_tokens({"input_ids": ids, "attention_mask": mask}, kept, image_mask=ids == I, tokens_per_image=4)
    b = keep_image_tokens({"inputs_embeds": emb, "attention_mask": mask}, kept, image_mask=ids == I,
                          tokens_per_image=4)
    idx = a["index"]
    ref = torch.where((idx >= 0)[..., None], emb.gather(1, idx.clamp_min(0)[..., None].expand(-1, -1, 3)), 0.0)
    assert torch.equal(b["inputs_embeds"], ref) and torch.equal(a["index"], b["index"])
    assert all(torch.equal(x, y) for x, y in zip(before, (ids, mask, emb)))


def test_kept_features_in_order():
    f = [torch.arange(8.0).view(4, 2), -torch.arange(8.0).view(4, 2)]
    out = kept_features(f, torch.tensor([[0, 3], [1, 2]]))
    assert out[0].tolist() == [[0, 1], [6, 7]] and out[1].tolist() == [[-2, -3], [-4, -5]]


def test_errors_name_the_problem():
    ids, mask = _batch()
    bad = ids.clone()
    bad[1, -1] = 3  # row 1's second image has 3 placeholders
    with pytest.raises(ValueError, match="row 1: image placeholders must come in runs of 4"):
        image_runs(bad == I, 4)
    x = {"input_ids": ids, "attention_mask": mask}
    with pytest.raises(ValueError, match="one index row per image \\(3 images"):
        keep_image_tokens(x, torch.tensor([[0, 1]]), image_mask=ids == I, tokens_per_image=4)
    with pytest.raises(ValueError, match="strictly ascending"):
        keep_image_tokens(x, torch.tensor([[1, 0], [0, 1], [0, 1]]), image_mask=ids == I, tokens_per_image=4)
    with pytest.raises(ValueError, match=r"in \[0, 4\)"):
        keep_image_tokens(x, torch.tensor([[0, 4], [0, 1], [0, 1]]), image_mask=ids == I, tokens_per_image=4)
    with pytest.raises(ValueError, match="positions"):
        keep_image_tokens(x, torch.tensor([[0, 1]] * 3), image_mask=ids == I, tokens_per_image=4, positions="x")
    with pytest.raises(ValueError, match="input_ids or inputs_embeds"):
        keep_image_tokens({"attention_mask": mask}, torch.tensor([[0, 1]] * 3), image_mask=ids == I,
                          tokens_per_image=4)


def test_images_of_different_lengths_by_hand():
    """Per-image counts (LLaVA-NeXT's anyres images differ in length): runs of 3, 2 and 4 placeholders, two of
    them adjacent in row 1; kept indices bounded by each image's own length; the cut checked token by token."""
    # row 0: [pad pad pad 5, I I I, 6]   image 0: 3 tokens
    # row 1: [5, I I, I I I I, 7]        image 1: 2 tokens, image 2: 4 tokens, adjacent
    ids = torch.tensor([[0, 0, 0, 5, I, I, I, 6], [5, I, I, I, I, I, I, 7]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8])
    runs = image_runs(ids == I, [3, 2, 4])
    assert [[r.tolist() for r in row] for row in runs] == [[[4, 5, 6]], [[1, 2], [3, 4, 5, 6]]]
    kept = [torch.tensor([2]), torch.tensor([0, 1]), torch.tensor([1, 3])]
    out = keep_image_tokens({"input_ids": ids, "attention_mask": mask}, kept, image_mask=ids == I,
                            tokens_per_image=[3, 2, 4], positions="original")
    assert out["input_ids"].tolist() == [[0, 0, 0, 5, I, 6], [5, I, I, I, I, 7]]
    assert out["attention_mask"].tolist() == [[0, 0, 0, 1, 1, 1], [1] * 6]
    assert out["index"].tolist() == [[-1, -1, -1, 3, 6, 7], [0, 1, 2, 4, 6, 7]]
    assert out["position_ids"].tolist() == [[0, 0, 0, 0, 3, 4], [0, 1, 2, 4, 6, 7]]
    feats = [torch.arange(3.0)[:, None], 10 + torch.arange(2.0)[:, None], 20 + torch.arange(4.0)[:, None]]
    assert [f.flatten().tolist() for f in kept_features(feats, kept)] == [[2.0], [10.0, 11.0], [21.0, 23.0]]
    # a constant count given as a list equals the int form
    ids4, mask4 = _batch()
    k4 = torch.tensor([[1, 3], [0, 2], [0, 3]])
    a = keep_image_tokens({"input_ids": ids4, "attention_mask": mask4}, k4, image_mask=ids4 == I, tokens_per_image=4)
    b = keep_image_tokens({"input_ids": ids4, "attention_mask": mask4}, k4, image_mask=ids4 == I,
                          tokens_per_image=[4, 4, 4])
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_images_of_different_lengths_errors():
    ids = torch.tensor([[5, I, I, I, 6, I, I, 7]])
    img = ids == I
    with pytest.raises(ValueError, match="row 0: image 1's placeholders must be a run of 3 consecutive"):
        image_runs(img, [2, 3])  # 2 + 3 = 5 placeholders, but the runs are 3 and 2
    with pytest.raises(ValueError, match="counts run out after 3"):
        image_runs(img, [3])
    with pytest.raises(ValueError, match="the prompts hold 2 images, tokens_per_image lists 3"):
        image_runs(img, [3, 2, 4])
    with pytest.raises(ValueError, match=">= 1"):
        image_runs(img, [3, 0, 2])
    for bad in (2.5, None, "32", [3.7, 2], [3, True], torch.tensor([3.0, 2.0])):  # no silent truncation
        with pytest.raises(ValueError, match="int or a sequence of integer per-image counts"):
            image_runs(img, bad)
    for good in ((3, 2), torch.tensor([3, 2]), [3, torch.tensor(2)]):
        assert [[r.tolist() for r in row] for row in image_runs(img, good)] == [[[1, 2, 3], [5, 6]]]
    with pytest.raises(ValueError, match=r"kept\[1\] must be strictly ascending indices in \[0, 2\)"):
        keep_image_tokens({"input_ids": ids}, [torch.tensor([0, 2]), torch.tensor([0, 2])], image_mask=img,
                          tokens_per_image=[3, 2])
