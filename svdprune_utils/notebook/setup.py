"""The setup that notebooks 02–04 share: quiet progress output, the plot theme, the parameters read from
environment variables, the model, the dataset and the prompt.

Parameters (environment variables; the defaults run on a laptop CPU with nothing downloaded):

    SVDPRUNE_MODEL    a local model directory or a hub id (default: the embedded tiny LLaVA, data/tiny-llava-shapes;
                      a GPU never switches the model by itself — name llava-hf/llava-1.5-7b-hf to use it)
    SVDPRUNE_DATASET  "shapes" (ShapesVQA test split, every question type the model reads), a local VQA JSON, or a
                      Hugging Face dataset id
    SVDPRUNE_LIMIT    questions (default: the notebook's own)
    SVDPRUNE_DEVICE   auto (CUDA when present), cpu or cuda
    SVDPRUNE_FIGURES  where figures go (default figures/)
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

__all__ = ["quiet", "setup"]


def quiet() -> None:
    """Keep the committed outputs clean: no ipywidgets warning from ``tqdm.auto`` (which transformers imports;
    call this before importing it) and no weight-loading progress bars."""
    import warnings

    from tqdm import TqdmWarning

    warnings.filterwarnings("ignore", category=TqdmWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def setup(limit: int, dpi: int = 80, seed: int = 0) -> SimpleNamespace:
    """Load what a notebook needs (after :func:`quiet`). ``limit``: the notebook's default number of questions.

    Returns a namespace with ``model``, ``processor``, ``dataset``, ``prompt`` (the LLaVA-1.5 prompt, with the
    short-answer instruction when the model's vocabulary can read it), ``fastv_layer`` (FastV's K = 2, or the
    last-but-one layer of a shallower model), ``n_tokens`` (image tokens per image), ``grid`` (the patch grid),
    ``figures`` and the parameters ``MODEL``, ``DATASET``, ``LIMIT``, ``DEVICE``.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    from ..analysis.evaluate import default_prompt, load_model, load_vqa
    from ..hf.fastv import default_layer
    from ..hf.patch import tokens_per_image
    from ..testbed import tiny
    from ..testbed.check import readable_qtypes
    from ..testbed.shapes import ShapesVQA
    from .plotting import figures_dir

    quiet()
    sns.set_theme(style="whitegrid", context="notebook")
    plt.rcParams.update({"figure.dpi": dpi, "savefig.dpi": 110, "axes.titlesize": "medium"})

    params = dict(MODEL=os.environ.get("SVDPRUNE_MODEL", str(tiny.DEFAULT_PATH)),
                  DATASET=os.environ.get("SVDPRUNE_DATASET", "shapes"),
                  LIMIT=int(os.environ.get("SVDPRUNE_LIMIT", str(limit))),
                  DEVICE=os.environ.get("SVDPRUNE_DEVICE", "auto"))
    model, processor = load_model(params["MODEL"], device=params["DEVICE"])
    if params["DATASET"] == "shapes":
        dataset = ShapesVQA(split="test", n=params["LIMIT"], seed=seed, qtypes=readable_qtypes(processor))
    else:
        dataset = load_vqa(params["DATASET"], split="validation", limit=params["LIMIT"])
    n_tokens = tokens_per_image(model)
    side = int(round(n_tokens**0.5))
    return SimpleNamespace(
        model=model, processor=processor, dataset=dataset, prompt=default_prompt(processor),
        fastv_layer=default_layer(model), n_tokens=n_tokens,
        grid=(side, n_tokens // side), figures=Path(os.environ.get("SVDPRUNE_FIGURES", figures_dir())), **params)
