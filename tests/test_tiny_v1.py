"""The first embedded model (data/tiny-llava-shapes-v1, kept for provenance: its stage-1 tower starts the v2 recipe):
files, offline loading, its stated accuracy on a fixed 200-question slice."""
import json

import numpy as np
import pytest
import torch

from svdprune_utils.testbed import shapes as S
from svdprune_utils.testbed import tiny as T

SHIPPED = T.V1_PATH


# ------------------------------------------------------------------------------- the v1 model


@pytest.fixture(scope="module")
def shipped():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    assert (SHIPPED / "model.safetensors").exists(), f"{SHIPPED} is missing: the v1 model ships with the repo"
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
