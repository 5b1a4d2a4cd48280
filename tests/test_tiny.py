"""The embedded tiny LLaVA: offline tokenizer/processor, fast paths equal to the HF path, and a smoke
run of the training recipe. (The shipped model's accuracy test lands with the model itself.)"""
import json

import pytest
import torch

from svdprune_utils import shapes as S
from svdprune_utils import tiny as T



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
    res = T.train_tiny(tmp_path, seed=0, device="cpu", sizes=sizes, stage1_samples=16, stage2_samples=16,
                       batch_size=8, eval_n=6, log_every=8, eval_every=8, progress=False)
    assert 0.0 <= res["overall"] <= 1.0
    assert (tmp_path / "train_log.csv").read_text().startswith("stage,samples,seconds,loss")
    assert json.loads((tmp_path / "recipe.json").read_text())["seed"] == 0
    LlavaForConditionalGeneration.from_pretrained(tmp_path)
    assert AutoProcessor.from_pretrained(tmp_path).tokenizer("yes").input_ids[-1] == T.vocab()["yes"]
