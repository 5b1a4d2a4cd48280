"""The embedded model (data/tiny-llava-shapes, recipe v2): files, offline loading, the architecture the recipe
states, its stated full-token accuracy on a fixed slice of the ten question types, and the eval/demo CLI on it."""
import json

import pytest
import torch

from svdprune_utils.testbed import check
from svdprune_utils.testbed import shapes as S
from svdprune_utils.testbed import tiny as T
from svdprune_utils.testbed import train_v2 as V

V2 = T.DEFAULT_PATH


@pytest.fixture(scope="module")
def v2():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(V2).eval(), AutoProcessor.from_pretrained(V2)


def test_files_and_architecture(v2):
    model, proc = v2
    assert (V2 / "model.safetensors").stat().st_size <= 25 * 2**20
    assert model.config.text_config.num_hidden_layers == 6 and model.config.vision_feature_layer == -2
    assert check.readable_qtypes(proc) == S.ALL_QTYPES
    rec = json.loads((V2 / "recipe.json").read_text())
    assert rec["recipe"]["grounding_layers"] == [2, 3] and rec["seed"] == 0
    assert rec["recipe"]["finetune"] == json.loads(json.dumps(V.FINETUNE))  # the default recipe made it
    assert "val_overall" in (V2 / "train_log.csv").read_text().splitlines()[0]


@torch.inference_mode()
def test_stated_accuracy_on_a_fixed_slice(v2):
    """The first 40 test questions of seed 0 (four per type), all 576 tokens, through the processor and the
    Hugging Face forward (greedy first token): 40 of 40, as data/README.md states."""
    model, proc = v2
    items = list(S.ShapesVQA("test", n=40, seed=0, qtypes=S.ALL_QTYPES))
    x = proc(images=[it["image"] for it in items], text=[T.prompt(it["question"]) for it in items],
             return_tensors="pt", padding=True)
    pred = proc.batch_decode(model(**x, logits_to_keep=1).logits[:, -1].argmax(-1)[:, None])
    assert sum(p.strip() == it["answer"] for p, it in zip(pred, items)) == 40


def test_cli_eval_and_demo_on_the_shipped_model(v2, tmp_path, capsys):
    """The harness and CLI on a small ShapesVQA slice with the shipped model: pruning to 16 random tokens
    must cost accuracy that all 576 tokens have."""
    import pandas as pd

    from svdprune_utils.cli import main as cli

    out = tmp_path / "res.csv"
    assert cli(["eval", "--methods", "svd,random", "--budgets", "576,16", "--limit", "36", "--device", "cpu",
                "--out", str(out)]) == 0
    table = pd.read_csv(out).set_index(["method", "budget"])
    assert (table["n"] == 36).all() and {f"acc_{q}" for q in S.ALL_QTYPES} <= set(table.columns)
    assert table.loc[("svd", 576), "accuracy"] == table.loc[("random", 576), "accuracy"] >= 0.85
    assert table.loc[("random", 16), "accuracy"] < table.loc[("random", 576), "accuracy"] - 0.2
    assert table.loc[("random", 16), "region_recall"] < 0.2 and table.loc[("svd", 576), "region_recall"] == 1.0
    assert cli(["demo", "--n", "2", "--figures", str(tmp_path)]) == 0
    assert "accuracy" in capsys.readouterr().out and (tmp_path / "demo-kept-tokens.png").exists()
