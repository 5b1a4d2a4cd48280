"""Fast, exact ablations: run the vision tower once per image, then try many selectors × budgets.

``evaluate`` re-runs the whole model for every (method, budget), although the tower, the projector and
the selection signals do not depend on the budget. Here :func:`encode` calls ``get_image_features``
once per image (the call the patch wraps) and caches, in a :class:`FeatureCache`, the patch features of
the requested tower layers, the projected features, the CLS→patch attention at the feature layer, the
tokenized prompts, answers and answer-region masks. :func:`evaluate_cached` then selects with
``reduce_tokens`` (every selector, and VisionZip's merge) on the cached features and answers greedily with
``generate`` on the inputs the patched ``generate`` builds, by the same apply step
(:func:`svdprune_utils.hf.inputs.keep_image_tokens`, kept projected features as ``mm_encoder_outputs``), so the
answers are the faithful path's (``tests/test_ablation.py``).
The peers' signals are cached too (the CLS→patch attention, mean and sum over heads, and the feature layer's
keys for VisPruner and VisionZip; CDPruner's instruction relevance, :func:`~svdprune_utils.hf.signals.
instruction_relevance`), and VisionZip's merged tokens are projected as the patch projects them. FastV and SparseVLM,
which prune inside the language model, run the patched model with the cached projected features passed as
``mm_encoder_outputs`` (:func:`answer_in_llm`). Answers are memoised per (sample, kept set): configurations that
keep the same tokens share one language-model run.

A configuration is ``{"method": <SELECTORS key>, "feature": "vision" | "projected" | int, **signals}``:
``feature`` (default: the method's, ``selectors.default_feature`` — "projected" for divprune, else "vision" =
``vision_feature_layer``) is what the selector scores (an int: another
``hidden_states`` layer, CLS dropped); the language model always receives the projected features of
``vision_feature_layer``, as in the patch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm  # text bars: the same in a terminal and a notebook (no ipywidgets here)

from ..core.reduction import REDUCERS, reduce_tokens
from ..core.selection import default_feature, score_tokens, top_k
from ..core.validate import check_budget, unit_scale
from ..hf.attention import vision_cls_attention
from ..hf.fastv import default_layer
from ..hf.inputs import keep_image_tokens, kept_features
from ..hf.prune import IN_LLM, merged_to_llm, pad_id
from ..hf.signals import CLS_HEADS, NEEDS_KEYS, USER_RELEVANCE, instruction_relevance
from .evaluate import LLAVA_PROMPT, answers_of, model_inputs, vqa_score

__all__ = ["FeatureCache", "encode", "select_cached", "reduce_cached", "answer_cached", "answer_in_llm", "answer_fastv",
           "residuals", "budget_table", "evaluate_cached"]


@dataclass
class FeatureCache:
    """What :func:`encode` keeps of ``n`` samples (tensors on the model's device, model dtype).

    features: {"projected": (n, N, d_text)} plus {layer: (n, N, d_vision)} for every requested tower
        layer (negative indices into ``hidden_states``; CLS dropped under the "default" strategy);
    attention: (n, N) CLS→patch attention at the feature layer, heads averaged (or None); attention_sum: the
        same summed over heads (VisionZip's); keys: (n, N, head_dim) that layer's keys averaged over heads
        (VisionZip's merge metric); relevance: (n, N) fp64 CDPruner's instruction relevance as the patch computes
        it (:func:`~svdprune_utils.hf.signals.instruction_relevance`);
    prompts: n unpadded 1-D ``input_ids`` with N image placeholders each;
    answers / qtypes: reference answers (lists) and question types; masks: (n, N) bool answer
        regions or None; feature_layer: the model's ``vision_feature_layer``; grid: (H, W) patch grid.
    """

    features: dict
    attention: torch.Tensor | None
    prompts: list
    answers: list
    qtypes: list
    masks: torch.Tensor | None
    feature_layer: int
    grid: tuple[int, int]
    n_hidden: int = 0  # number of tower hidden states (layers + embeddings)
    # (sample, K, kept bytes[, tag]) -> answer; ("scores" | "reduce", ...) -> a memoised selection
    memo: dict = field(default_factory=dict, repr=False)
    sigma2: torch.Tensor | None = field(default=None, repr=False)  # squared singular values of feature("vision")
    attention_sum: torch.Tensor | None = field(default=None, repr=False)
    keys: torch.Tensor | None = field(default=None, repr=False)
    relevance: torch.Tensor | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.prompts)

    def n_answers(self) -> int:
        """How many distinct language-model answers the memo holds (its selections not counted)."""
        return sum(1 for key in self.memo if isinstance(key[0], int))

    def feature(self, key: Any = "vision") -> torch.Tensor:
        """(n, N, d) features for a configuration's ``feature`` key ("vision", "projected" or a layer)."""
        key = self.feature_layer if key == "vision" else key
        if isinstance(key, (int, np.integer)) and key >= 0:
            key = int(key) - self.n_hidden
        if key not in self.features:
            raise KeyError(f"feature {key!r} was not cached; cached: {list(self.features)} (pass layers= to encode)")
        return self.features[key]


def _negative(i: int, n: int) -> int:
    """A ``hidden_states`` index as its negative form (n = number of hidden states)."""
    i = int(i)
    if not -n <= i < n:
        raise ValueError(f"layer {i} out of range for {n} hidden states")
    return i - n if i >= 0 else i


def _left_pad(rows: list, pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of 1-D id rows, padded on the left (as the processor pads)."""
    ids = pad_sequence(rows, batch_first=True, padding_value=pad, padding_side="left")
    mask = pad_sequence([torch.ones_like(r) for r in rows], batch_first=True, padding_value=0, padding_side="left")
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def encode(model, processor, dataset: Sequence[dict], *, limit: int | None = None, layers: Sequence[int] = (),
           prompt: str = LLAVA_PROMPT, batch_size: int = 16, attention: bool = True,
           progress: bool = False) -> FeatureCache:
    """Run the vision tower (+ projector) once per sample of ``dataset`` and cache what ablations need.

    layers: extra tower layers to keep (negative ``hidden_states`` indices; the feature layer is always
    kept). attention: also keep the CLS→patch attention and keys (for ``cls_attention``, ``vispruner`` and
    ``visionzip``). CDPruner's relevance is always kept. The prompts come from ``processor`` exactly as in
    ``evaluate`` (``prompt.format(question=...)``).
    """
    n = len(dataset) if limit is None else min(int(limit), len(dataset))
    if n <= 0:
        raise ValueError("the dataset is empty (or limit <= 0)")
    layer = model.config.vision_feature_layer
    if not isinstance(layer, int):
        raise NotImplementedError("encode needs a single int vision_feature_layer")
    strategy = model.config.vision_feature_select_strategy
    n_layers = model.config.vision_config.num_hidden_layers + 1
    keep = sorted({_negative(i, n_layers) for i in (layer, *layers)}, reverse=True)
    feats = {k: [] for k in ["projected", *keep]}
    att, att_sum, keys, relevance, prompts, answers, qtypes, masks = [], [], [], [], [], [], [], []
    first = 1 if strategy == "default" else 0
    for start in tqdm(range(0, n, batch_size), desc="encode", disable=not progress, leave=False):
        items = [dataset[i] for i in range(start, min(n, start + batch_size))]
        inputs = model_inputs(model, processor, items, prompt)
        with vision_cls_attention(model, layer, keys=True) if attention else contextlib.nullcontext({}) as box:
            out = model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                 vision_feature_layer=layer,
                                                 vision_feature_select_strategy=strategy, return_dict=True,
                                                 output_hidden_states=True)
        feats["projected"].append(torch.stack(list(out.pooler_output)))
        img = inputs["input_ids"] == model.config.image_token_id
        relevance.append(instruction_relevance(model, inputs, img, torch.arange(len(items)), list(out.pooler_output)))
        for k in keep:
            h = out.hidden_states[k]
            feats[k].append(h[:, 1:] if strategy == "default" else h)
        if attention:
            att.append(box["cls"].mean(1)[:, first:])
            att_sum.append(box["cls"].sum(1)[:, first:])
            keys.append(box["keys"][:, first:])
        for ids, m in zip(inputs["input_ids"], inputs["attention_mask"]):
            prompts.append(ids[m.bool()].cpu().clone())
        for it in items:
            answers.append(answers_of(it))
            qtypes.append(it.get("qtype", "all"))
            masks.append(None if it.get("mask") is None else np.asarray(it["mask"], dtype=bool).ravel())
    features = {k: torch.cat(v) for k, v in feats.items()}
    N = features["projected"].shape[1]
    side = int(round(N**0.5))
    m = None if any(x is None for x in masks) else torch.as_tensor(np.stack(masks))
    return FeatureCache(features=features, attention=torch.cat(att) if attention else None, prompts=prompts,
                        answers=answers, qtypes=qtypes, masks=m,
                        feature_layer=_negative(layer, n_layers), grid=(side, N // side),
                        n_hidden=n_layers, attention_sum=torch.cat(att_sum) if attention else None,
                        keys=torch.cat(keys) if attention else None, relevance=torch.cat(relevance))


def _signals(cache: FeatureCache, method: str, rows: torch.Tensor) -> dict:
    """The signals the patch would compute for ``method`` on the cached ``rows``."""
    if method in CLS_HEADS:
        if cache.attention is None:
            raise ValueError(f"{method} needs encode(..., attention=True)")
        att = cache.attention_sum if CLS_HEADS[method] == "sum" else cache.attention
        out = {"attention": att[rows.to(att.device)]}
        if method in NEEDS_KEYS:
            out["keys"] = cache.keys[rows.to(cache.keys.device)]
        return out
    if method == "cdpruner":
        return {"relevance": cache.relevance[rows.to(cache.relevance.device)]}
    return {}


def reduce_cached(cache: FeatureCache, config: Mapping, budget: int, samples: Sequence[int] | None = None,
                  chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(kept (n, min(K, N)), features) of the cached ``samples`` (default all) for one configuration, as the
    patch's selection step computes them (``reduce_tokens(...).in_raster_order()``): ``features`` is None for a
    selection, the (n, K, d) merged features in the scored space for a merging method (VisionZip). Memoised in
    ``cache.memo`` when every value of ``config`` is a plain scalar, string or tuple (the memo key is its repr)."""
    cfg = dict(config)
    method = cfg.pop("method", "svd")
    if method in IN_LLM:
        raise ValueError(f"{method} prunes inside the language model: no kept set before it runs "
                         "(see answer_in_llm)")
    bad = sorted(k for k in USER_RELEVANCE if k in cfg)
    if method == "cdpruner" and bad:
        raise ValueError(f"cdpruner on the cache uses the cached relevance (the patch's variant); {bad} are "
                         "per-call signals: use evaluate() with patch_kwargs for them")
    key = cfg.pop("feature", default_feature(method))
    if method in REDUCERS and key not in ("vision", "projected"):
        raise ValueError(f"{method} merges features the projector then reads: feature must be 'vision' or "
                         f"'projected', got {key!r}")
    X = cache.feature(key)
    rows = torch.arange(X.shape[0]) if samples is None else torch.as_tensor(list(samples), dtype=torch.long)
    if check_budget(budget) >= X.shape[1]:  # every token kept, as the patch keeps them: no selector runs (at K = N
        return torch.arange(X.shape[1], device=X.device).expand(len(rows), -1).clone(), None  # it would cost seconds)
    if cache.grid[0] * cache.grid[1] == X.shape[1]:
        cfg.setdefault("grid", cache.grid)
    if method == "svd" and cfg.get("rank") is not None and budget < X.shape[1]:
        # a fixed rank rule gives budget-independent scores: compute them once per configuration
        mkey = ("scores", repr(sorted(config.items(), key=str)))
        if mkey not in cache.memo:
            kw = {k: v for k, v in cfg.items() if k != "grid"}
            cache.memo[mkey] = torch.cat([score_tokens(X[s:s + chunk], "svd", **kw) for s in range(0, len(X), chunk)])
        return top_k(cache.memo[mkey][rows.to(X.device)], budget), None  # = select_svd (top_k of the same scores)
    plain = all(isinstance(v, (str, int, float, bool, type(None), tuple)) for v in config.values())
    rkey = ("reduce", repr(sorted(config.items(), key=str)), int(budget), tuple(rows.tolist())) if plain else None
    if rkey in cache.memo:  # the same selection asked again (e.g. a table after evaluate_cached): no re-run
        kept, feats = cache.memo[rkey]
        return kept.clone(), (None if feats is None else feats.clone())  # the caller may change its copy
    kept, feats = [], []
    for s in range(0, len(rows), chunk):
        r = rows[s:s + chunk]
        red = reduce_tokens(X[r.to(X.device)], budget, method=method, **cfg, **_signals(cache, method, r))
        red = red.in_raster_order()
        kept.append(red.kept)
        feats.append(red.features)
    out = torch.cat(kept), (None if feats[0] is None else torch.cat(feats))
    if rkey is not None:
        cache.memo[rkey] = (out[0].clone(), None if out[1] is None else out[1].clone())
    return out


def select_cached(cache: FeatureCache, config: Mapping, budget: int, samples: Sequence[int] | None = None,
                  chunk: int = 64) -> torch.Tensor:
    """Kept indices (n, min(K, N)) of the cached ``samples`` (default all) for one configuration (for a merging
    method, the patches its output tokens stand at: :func:`reduce_cached`)."""
    return reduce_cached(cache, config, budget, samples, chunk)[0]


@torch.inference_mode()
def answer_cached(model, processor, cache: FeatureCache, samples: Sequence[int], kept: torch.Tensor, *,
                  features: torch.Tensor | None = None, tag: Any = None, max_new_tokens: int = 4,
                  batch_size: int = 16) -> list[str]:
    """Greedy answers of ``samples`` when each keeps the tokens ``kept`` (len(samples), K) — the inputs
    the patched ``generate`` builds, by the same function (:func:`svdprune_utils.hf.inputs.keep_image_tokens`:
    placeholders cut to K, padding on the left; the K kept projected features as ``mm_encoder_outputs``).
    ``features`` (len(samples), K, d_text): the LLM-space features to place instead (a merging method's), with
    ``tag`` naming what made them (part of the memo key). Memoised in ``cache.memo``."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    image_id = model.config.image_token_id
    pad = pad_id(model)
    proj = cache.features["projected"]
    N, K = proj.shape[1], kept.shape[1]
    if features is not None and tag is None:
        raise ValueError("answer_cached: features need a tag naming what made them (the memo key)")
    keys = [(int(i), K, kept[j].cpu().numpy().tobytes()) + (() if features is None else (tag,))
            for j, i in enumerate(samples)]
    todo = [j for j, key in enumerate(keys) if key not in cache.memo]
    for s in range(0, len(todo), batch_size):
        part = todo[s:s + batch_size]
        ids, mask = _left_pad([cache.prompts[samples[j]] for j in part], pad, proj.device)
        rows = kept[part].to(proj.device)
        x = keep_image_tokens({"input_ids": ids, "attention_mask": mask}, rows, image_mask=ids == image_id,
                              tokens_per_image=N, pad_token_id=pad)
        if features is None:
            feats = kept_features([proj[samples[j]] for j in part], rows)
        else:
            feats = list(features[torch.as_tensor(part, device=features.device)].to(proj))
        images = BaseModelOutputWithPooling(pooler_output=feats)
        out = model.generate(input_ids=x["input_ids"], attention_mask=x["attention_mask"],
                             mm_encoder_outputs={"image": images}, max_new_tokens=max_new_tokens, do_sample=False)
        texts = processor.batch_decode(out[:, x["input_ids"].shape[1]:], skip_special_tokens=True)
        for j, text in zip(part, texts):
            cache.memo[keys[j]] = text.strip()
    return [cache.memo[key] for key in keys]


@torch.inference_mode()
def answer_in_llm(model, processor, cache: FeatureCache, samples: Sequence[int], budget: int, method: str = "fastv",
                  *, max_new_tokens: int = 4, batch_size: int = 16, **patch_kwargs):
    """An in-LLM method (FastV, SparseVLM) on cached features: the model patched with ``method`` (and
    ``patch_kwargs``, e.g. ``fastv_layer``) generates from the full prompts (N placeholders) with the cached
    projected features passed as ``mm_encoder_outputs`` (the tower is not re-run; the language model runs as in
    the faithful path). Returns (answers, kept (len(samples), K): the image tokens that reach the last decoder
    layer); memoised."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    from ..hf.patch import patch_llava, unpatch_llava

    if method not in IN_LLM:
        raise ValueError(f"answer_in_llm runs the in-LLM methods {IN_LLM}, got {method!r}")
    if method == "fastv" and patch_kwargs.get("fastv_layer") is None:
        patch_kwargs["fastv_layer"] = default_layer(model)
    proj = cache.features["projected"]
    N = proj.shape[1]
    if budget >= N:  # nothing pruned: the same run as any method at full budget
        kept = torch.arange(N).expand(len(samples), -1)
        return answer_cached(model, processor, cache, samples, kept, max_new_tokens=max_new_tokens,
                             batch_size=batch_size), kept
    tag = (method, int(budget), repr(sorted(patch_kwargs.items(), key=str)))
    keys = [(int(i), *tag) for i in samples]
    todo = [j for j, key in enumerate(keys) if key not in cache.memo]
    pad = pad_id(model)
    if todo:
        patch_llava(model, method=method, budget=budget, **patch_kwargs)
        try:
            for s in range(0, len(todo), batch_size):
                part = todo[s:s + batch_size]
                rows = [cache.prompts[samples[j]] for j in part]
                ids, mask = _left_pad(rows, pad, proj.device)
                images = BaseModelOutputWithPooling(pooler_output=[proj[samples[j]] for j in part])
                out = model.generate(input_ids=ids, attention_mask=mask, mm_encoder_outputs={"image": images},
                                     max_new_tokens=max_new_tokens, do_sample=False)
                texts = processor.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
                for j, text, k in zip(part, texts, model.svdprune.kept_indices.cpu()):
                    cache.memo[keys[j]] = (text.strip(), k)
        finally:
            unpatch_llava(model)
    got = [cache.memo[key] for key in keys]
    return [g[0] for g in got], torch.stack([g[1] for g in got])


def answer_fastv(model, processor, cache: FeatureCache, samples: Sequence[int], budget: int, *,
                 fastv_layer: int | None = None, max_new_tokens: int = 4, batch_size: int = 16):
    """FastV on cached features (:func:`answer_in_llm` with ``method="fastv"``), pruning at layer
    ``fastv_layer`` (default min(2, LLM layers − 1)). Returns (answers, kept (len(samples), K)); memoised."""
    return answer_in_llm(model, processor, cache, samples, budget, "fastv", fastv_layer=fastv_layer,
                         max_new_tokens=max_new_tokens, batch_size=batch_size)


def residuals(X: torch.Tensor, kept: torch.Tensor, sigma2: torch.Tensor | None = None):
    """Batched :func:`~svdprune_utils.core.metrics.projection_residual` and its Eckart–Young floor.

    X: (n, N, d); kept: (n, K); sigma2: X's squared singular values (n, min(N, d)) if already known.
    Returns numpy (residual, floor), each (n,): ‖X − X P_S‖²_F / ‖X‖²_F with P_S the projector onto the
    span of the kept rows, and Σ_{j>K} σ_j² / Σ σ_j². fp64; the span comes from the eigenvectors of the
    kept rows' smaller Gram matrix (eigenvalues above max(K, d)·ε·λ_max), agreeing with the metric to ~1e-9.
    """
    A = unit_scale(X)  # the ratios are scale-invariant; O(1) entries keep the squares finite
    n, N, d = A.shape
    K = kept.shape[1]
    if sigma2 is None:
        sig2 = torch.linalg.svdvals(A) ** 2
    else:  # the caller's σ² of X, rescaled like A
        sig2 = sigma2.to(A) * (A.abs().amax(dim=(1, 2)) / X.double().abs().amax(dim=(1, 2)).clamp_min(1e-300))[:, None] ** 2
    total = sig2.sum(1).clamp_min(torch.finfo(torch.float64).tiny)
    floor = (sig2[:, K:].sum(1) / total).cpu().numpy()
    if K >= N:
        return np.zeros(n), floor
    S = A.gather(1, kept.to(A.device)[..., None].expand(-1, -1, d))  # (n, K, d)
    G = S.transpose(1, 2) @ S if d <= K else S @ S.transpose(1, 2)
    lam, W = torch.linalg.eigh(G)
    ok = lam > lam[:, -1:] * max(K, d) * torch.finfo(torch.float64).eps
    # orthonormal basis of the row span: W itself (d <= K), else Sᵀ W Λ^{-1/2}
    V = W if d <= K else (S.transpose(1, 2) @ W) / lam.clamp_min(torch.finfo(torch.float64).tiny).sqrt()[:, None, :]
    V = V * ok[:, None, :]
    res = (1.0 - ((A @ V) ** 2).sum(dim=(1, 2)) / total).clamp_min(0.0)
    return res.cpu().numpy(), floor


def budget_table(summary: pd.DataFrame, value: str = "accuracy", scale: float = 100.0, digits: int = 1):
    """Wide view of a summary: configurations (in table order) × budgets (descending), ``value`` × ``scale``."""
    t = summary.pivot(index="config", columns="budget", values=value)
    t = t.loc[list(dict.fromkeys(summary["config"])), sorted(t.columns, reverse=True)]
    return (scale * t).round(digits)


def evaluate_cached(model, processor, cache: FeatureCache, configs: Mapping[str, Mapping],
                    budgets: Sequence[int] = (576, 64), *, samples: Sequence[int] | None = None,
                    max_new_tokens: int = 4, batch_size: int = 16, residual: bool = True,
                    return_samples: bool = False, progress: bool = False):
    """Accuracy, per-type accuracy, answer-region recall and projection residual for configs × budgets.

    configs: {name: {"method": ..., "feature": ..., **signals}}; samples: cached sample indices (default
    all). The residual and its Eckart–Young floor are measured on the feature-layer patch features (one
    reference for every configuration). Returns a DataFrame with one row per (config, budget):
    ``config``, ``method``, ``budget``, ``tokens``, ``accuracy``, ``region_recall`` (NaN without
    masks), ``residual``, ``floor``, ``n``, ``acc_<qtype>``; with ``return_samples`` also the
    per-sample table (prediction, answer, score, recall, residual).
    """
    if not configs or not budgets:
        raise ValueError("configs and budgets must not be empty")
    samples = list(range(len(cache))) if samples is None else [int(i) for i in samples]
    bad = [i for i in samples if not 0 <= i < len(cache)]
    if bad:
        raise ValueError(f"samples must index the {len(cache)} cached questions; got {bad[:5]}")
    ref = cache.feature("vision")
    rows_t = torch.as_tensor(samples, device=ref.device)
    ref = ref[rows_t]
    n, N = ref.shape[:2]
    if residual:
        if cache.sigma2 is None:  # the floor needs X's spectrum once, not once per configuration
            cache.sigma2 = torch.linalg.svdvals(cache.feature("vision").double()) ** 2
        sig2 = cache.sigma2[rows_t]
    masks = None if cache.masks is None else cache.masks.to(ref.device)[rows_t]
    rows = []
    for name, budget in tqdm([(c, int(b)) for c in configs for b in budgets], desc="config x budget",
                             disable=not progress):
        cfg = configs[name]
        method = cfg.get("method", "svd")
        if method in IN_LLM:
            extra = {k: v for k, v in cfg.items() if k != "method"}
            preds, kept = answer_in_llm(model, processor, cache, samples, budget, method,
                                        max_new_tokens=max_new_tokens, batch_size=batch_size, **extra)
        else:
            kept, merged = reduce_cached(cache, cfg, budget, samples)
            tag = None
            if merged is not None:  # a merging method: the LLM reads its merged tokens, projected as the patch does
                space = "projected" if cfg.get("feature", default_feature(method)) == "projected" else "vision"
                with torch.inference_mode():
                    merged = merged_to_llm(model, merged, space)
                tag = (method, budget, repr(sorted(cfg.items(), key=str)))
            preds = answer_cached(model, processor, cache, samples, kept, features=merged, tag=tag,
                                  max_new_tokens=max_new_tokens, batch_size=batch_size)
        kept = kept.to(ref.device)
        res = flo = np.full(n, np.nan)
        if residual:
            res, flo = residuals(ref, kept, sig2)
        rec = np.full(n, np.nan)
        if masks is not None:
            tot = masks.sum(1).double()
            rec = torch.where(tot > 0, masks.gather(1, kept).sum(1) / tot.clamp_min(1), torch.nan).cpu().numpy()
        for j, i in enumerate(samples):
            rows.append(dict(config=name, method=method, budget=budget, tokens=int(kept.shape[1]),
                             index=i, qtype=cache.qtypes[i], prediction=preds[j], answer=cache.answers[i][0],
                             score=vqa_score(preds[j], cache.answers[i]), region_recall=float(rec[j]),
                             residual=float(res[j]), floor=float(flo[j])))
    per = pd.DataFrame(rows)
    keys = ["config", "method", "budget", "tokens"]
    summary = per.groupby(keys, sort=False).agg(
        accuracy=("score", "mean"), region_recall=("region_recall", "mean"), residual=("residual", "mean"),
        floor=("floor", "mean"), n=("score", "size")).reset_index()
    by_type = per.pivot_table(index=keys, columns="qtype", values="score", aggfunc="mean", sort=False)
    by_type.columns = [f"acc_{c}" for c in by_type.columns]
    summary = summary.merge(by_type.reset_index(), on=keys)
    return (summary, per) if return_samples else summary
