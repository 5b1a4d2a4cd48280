"""Accuracy against budget: run a (patched) LLaVA over a VQA dataset for every method × budget.

One code path for the embedded model on ShapesVQA and for ``llava-hf/llava-1.5-7b-hf`` on real
benchmarks: the processor builds the inputs, :func:`~svdprune_utils.hf.patch.patch_llava` prunes,
``generate`` answers greedily, and the answer is scored after VQA-style normalisation.

A dataset is any sequence of dicts with ``image`` (PIL), ``question`` (str) and ``answer`` (str) or
``answers`` (list of str); optional ``qtype`` (question type, for the per-type columns) and ``mask``
((24, 24) bool answer region, for answer-region recall). :func:`load_vqa` reads a local JSON file
(a list of such records with ``image`` a path relative to the file) or a Hugging Face dataset id.
"""

from __future__ import annotations

import json
import pathlib
import re
import time
from contextlib import contextmanager
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm import tqdm  # text bars: the same in a terminal and a notebook (no ipywidgets here)

from ..core.metrics import region_recall
from ..hf.inputs import LLAVA_PROMPT
from ..hf.patch import patch_llava, tokens_per_image, unpatch_llava
from .efficiency import synchronize

__all__ = ["normalize_answer", "vqa_score", "evaluate", "model_inputs", "check_record", "to_rgb", "default_prompt",
           "load_vqa", "load_model", "LLAVA_PROMPT", "SHORT_ANSWER"]

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."

_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$~|:']")


def normalize_answer(text: str) -> str:
    """VQA-style normalisation: lower case, first line only, punctuation and articles dropped,
    number words to digits, a trailing period removed, whitespace collapsed."""
    t = str(text).strip().lower().split("\n")[0]
    t = _PUNCT.sub(" ", t)
    t = re.sub(r"(?<!\d)\.(?!\d)", " ", t)  # periods that are not decimal points
    words = [_NUMBERS.get(w, w) for w in t.split() if w not in _ARTICLES]
    return " ".join(words)


def vqa_score(prediction: str, answers: Sequence[str]) -> float:
    """1/0 exact match against a single reference; VQAv2's min(1, #humans who agree / 3) against
    a list of ≥ 2 human answers."""
    p = normalize_answer(prediction)
    refs = [normalize_answer(a) for a in answers]
    if len(refs) == 1:
        return float(p == refs[0])
    return min(1.0, sum(r == p for r in refs) / 3.0)


def answers_of(item: dict) -> list[str]:
    """The reference answers of a dataset record, as a list of strings."""
    if "answers" in item and item["answers"] is not None:
        a = item["answers"]
        return [a] if isinstance(a, str) else [x["answer"] if isinstance(x, dict) else str(x) for x in a]
    if "answer" in item:
        return [str(item["answer"])]
    raise ValueError(f"dataset item has neither 'answer' nor 'answers' (keys: {sorted(item)})")


