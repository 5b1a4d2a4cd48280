"""The shipped embedded model (data/tiny-llava-shapes): files, offline loading, its stated accuracy on a fixed
200-question slice, and the eval/demo CLI on it."""
import json

import numpy as np
import pytest
import torch

from svdprune_utils.testbed import shapes as S
from svdprune_utils.testbed import tiny as T

SHIPPED = T.DEFAULT_PATH


# ------------------------------------------------------------------------------- the shipped model


@pytest.fixture(scope="module")
def shipped():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    assert (SHIPPED / "model.safetensors").exists(), f"{SHIPPED} is missing: the embedded model ships with the repo"
    model = LlavaForConditionalGeneration.from_pretrained(SHIPPED).eval()
    return model, AutoProcessor.from_pretrained(SHIPPED)


def test_shipped_files_small_and_offline(shipped):
    model, proc = shipped
    assert (SHIPPED / "model.safetensors").stat().st_size <= 25 * 2**20
    assert type(model.model.vision_tower).__name__ == "CLIPVisionModel"
    assert type(model.model.language_model).__name__ == "LlamaModel"
    assert model.config.vision_feature_layer == -2 and model.config.vision_feature_select_strategy == "default"
    inp = proc(images=[S.ShapesVQA("test", n=1)[0]["image"]], text=[T.prompt("what digit is on the card ?")],
               return_tensors="pt")
    assert int((inp["input_ids"] == model.config.image_token_id).sum()) == 576


def test_shipped_accuracy_on_fixed_slice(shipped):
    """200 test questions (seed 0, items 0..199, balanced types) through the HF path
    (processor + model forward, greedy first token): the accuracy data/README.md states."""
    model, proc = shipped
    stated = json.loads((SHIPPED / "eval.json").read_text())["slice200"]
    ds = S.ShapesVQA("test", n=200, seed=0)
    items = [ds[i] for i in range(len(ds))]
    pred = []
    with torch.no_grad():
        for b in range(0, 200, 50):
            batch = items[b:b + 50]
            inp = proc(images=[s["image"] for s in batch], text=[T.prompt(s["question"]) for s in batch],
                       return_tensors="pt", padding=True)
            pred += proc.batch_decode(model(**inp, logits_to_keep=1).logits[:, -1].argmax(-1)[:, None])
    ok = np.array([p == s["answer"] for p, s in zip(pred, items)])
    assert ok.mean() >= stated["overall"] - 0.011  # at most 2 borderline flips from BLAS differences
    assert ok.mean() >= 0.9
    chance = S.chance_accuracy()
    for q in S.QTYPES:
        sel = np.array([s["qtype"] == q for s in items])
        assert ok[sel].mean() > chance[q] + 0.3, q


def test_cli_eval_and_demo_on_the_shipped_model(shipped, tmp_path, capsys):
    """The harness and CLI on a small ShapesVQA slice with the shipped model: pruning to 16 random tokens
    must cost accuracy that all 576 tokens have."""
    import pandas as pd

    from svdprune_utils.cli import main as cli

    out = tmp_path / "res.csv"
    assert cli(["eval", "--methods", "svd,random", "--budgets", "576,16", "--limit", "36", "--device", "cpu",
                "--out", str(out)]) == 0
    table = pd.read_csv(out).set_index(["method", "budget"])
    assert (table["n"] == 36).all() and {f"acc_{q}" for q in S.QTYPES} <= set(table.columns)
    assert table.loc[("svd", 576), "accuracy"] == table.loc[("random", 576), "accuracy"] >= 0.85
    assert table.loc[("random", 16), "accuracy"] < table.loc[("random", 576), "accuracy"] - 0.2
    assert table.loc[("random", 16), "region_recall"] < 0.2 and table.loc[("svd", 576), "region_recall"] == 1.0
    assert cli(["demo", "--n", "2", "--figures", str(tmp_path)]) == 0
    assert "accuracy" in capsys.readouterr().out and (tmp_path / "demo-kept-tokens.png").exists()
