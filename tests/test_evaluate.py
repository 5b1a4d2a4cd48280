"""The evaluation harness, answer normalisation, the local-JSON benchmark path and the eval CLI,
on a tiny random LLaVA (answers meaningless; the structure, determinism and bookkeeping are tested)."""

import json
import pathlib

import numpy as np
import pytest

from svdprune_utils.analysis.evaluate import evaluate, load_vqa, normalize_answer, vqa_score
from svdprune_utils.cli import main as cli
from svdprune_utils.testbed import tiny
from svdprune_utils.testbed.shapes import ShapesVQA

FIXTURE = pathlib.Path(__file__).parent / "data" / "vqa_fixture" / "vqa.json"


@pytest.fixture(scope="module")
def random_tiny():
    return tiny.build_model(seed=1).eval(), tiny.build_processor()


def test_normalize_answer():
    assert normalize_answer(" The Two.") == "2"
    assert normalize_answer("a red circle!") == "red circle"
    assert normalize_answer("bottom-left") == "bottom left"
    assert normalize_answer("3.5 m") == "3.5 m"
    assert normalize_answer("Yes\nbecause ...") == "yes"


def test_vqa_score():
    assert vqa_score("Yes", ["yes"]) == 1.0 and vqa_score("no", ["yes"]) == 0.0
    humans = ["purple"] * 2 + ["violet"] * 8
    assert vqa_score("purple", humans) == pytest.approx(2 / 3)
    assert vqa_score("violet", humans) == 1.0


def test_load_vqa_local_json():
    data = load_vqa(str(FIXTURE))
    assert len(data) == 3 and data[0]["image"].size == (336, 336)
    assert len(data[0]["answers"]) == 10 and data[1]["answers"] == ["square"]
    assert len(load_vqa(str(FIXTURE), limit=2)) == 2
    with pytest.raises(FileNotFoundError):
        load_vqa(str(FIXTURE.with_name("missing.json")))


def test_load_vqa_rejects_bad_records(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image": "x.png", "question": "q?"}]))
    with pytest.raises(ValueError, match="answer"):
        load_vqa(str(bad))


def test_harness_table_is_complete_deterministic_and_unpatches(random_tiny):
    model, processor = random_tiny
    data = ShapesVQA(split="test", n=6, seed=0)
    kw = dict(methods=["svd", "random"], budgets=[576, 16], batch_size=3, progress=False, return_samples=True)
    summary, per = evaluate(model, processor, data, **kw)
    assert list(summary[["method", "budget"]].itertuples(index=False, name=None)) == [
        ("svd", 576), ("svd", 16), ("random", 576), ("random", 16)]
    assert (summary["n"] == 6).all() and summary["tokens"].tolist() == [576, 16, 576, 16]
    assert {f"acc_{q}" for q in data.config.qtypes} <= set(summary.columns)
    full = summary[summary.budget == 576]
    assert (full["region_recall"] == 1.0).all()  # nothing pruned
    assert (summary[summary.budget == 16]["region_recall"] < 1.0).all()
    assert (summary["prefill_ms"] > 0).all()
    # a second run gives the same answers and recalls
    again_summary, again = evaluate(model, processor, data, **kw)
    assert again["prediction"].tolist() == per["prediction"].tolist()
    np.testing.assert_allclose(again["region_recall"], per["region_recall"])
    assert not hasattr(model, "svdprune")


def test_harness_rejects_empty(random_tiny):
    model, processor = random_tiny
    with pytest.raises(ValueError, match="empty"):
        evaluate(model, processor, [], methods=["svd"], budgets=[16], progress=False)
    with pytest.raises(ValueError, match="empty"):
        evaluate(model, processor, ShapesVQA(n=2), methods=[], budgets=[16], progress=False)


def test_cli_eval_on_the_local_json_benchmark(tmp_path, random_tiny, capsys):
    model, processor = random_tiny
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    out = tmp_path / "res.csv"
    assert cli(["eval", "--model", str(tmp_path / "model"), "--dataset", str(FIXTURE), "--methods", "svd,norm",
                "--budgets", "576,32", "--limit", "2", "--device", "cpu", "--out", str(out)]) == 0
    import pandas as pd

    table = pd.read_csv(out)
    assert len(table) == 4 and (table["n"] == 2).all()
    assert "accuracy" in capsys.readouterr().out