def check_record(item, where: str, n_tokens: int | None = None) -> None:
    """ValueError naming ``where`` (e.g. "record 3 of data.json") and the field, for a dataset record that
    cannot be evaluated: ``question`` not a non-empty string (or holding the ``<image>`` placeholder); ``answers``
    absent, empty, not a list of strings (or {"answer": str} dicts) and no string ``answer``; ``qtype`` not a
    string; ``mask`` not a 0/1 (boolean) square grid or flat list, or (when ``n_tokens`` is given) not with
    ``n_tokens`` entries."""
    if not isinstance(item, dict):
        raise ValueError(f"{where}: a record must be a dict, got {type(item).__name__}")
    q = item.get("question")
    if not isinstance(q, str) or not q.strip():
        raise ValueError(f"{where}: 'question' must be a non-empty string, got {q!r}")
    if "<image>" in q:
        raise ValueError(f"{where}: 'question' must not contain the image placeholder <image>, got {q!r}")
    if item.get("answers") is not None:
        a = item["answers"]
        ok = isinstance(a, str) and a.strip() or isinstance(a, list) and a and all(
            isinstance(x, str) or isinstance(x, dict) and isinstance(x.get("answer"), str) for x in a)
        if not ok:
            raise ValueError(f"{where}: 'answers' must be a non-empty list of strings, got {a!r}")
    elif not isinstance(item.get("answer"), (str, int)) or isinstance(item.get("answer"), bool):
        raise ValueError(f"{where}: needs 'answers' (a non-empty list of strings) or 'answer' (a string)")
    if "qtype" in item and not isinstance(item["qtype"], str):
        raise ValueError(f"{where}: 'qtype' must be a string, got {item['qtype']!r}")
    if item.get("mask") is not None:
        try:
            m = np.asarray(item["mask"])
        except ValueError:  # a ragged list
            raise ValueError(f"{where}: 'mask' must be a boolean answer region (a square grid, e.g. 24x24), got "
                             "rows of different lengths") from None
        grid = m.ndim == 1 or m.ndim == 2 and m.shape[0] == m.shape[1]
        zero_one = m.dtype.kind in "biu" and m.size and np.isin(m, (0, 1)).all()
        if not grid or not zero_one or n_tokens is not None and m.size != n_tokens:
            got = f"shape {m.shape} dtype {m.dtype}"
            if m.dtype.kind in "biu" and m.size and not zero_one:
                got += " with values other than 0/1"
            raise ValueError(f"{where}: 'mask' must be a boolean (0/1) answer region, a square grid with "
                             f"{n_tokens or 'N'} entries (e.g. 24x24), got {got}")


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of a PIL image. 16-bit (I;16*, and I) images are scaled by 255/65535, float (F)
    images are read as [0, 1]; ``convert("RGB")`` alone clips a 16-bit image to white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(image, dtype=np.float64)
        a = a * 255.0 if image.mode == "F" else a / 257.0
        return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def default_prompt(processor) -> str:
    """The LLaVA-1.5 prompt for a model: with the short-answer instruction of the LLaVA VQA protocol when the
    model's tokenizer can read it (no unknown tokens), else the bare prompt (the embedded model's word-level
    vocabulary reads the instruction as <unk>)."""
    tok = getattr(processor, "tokenizer", processor)
    unk = getattr(tok, "unk_token_id", None)
    ids = tok(SHORT_ANSWER, add_special_tokens=False)["input_ids"]
    if unk is not None and unk in ids:
        return LLAVA_PROMPT
    return LLAVA_PROMPT.replace("{question}", "{question}" + SHORT_ANSWER)


@contextmanager
def _prefill_timer(model):
    """Times from the start of a generate call to the end of its first forward: the prefill, with the
    vision tower and the token selection (which the patch may run before the first forward)."""
    box = {"times": [], "t0": None}

    def post(module, args, kwargs, output):
        if box["t0"] is not None:
            synchronize(model.device)
            box["times"].append(time.perf_counter() - box["t0"])
            box["t0"] = None

    handle = model.register_forward_hook(post, with_kwargs=True)
    try:
        yield box
    finally:
        handle.remove()


def model_inputs(model, processor, items, prompt: str = LLAVA_PROMPT) -> dict:
    """Processor inputs for dataset ``items`` (dicts with ``image``, ``question``): prompts
    ``prompt.format(question=...)``, left-padded, on the model's device, ``pixel_values`` in the model's dtype.
    The one builder of model inputs from dataset records (evaluation, cached ablations, bias analysis)."""
    images = [to_rgb(it["image"]) if isinstance(it["image"], Image.Image) else it["image"] for it in items]
    x = processor(images=images, text=[prompt.format(question=it["question"]) for it in items],
                  return_tensors="pt", padding=True, padding_side="left")
    return {k: v.to(model.device, model.dtype) if k == "pixel_values" else v.to(model.device) for k, v in x.items()}


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


