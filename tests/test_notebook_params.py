"""The notebooks' non-default path: a local VQA JSON through ``SVDPRUNE_DATASET`` (the same cells a GPU run
with ``SVDPRUNE_MODEL=llava-hf/llava-1.5-7b-hf`` uses), no cell edited. Figures go to a temporary folder."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "vqa_fixture" / "vqa.json"


@pytest.mark.parametrize("name", ["02_positional_bias", "03_llava_pruning", "04_ablations"])
def test_notebook_runs_on_a_local_vqa_json(name, tmp_path, monkeypatch):
    monkeypatch.setenv("SVDPRUNE_DATASET", str(FIXTURE))
    monkeypatch.setenv("SVDPRUNE_LIMIT", "3")
    monkeypatch.setenv("SVDPRUNE_REPEATS", "1")
    monkeypatch.setenv("SVDPRUNE_FIGURES", str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "3 questions" in text or "3 samples" in text  # the fixture, not ShapesVQA, was evaluated
    assert any(tmp_path.glob("0*.png"))  # figures went to SVDPRUNE_FIGURES, not the repository
