"""benchmarks/llava_speed.py: the random-weights path builds a model from a config and times prefills."""

import json

from helpers import load_benchmark

TINY = {
    "model_type": "llava", "image_token_index": 500, "projector_hidden_act": "gelu", "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default", "vocab_size": 512,
    "text_config": {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
                    "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
                    "max_position_embeddings": 512},
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                      "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 112, "patch_size": 14,
                      "projection_dim": 32},
}


def _script():
    return load_benchmark("llava_speed")


def test_random_weights_prefill_table(tmp_path):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    out = tmp_path / "speed.md"
    mod = _script()
    assert mod.main(["--random-weights", "--config", str(cfg), "--budgets", "64,16", "--methods", "svd,fastv",
                     "--repeats", "1", "--device", "cpu", "--overhead-budget", "16", "--out", str(out)]) == 0
    import pandas as pd

    df = pd.read_csv(out.with_suffix(".csv"))
    assert sorted(df["budget"].unique()) == [16, 64]  # 112 / 14 = 8 -> 64 image tokens
    full = df[df.budget == 64]
    assert (full["flops_ratio"] == 1.0).all()
    pruned = df[df.budget == 16].set_index("method")
    assert pruned.loc["svd", "flops_ratio"] < pruned.loc["fastv", "flops_ratio"] < 1.0
    assert (df["prefill_ms"] > 0).all() and (df["selection_ms"] > 0).all()
    assert "random weights" in out.read_text()


def test_text_layers_truncates_the_decoder(tmp_path):
    import argparse

    import pytest
    import torch

    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    mod = _script()
    args = argparse.Namespace(random_weights=True, config=str(cfg), text_layers=2, seed=0)
    model = mod.build_model(args, "cpu", torch.float32)
    assert len(model.model.language_model.layers) == 2 == model.config.text_config.num_hidden_layers
    with pytest.raises(SystemExit, match="--text-layers must be in"):
        mod.build_model(argparse.Namespace(random_weights=True, config=str(cfg), text_layers=4, seed=0), "cpu",
                        torch.float32)
    with pytest.raises(SystemExit):  # argparse error: only a random-weights model can be truncated
        mod.main(["--model", str(tmp_path), "--text-layers", "2"])


def test_shipped_7b_config_loads():
    cfg = _script().load_config("llava-1.5-7b")
    assert cfg.text_config.num_hidden_layers == 32 and cfg.vision_config.image_size == 336


def test_refusals_before_any_timing(tmp_path, capsys):
    import pytest

    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    mod = _script()
    with pytest.raises(SystemExit) as e:  # FastV cuts after layer 2: a decoder cut to 2 layers cannot run it
        mod.main(["--random-weights", "--config", str(cfg), "--text-layers", "2", "--methods", "svd,fastv",
                  "--budgets", "16", "--device", "cpu"])
    assert e.value.code == 2
    assert "method 'fastv' at budget 16: fastv_layer must be in [1, 1], got 2" in capsys.readouterr().err
    other = tmp_path / "next.json"
    other.write_text(json.dumps(dict(TINY, model_type="llava_next")))
    with pytest.raises(SystemExit, match="model_type 'llava_next' is not 'llava'"):
        mod.main(["--random-weights", "--config", str(other), "--device", "cpu"])