@torch.inference_mode()
def _run_one(model, processor, dataset, idx_all, prompt, batch_size, max_new_tokens, timer):
    rows = []
    for idx in _batches(len(idx_all), batch_size):
        items = [dataset[idx_all[i]] for i in idx]
        inputs = model_inputs(model, processor, items, prompt)
        synchronize(model.device)
        timer["t0"] = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1]:]
        preds = processor.batch_decode(new, skip_special_tokens=True)
        state = getattr(model, "svdprune", None)
        kept = state.kept_indices if state is not None else None
        for j, (it, pred) in enumerate(zip(items, preds)):
            mask = it.get("mask")
            rec = float("nan")
            if mask is not None and kept is not None:
                rec = region_recall(kept[j], mask)
            elif mask is not None:
                rec = 1.0  # nothing pruned
            rows.append({
                "index": idx_all[idx.start + j], "qtype": it.get("qtype", "all"), "prediction": pred.strip(),
                "answer": answers_of(it)[0], "score": vqa_score(pred, answers_of(it)), "region_recall": rec,
                "prefill_s": timer["times"][-1] / len(items) if timer["times"] else float("nan"),
            })
    return rows


def evaluate(
    model,
    processor,
    dataset: Sequence[dict],
    methods: Sequence[str] = ("svd",),
    budgets: Sequence[int] = (576, 64),
    *,
    limit: int | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 4,
    prompt: str = LLAVA_PROMPT,
    patch_kwargs: dict | None = None,
    return_samples: bool = False,
    progress: bool = True,
):
    """Accuracy, per-type accuracy, answer-region recall and prefill time for every method × budget.

    The model is patched for each (method, budget) with ``patch_llava(model, method, budget,
    **patch_kwargs)`` (e.g. ``feature=``, ``fastv_layer=``, ``positions=``, selector signals such as ``rank=``) and
    unpatched afterwards (also on error); it is left as it came. Decoding is greedy, so the table is deterministic on a given machine.

    Returns a DataFrame with one row per (method, budget): ``tokens`` (image tokens per image that reach the last
    decoder layer: the budget, or for sparsevlm, whose budget is an average over layers, its last count; what each
    layer processes: :func:`~svdprune_utils.analysis.efficiency.llm_tokens`), ``accuracy``, ``acc_<qtype>`` per
    question type, ``region_recall`` (mean over samples with a
    mask), ``prefill_ms`` (mean per sample, batched) and ``n``. With ``return_samples`` also the
    per-sample table (prediction, answer, score, recall).
    """
    if not methods or not budgets:
        raise ValueError("methods and budgets must not be empty")
    n = len(dataset) if limit is None else min(int(limit), len(dataset))
    if n <= 0:
        raise ValueError("the dataset is empty (or limit <= 0)")
    index = list(range(n))
    n_img = tokens_per_image(model)
    for i in index:  # every record is checked before the model runs
        check_record(dataset[i], f"dataset record {i}", n_img)
    samples = []
    jobs = [(m, int(b)) for m in methods for b in budgets]
    bar = tqdm(jobs, desc="method x budget", disable=not progress)
    for method, budget in bar:
        bar.set_postfix_str(f"{method}@{budget}")
        patch_llava(model, method=method, budget=budget, **(patch_kwargs or {}))
        try:
            with _prefill_timer(model) as timer:
                rows = _run_one(model, processor, dataset, index, prompt, batch_size, max_new_tokens, timer)
            kept = model.svdprune.kept_indices
        finally:
            unpatch_llava(model)
        tokens = min(budget, n_img) if kept is None else int(kept.shape[1])
        for r in rows:
            r.update(method=method, budget=budget, tokens=tokens)
        samples.extend(rows)
    per = pd.DataFrame(samples)
    keys = ["method", "budget", "tokens"]
    summary = per.groupby(keys, sort=False).agg(
        accuracy=("score", "mean"), region_recall=("region_recall", "mean"),
        prefill_ms=("prefill_s", lambda s: 1e3 * s.mean()), n=("score", "size")).reset_index()
    by_type = per.pivot_table(index=keys, columns="qtype", values="score", aggfunc="mean", sort=False)
    by_type.columns = [f"acc_{c}" for c in by_type.columns]
    summary = summary.merge(by_type.reset_index(), on=keys)
    return (summary, per) if return_samples else summary


