"""The v2 candidate of the embedded model (data/tiny-llava-shapes-v2, issue 16): files, offline loading, the
architecture the recipe states, and its stated full-token accuracy on a fixed slice of the ten question types."""
import json

import pytest
import torch

from svdprune_utils.testbed import check
from svdprune_utils.testbed import shapes as S
from svdprune_utils.testbed import tiny as T

V2 = T.DEFAULT_PATH.parent / "tiny-llava-shapes-v2"


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
