"""The shared notebook setup: defaults, environment overrides, the prompt that follows the model."""

from svdprune_utils.analysis.evaluate import LLAVA_PROMPT
from svdprune_utils.notebook.setup import setup
from svdprune_utils.testbed import tiny


def test_defaults_and_overrides(monkeypatch, tmp_path):
    for name in ("SVDPRUNE_MODEL", "SVDPRUNE_DATASET", "SVDPRUNE_LIMIT", "SVDPRUNE_DEVICE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SVDPRUNE_FIGURES", str(tmp_path))
    s = setup(limit=5)
    assert s.MODEL == str(tiny.DEFAULT_PATH) and s.DATASET == "shapes" and s.LIMIT == 5 and len(s.dataset) == 5
    assert s.prompt == LLAVA_PROMPT and s.fastv_layer == 2 and s.n_tokens == 576 and s.grid == (24, 24)
    assert s.figures == tmp_path and s.model.device.type == "cpu"
    monkeypatch.setenv("SVDPRUNE_LIMIT", "3")
    assert len(setup(limit=5).dataset) == 3
