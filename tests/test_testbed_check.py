"""testbed-check: the oracle/random selections, the verdict rules, the predictions against a hand-built pruned prompt
on the shipped model (no patch: features gathered and positions compacted by hand), and the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from svdprune_utils.analysis.evaluate import load_model
from svdprune_utils.cli import main as cli
from svdprune_utils.core.selection import select_tokens
from svdprune_utils.testbed import check, tiny
from svdprune_utils.testbed import shapes as S


def test_oracle_keeps_the_region_fills_at_random_and_nests_across_budgets():
    mask = np.zeros((24, 24), bool)
    mask[3, 4] = mask[10, 10] = mask[23, 23] = True
    region = {3 * 24 + 4, 250, 575}
    prev = set()
    for b in (3, 16, 32, 64, 575, 576):
        k = check.oracle_kept(mask, b, [0, 7])
        assert len(k) == b == len(set(k.tolist())) and np.all(np.diff(k) > 0)
        assert region <= set(k.tolist()) and prev <= set(k.tolist())  # nested: a superset of the smaller budget
        prev = set(k.tolist())
    np.testing.assert_array_equal(check.oracle_kept(mask, 16, [0, 7]), check.oracle_kept(mask, 16, [0, 7]))
    assert not np.array_equal(check.oracle_kept(mask, 16, [0, 7]), check.oracle_kept(mask, 16, [0, 8]))
    # the fill is uniform over the non-region tokens: each is kept with probability (b - 3) / 573
    hits = np.zeros(576)
    for i in range(2000):
        hits[check.oracle_kept(mask, 16, [1, i])] += 1
    rest = np.setdiff1d(np.arange(576), sorted(region))
    assert abs(hits[rest].mean() / 2000 - 13 / 573) < 1e-12
    assert hits[rest].max() / 2000 < 0.045  # no favoured token (binomial sd 0.0033 around 0.0227)
    with pytest.raises(ValueError, match="does not fit"):
        check.oracle_kept(mask, 2, [0])
    with pytest.raises(ValueError, match="budget must be in 1..576"):
        check.oracle_kept(mask, 577, [0])
    with pytest.raises(ValueError, match="budget must be in 1..576"):
        check.oracle_kept(np.zeros(576, bool), 0, [0])


def test_verdict_rules():
    assert check._close(0.98, 1.0, 0.02) and not check._close(0.97, 1.0, 0.02)
    assert check._close(0.40, 0.297, 0.15) and not check._close(0.45, 0.297, 0.15)
    assert check.monotone([0.90, 0.90, 0.95, 0.96, 0.96])
    assert check.monotone([0.90, 0.895, 0.95])  # within the slack (0.01)
    assert not check.monotone([0.944, 0.944, 0.944, 0.938, 0.925])  # run f's oracle row: falls with the budget
    assert not check.monotone([0.95, 0.96, 0.93])  # a drop against any smaller budget counts
    good = {"overall": 0.96, "n": 60, "color": 0.90, "count": 1.0}
    assert check.full_passes(good)
    assert not check.full_passes({**good, "overall": 0.95})
    assert not check.full_passes({**good, "count": 0.89})


@pytest.fixture(scope="module")
def shipped():
    return load_model(str(tiny.DEFAULT_PATH), "cpu")


@pytest.fixture(scope="module")
def v1():
    return load_model(str(tiny.V1_PATH), "cpu")


@torch.inference_mode()
def _hand_answers(model, items, kept=None):
    """Greedy first token with the image tokens ``kept`` (list of index arrays; None: all) gathered by hand and
    placed at consecutive positions (an unpatched forward on inputs_embeds)."""
    inv = {i: w for w, i in tiny.vocab().items()}
    feats = model.model.multi_modal_projector(tiny.vision_features(model, tiny.pixel_values(
        [it["image"] for it in items]))[:, 1:])
    out = []
    for i, it in enumerate(items):
        f = feats[i] if kept is None else feats[i, torch.as_tensor(kept[i])]
        ids, mask = tiny.encode_ids([it["question"]], n_image=f.shape[0])
        logits = model(inputs_embeds=tiny.embed_inputs(model, ids, f[None]), attention_mask=mask,
                       logits_to_keep=1).logits[0, -1]
        out.append(inv[int(logits.argmax())])
    return out


def test_check_predictions_equal_a_hand_built_pruned_prompt(shipped):
    model, processor = shipped
    res = check.check_seed(model, processor, seed=3, n=12, progress=False, batch_size=5)
    items = list(S.ShapesVQA("test", n=12, seed=3, qtypes=S.ALL_QTYPES))
    q = res["questions"]
    assert [r["index"] for r in q] == list(range(12)) and [r["answer"] for r in q] == [it["answer"] for it in items]
    assert [r["full"] for r in q] == _hand_answers(model, items)
    fits = [int(np.asarray(it["mask"]).sum()) <= min(check.ORACLE_BUDGETS) for it in items]
    assert 0 < sum(fits) < len(items)  # the background question's region (the whole background) does not fit
    sub = [it for it, f in zip(items, fits) if f]
    for b in check.ORACLE_BUDGETS:
        kept = [check.oracle_kept(it["mask"], b, [3, it["index"]]) for it in sub]
        assert [r[f"oracle_{b}"] for r, f in zip(q, fits) if f] == _hand_answers(model, sub, kept), b
        assert all(r[f"oracle_{b}"] is None for r, f in zip(q, fits) if not f)
    kept = [check.oracle_kept(np.zeros(576, bool), check.RANDOM_BUDGET, [3, it["index"], 1]) for it in items]
    assert [r["random"] for r in q] == _hand_answers(model, items, kept)
    with torch.inference_mode():  # drop one: svd's N - 1 tokens (leverage of the layer -2 patch features)
        vf = tiny.vision_features(model, tiny.pixel_values([it["image"] for it in items]))[:, 1:]
    kept = select_tokens(vf, 575, "svd")
    assert [r["drop_one"] for r in q] == _hand_answers(model, items, list(kept))
    # accuracies are the means of the predictions
    for prop in ("full", "drop_one"):
        assert res[prop]["overall"] == pytest.approx(np.mean([r[prop] == r["answer"] for r in q]))
    local = [r for r in q if r["qtype"] not in S.GLOBAL_QTYPES]  # random: local types; the global one apart
    assert 0 < len(local) < len(q)
    assert res["random"]["overall"] == pytest.approx(np.mean([r["random"] == r["answer"] for r in local]))
    assert res["oracle"]["n"] == sum(fits) and res["oracle"]["excluded"] == len(items) - sum(fits)
    assert res["oracle"]["full"] == pytest.approx(np.mean([r["full"] == r["answer"] for r, f in zip(q, fits) if f]))
    assert res["random"]["chance"] == pytest.approx(np.mean([1 / len(S.ANSWERS[r["qtype"]]) for r in local]))
    assert res["passed"] == all(res[k]["passed"] for k in ("full", "drop_one", "oracle", "random", "fastv"))


def test_check_on_the_v1_model_shows_its_known_failures(v1):
    # the v1 model reads its answers before FastV's cut at layer 2 of 3 (issue 16): FastV with ONE image
    # token still answers like the full model, far from chance
    model, processor = v1
    res = check.check_seed(model, processor, seed=0, n=24, progress=False)
    assert res["full"]["passed"] and res["full"]["overall"] == 1.0
    assert res["fastv"]["overall"] >= 0.9 and not res["fastv"]["passed"] and not res["passed"]
    assert "FAIL" in check.report([res]) and "some properties fail" in check.report([res])


@pytest.mark.parametrize(("argv", "msg"), [
    (["--seeds", "0,a"], "--seeds must be integers"),
    (["--n", "9"], "--n must be >= 10"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--split", "dev"], "--split must be one of train, val, test"),
    (["--json", "/nonexistent/x.json"], "--json /nonexistent/x.json: directory"),
    (["--model", "/nonexistent/model"], "--model /nonexistent/model: path not found"),
])
def test_cli_errors_are_one_line_with_exit_code_2(capsys, argv, msg):
    assert cli(["testbed-check", *argv]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1


def test_cli_reports_and_writes_json(tmp_path, capsys):
    out = tmp_path / "c.json"
    assert cli(["testbed-check", "--model", str(tiny.V1_PATH), "--n", "10", "--seeds", "0,1", "--json",
                str(out)]) == 1  # FastV fails on v1
    text = capsys.readouterr().out
    assert text.count("seed ") >= 2 and "fastv 1 token after layer 2" in text and "some properties fail" in text
    data = json.loads(out.read_text())
    assert [d["seed"] for d in data] == [0, 1] and all(len(d["questions"]) == 10 for d in data)
    assert set(data[0]) >= {"full", "drop_one", "oracle", "random", "fastv", "passed"}


def test_question_types_follow_the_vocabulary(v1, shipped, tmp_path):
    assert check.readable_qtypes(v1[1]) == S.QTYPES  # the v1 model's tokenizer predates the new types
    assert check.readable_qtypes(shipped[1]) == S.ALL_QTYPES
    tiny.build_processor().save_pretrained(tmp_path)
    from transformers import AutoProcessor
    assert check.readable_qtypes(AutoProcessor.from_pretrained(tmp_path)) == S.ALL_QTYPES