def load_model(name_or_path: str, device: str = "auto", dtype: str = "auto"):
    """(model, processor) for a LLaVA checkpoint: the embedded ``data/...`` directory or a hub id such as
    ``llava-hf/llava-1.5-7b-hf`` (same code path). ``device="auto"``: CUDA when present, else CPU;
    ``dtype="auto"``: fp16 on CUDA, fp32 on CPU (or "fp16", "bf16", "fp32"). Eval mode."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from ..testbed.tiny import auto_device

    dev = auto_device(device)
    dtypes = {"auto": torch.float16 if dev.type == "cuda" else torch.float32, "fp16": torch.float16,
              "bf16": torch.bfloat16, "fp32": torch.float32}
    if dtype not in dtypes:
        raise ValueError(f"dtype must be one of {sorted(dtypes)}, got {dtype!r}")
    model = LlavaForConditionalGeneration.from_pretrained(name_or_path, dtype=dtypes[dtype]).to(dev).eval()
    return model, AutoProcessor.from_pretrained(name_or_path)


def load_vqa(source: str, split: str = "validation", limit: int | None = None) -> list[dict]:
    """A VQA dataset as a list of dicts (image, question, answers[, qtype]).

    ``source``: a local ``.json`` file — a list of records ``{"image": "relative/or/absolute.png",
    "question": ..., "answers": [...] or "answer": ...}`` — or a Hugging Face dataset id loaded with
    ``datasets.load_dataset(source, split=split)`` (columns ``image``, ``question`` and ``answers`` or
    ``answer``; GQA/TextVQA style). Nothing is downloaded for a local file.
    """
    path = pathlib.Path(source)
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"dataset file not found: {path}")
        try:
            records = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(records, list):
            raise ValueError(f"{path} must hold a JSON list of records")
        if not records:
            raise ValueError(f"{path} holds no records (an empty list)")
        records = records[:limit] if limit else records
        for i, r in enumerate(records):  # every record is checked before any image is read
            check_record(r, f"record {i} of {path}")
            if not isinstance(r.get("image"), str):
                raise ValueError(f"record {i} of {path}: 'image' must be a path string, got {r.get('image')!r}")
            if "answer" in r and "answers" in r:
                raise ValueError(f"record {i} of {path}: both 'answer' and 'answers' given; give one")
            if not all(a.strip() for a in answers_of(r)):
                raise ValueError(f"record {i} of {path}: 'answers' must not hold empty strings, got "
                                 f"{r.get('answers', r.get('answer'))!r}")
        out = []
        for i, r in enumerate(records):
            img = pathlib.Path(r["image"])
            img = img if img.is_absolute() else path.parent / img
            if not img.is_file():
                raise FileNotFoundError(f"record {i} of {path}: image not found: {img}")
            try:
                with Image.open(img) as im:
                    rgb = to_rgb(im)  # reads every pixel: a truncated file fails here, not in the model
            except (OSError, SyntaxError, Image.DecompressionBombError) as e:  # UnidentifiedImageError is an OSError
                raise ValueError(f"record {i} of {path}: 'image' {img} is not a readable image "
                                 f"({type(e).__name__})") from None
            out.append({**{k: v for k, v in r.items() if k != "answer"}, "image": rgb, "answers": answers_of(r)})
        return out
    from datasets import load_dataset  # the hub path: needs network or a populated HF cache

    ds = load_dataset(source, split=split)
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    out = [{"image": r["image"], "question": r["question"], "answers": answers_of(r),
            "qtype": r.get("question_type", "all")} for r in ds]
    if not out:
        raise ValueError(f"{source} split {split!r} holds no records")
    for i, r in enumerate(out):  # before the model runs
        check_record(r, f"record {i} of {source}")
    return out
