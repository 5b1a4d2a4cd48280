"""benchmarks/family_speed.py on tiny LLaVA-NeXT and Qwen2.5-VL configs: the table it writes, and its refusals."""

import pandas as pd
import pytest
import torch
from helpers import load_benchmark

from svdprune_utils.testbed.families import build_tiny_llava_next, build_tiny_qwen


def _script():
    return load_benchmark("family_speed")


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    d = tmp_path_factory.mktemp("configs")
    build_tiny_llava_next(image_size=56).config.to_json_file(str(d / "next.json"))  # 2 decoder layers
    build_tiny_qwen(text_layers=3).config.to_json_file(str(d / "qwen.json"))
    return d


@pytest.mark.parametrize("family, image, n_img, shape", [
    # 112x56 px on 56-px tiles: base tile 4x4 patches + a 2x1 grid unpadded to 8x4 patches with 8 newlines
    ("next", "112x56", 16 + 8 * 4 + 8, (16 + 32, 32)),
    # 112x84 px, patch 14, 2x2 merge: 8x6 patches -> 12 merged tokens of 4 x 32 features
    ("qwen", "112x84", 12, (12, 128)),
])
def test_prefill_table_on_a_tiny_config(configs, tmp_path, family, image, n_img, shape):
    out = tmp_path / "speed.md"
    methods = "svd,random" if family == "next" else "svd,fastv"  # FastV needs >= 3 decoder layers (Qwen's)
    assert _script().main(["--config", str(configs / f"{family}.json"), "--image", image, "--budgets", "8,4",
                           "--methods", methods, "--repeats", "1", "--device", "cpu", "--overhead-budget", "4",
                           "--out", str(out)]) == 0
    df = pd.read_csv(out.with_suffix(".csv"))
    assert sorted(df["budget"].unique()) == [4, 8, n_img]  # the unpruned run is added
    assert (df[df.budget == n_img]["flops_ratio"] == 1.0).all()
    for method in methods.split(","):
        rows = df[df.method == method].set_index("budget")
        assert rows.loc[4, "kv_cache_bytes"] < rows.loc[8, "kv_cache_bytes"] < rows.loc[n_img, "kv_cache_bytes"]
    text = out.read_text()
    assert f"{n_img} placeholders, selection on {shape[0]}×{shape[1]} features" in text
    assert "random weights" in text


def test_refusals_are_one_line_before_any_timing(configs, capsys):
    mod = _script()
    with pytest.raises(SystemExit) as e:  # FastV cuts after layer 2: the 2-layer tiny NeXT cannot run it
        mod.main(["--config", str(configs / "next.json"), "--image", "112x56", "--methods", "fastv",
                  "--budgets", "8", "--repeats", "1", "--device", "cpu"])
    assert e.value.code == 2
    assert "method 'fastv' at budget 8: fastv_layer must be in [1, 1], got 2" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        mod.main(["--config", str(configs / "qwen.json"), "--image", "100x84", "--device", "cpu"])
    assert "--image must be a multiple of 28 pixels" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        mod.main(["--config", str(configs / "next.json"), "--image", "big", "--device", "cpu"])
    assert e.value.code == 2
    with pytest.raises(SystemExit, match="--text-layers must be in"):
        mod.main(["--config", str(configs / "qwen.json"), "--image", "112x84", "--text-layers", "9",
                  "--device", "cpu"])


def test_text_ids_avoid_the_special_tokens_of_a_small_vocabulary(configs):
    """The prompt's text is drawn from plain ids below the vocabulary (a 128-token tiny config used to get ids up to
    1000) and never hits the image or vision-marker ids, so the placeholder count is the layout's."""
    mod = _script()
    model = build_tiny_qwen(text_layers=3)
    for seed in range(5):
        x, _ = mod.make_inputs(model, (112, 84), 60, torch.device("cpu"), torch.float32, seed)
        ids = x["input_ids"]
        assert int(ids.max()) < model.config.text_config.vocab_size
        assert int((ids == model.config.image_token_id).sum()) == 12
