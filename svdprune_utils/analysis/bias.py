"""Positional bias of attention-based token scores (notebook 02): theory helpers and measurements.

Theory, no model needed:

- :func:`causal_received` — attention each key receives, averaged over the queries of a causal
  (lower-triangular, row-softmax) attention matrix; :func:`uniform_causal_received` its closed form for
  uniform attention, (H_n − H_j)/n with H the harmonic numbers: early keys win even without content.
- :func:`rope_logits` / :func:`rope_decay` — q·k logits after the model's own rotary embedding, at
  chosen positions; the decay of the mean logit with the query–key distance.

Measurements on a LLaVA (transformers 5.24, Llama decoder; unpatched model):

- :func:`collect_scores` — per-image token scores on the patch grid from one forward per batch:
  FastV's last-token attention, attention averaged over all queries (raw and debiased), CLS
  attention, feature norm, rank-k leverage, and a random control.
- :func:`decoder_qk` — pre-RoPE queries and keys of one decoder layer.
- :func:`attention_shares` — per layer, the share of the response tokens' attention that goes to
  the system prefix, the image, the instruction and the response so far (the paper's Fig. 1).
- :func:`mean_rank_map`, :func:`kept_frequency`, :func:`positional_table`, :func:`answer_band` —
  statistics over a dataset of score vectors (numpy in, numpy/pandas out).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.stats
import torch

from ..core.leverage import leverage_scores
from ..core.metrics import grid_shape, positional_bias, spatial_stats
from ..core.selection import top_k
from ..hf.attention import attention_probs, probing
from .evaluate import LLAVA_PROMPT, model_inputs

__all__ = ["causal_received", "uniform_causal_received", "rope_logits", "rope_decay", "decoder_qk",
           "model_inputs", "collect_scores", "attention_shares", "mean_rank_map", "kept_frequency", "positional_table",
           "answer_band", "SEGMENTS"]

SEGMENTS = ("system", "image", "instruction", "response")


# ------------------------------------------------------------------------------------------ theory
def causal_received(logits: torch.Tensor, normalize: str = "all") -> torch.Tensor:
    """Attention received by each key of a causal self-attention with (n, n) ``logits`` (row = query).

    A = softmax over j ≤ i of logits[i, j]. ``normalize``: "all" → (1/n) Σ_i A_ij (the plain average
    over every query; sums to 1); "visible" → the mean over the n − j queries that can see key j;
    "debiased" → the mean over those queries of A_ij·(i+1), i.e. attention relative to uniform
    attention over the visible prefix (exactly 1 for uniform attention). Returns (n,) float64.
    """
    n = logits.shape[-1]
    if logits.shape != (n, n):
        raise ValueError(f"logits must be square (n, n), got {tuple(logits.shape)}")
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    A = torch.softmax(logits.double().masked_fill(~causal, -torch.inf), dim=-1)
    visible = torch.arange(n, 0, -1, dtype=torch.float64)  # queries i >= j
    if normalize == "all":
        return A.sum(0) / n
    if normalize == "visible":
        return A.sum(0) / visible
    if normalize == "debiased":
        return (A * torch.arange(1, n + 1, dtype=torch.float64)[:, None]).sum(0) / visible
    raise ValueError(f"normalize must be 'all', 'visible' or 'debiased', got {normalize!r}")


def uniform_causal_received(n: int) -> np.ndarray:
    """Closed form of ``causal_received(zeros((n, n)), "all")``: r_j = (H_n − H_j)/n, j = 0..n−1,
    where H_m = Σ_{t ≤ m} 1/t (key j is seen by queries i ≥ j, each giving it 1/(i+1))."""
    H = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, n + 1))])
    return (H[n] - H[:n]) / n


def _rotary(model):
    """(rotary embedding module, rotate-half apply function, logit scale) of the language model. The
    apply function is transformers' public Llama one: the rotate-half RoPE that Llama, Vicuna, Mistral and
    Qwen2 decoders share (their ``apply_rotary_pos_emb`` are copies of it)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    lm = model.model.language_model
    return lm.rotary_emb, apply_rotary_pos_emb, lm.layers[0].self_attn.scaling


def rope_logits(model, q: torch.Tensor, k: torch.Tensor, q_pos, k_pos) -> torch.Tensor:
    """Scaled logits q·kᵀ/√d after the model's own rotary embedding, queries at ``q_pos``, keys at ``k_pos``.

    q: (B, H, Q, hd) and k: (B, H_kv, K, hd) pre-RoPE (from :func:`decoder_qk`); positions: (Q,), (K,).
    Returns fp32 (B, H, Q, K). RoPE makes the result depend on q_pos − k_pos only.
    """
    rotary, apply, scale = _rotary(model)
    q, k = q.float(), k.float()
    cq, sq = rotary(q, torch.as_tensor(q_pos, device=q.device)[None])
    ck, sk = rotary(k, torch.as_tensor(k_pos, device=k.device)[None])
    q, _ = apply(q, q, cq.float(), sq.float())
    _, k = apply(k, k, ck.float(), sk.float())
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # GQA
    return torch.matmul(q, k.transpose(-1, -2)) * scale


def rope_decay(model, q: torch.Tensor, k: torch.Tensor, distances) -> torch.Tensor:
    """Mean logit of each query over the keys, as a function of the query–key distance.

    q: (B, H, hd), one query per sample; k: (B, H_kv, K, hd); each query is placed ``distances``
    (D,) positions after its keys. The logit is linear in k, so the mean over keys is the logit
    against the mean key. Returns fp32 (B, H, D).
    """
    d = torch.as_tensor(distances)
    qd = q[:, :, None, :].expand(-1, -1, len(d), -1)
    kbar = k.float().mean(2, keepdim=True)
    return rope_logits(model, qd, kbar, d, torch.zeros(1, dtype=torch.long))[..., 0]


# ------------------------------------------------------------------------------ model measurements
class _Stop(Exception):
    pass


@torch.no_grad()
def decoder_qk(model, inputs: dict, layer: int) -> dict:
    """Pre-RoPE queries and keys of LLM decoder layer ``layer`` for ``model(**inputs)``.

    Read from forward hooks on that layer's ``q_proj``/``k_proj`` (their outputs, split into heads).
    Returns {"q": (B, H, S, hd), "k": (B, H_kv, S, hd)} fp32 on the model's device; the forward stops
    once both are seen (later layers are not run).
    """
    attn = model.model.language_model.layers[layer].self_attn
    if hasattr(attn, "q_norm"):
        raise NotImplementedError("decoder_qk reads q_proj/k_proj outputs; this decoder normalises them after")
    box = {}

    def hook(name, module, args, out):
        B, S, _ = out.shape
        box[name] = out.view(B, S, -1, attn.head_dim).transpose(1, 2).float()
        if len(box) == 2:
            raise _Stop

    handles = [attn.q_proj.register_forward_hook(lambda m, a, o: hook("q", m, a, o)),
               attn.k_proj.register_forward_hook(lambda m, a, o: hook("k", m, a, o))]
    try:
        model(**inputs, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return box


@torch.no_grad()
def collect_scores(model, processor, dataset, *, limit: int | None = None, layer: int = 1,
                   ranks=(64, 32, 16), prompt: str = LLAVA_PROMPT, batch_size: int = 8,
                   seed: int = 0) -> dict[str, np.ndarray]:
    """Per-image scores of every patch token, (n, N) float32 each, from one unpatched forward per batch.

    Keys: "fastv" (attention of the last prompt token at LLM layer ``layer`` = FastV's K−1, heads
    averaged), "attn_mean" (attention averaged over all prompt queries at that layer),
    "attn_debiased" (each query's attention times its number of visible keys, averaged over the
    queries that see the token: 1 under uniform attention), "cls_attention" (CLIP CLS→patch at the
    feature layer), "norm" (‖x_i‖ of the vision-feature-layer patch features), "svd@k" (rank-k
    leverage of those features) for k in ``ranks``, "random" (uniform noise from ``seed``).
    """
    from ..hf.attention import capture_attention

    n = len(dataset) if limit is None else min(int(limit), len(dataset))
    layer = layer % len(model.model.language_model.layers)
    out: dict[str, list] = {}
    feats = {}
    proj = model.model.multi_modal_projector  # its input = the selected patch features, CLS dropped
    handle = proj.register_forward_pre_hook(lambda m, args: feats.__setitem__("x", args[0].detach()))
    try:
        for start in range(0, n, batch_size):
            items = [dataset[i] for i in range(start, min(n, start + batch_size))]
            x = model_inputs(model, processor, items, prompt)
            maps = capture_attention(model, x, layers=[layer])
            A = maps.lm[layer]  # (B, S, M): every query -> the image tokens
            valid = x["attention_mask"].bool().cpu()  # (B, S)
            rel = valid.long().cumsum(1) - 1  # position among the row's real tokens
            n_valid = valid.sum(1, keepdim=True)
            img_rel = rel.gather(1, maps.image_positions[layer])
            Av = A * valid[..., None]
            sc = {"fastv": A[:, -1], "attn_mean": Av.sum(1) / n_valid,
                  "attn_debiased": (Av * (rel + 1)[..., None]).sum(1) / (n_valid - img_rel),
                  "cls_attention": maps.vision, "norm": torch.linalg.vector_norm(feats["x"].double(), dim=-1)}
            for r in ranks:
                sc[f"svd@{r}"] = torch.as_tensor(leverage_scores(feats["x"], rank=int(r)))
            for key, v in sc.items():
                out.setdefault(key, []).append(v.float().cpu().numpy())
    finally:
        handle.remove()
    res = {k: np.concatenate(v) for k, v in out.items()}
    res["random"] = np.random.default_rng(seed).random(res["norm"].shape).astype(np.float32)
    return res


@torch.no_grad()
def attention_shares(model, processor, dataset, *, limit: int | None = None, prompt: str = LLAVA_PROMPT,
                     max_new_tokens: int = 4) -> pd.DataFrame:
    """Where the response tokens look, layer by layer (heads averaged), one sample at a time.

    For each sample the model answers greedily (up to ``max_new_tokens``, stopping at EOS); then one
    forward over prompt + answer recomputes, at every LLM layer, the attention of each query that
    produced an answer token (the last prompt token, then the answer tokens but the last). Keys are
    split into ``SEGMENTS``: system (before the image), image, instruction (after the image, to the
    end of the prompt), response (answer tokens). Returns a long DataFrame: sample, layer, segment,
    share (mean over the queries; the four shares sum to 1) and n_tokens (keys in the segment).
    """
    layers = model.model.language_model.layers
    eos = model.generation_config.eos_token_id
    eos = set([eos] if isinstance(eos, int) else (eos or []))
    n = len(dataset) if limit is None else min(int(limit), len(dataset))
    rows = []
    for i in range(n):
        x = model_inputs(model, processor, [dataset[i]], prompt)
        P = x["input_ids"].shape[1]
        gen = model.generate(**x, max_new_tokens=max_new_tokens, do_sample=False)[0, P:].tolist()
        T = next((t + 1 for t, tok in enumerate(gen) if tok in eos), len(gen))
        answer = torch.tensor(gen[:T - 1], dtype=torch.long, device=x["input_ids"].device)  # the last is no query
        ids = torch.cat([x["input_ids"][0], answer])[None]
        queries = torch.arange(P - 1, ids.shape[1], device=ids.device)
        img = (ids[0] == model.config.image_token_id).cpu()
        where = img.nonzero().flatten()
        pos = torch.arange(ids.shape[1])
        seg = {"system": pos < where[0], "image": img, "instruction": (pos > where[-1]) & (pos < P),
               "response": pos >= P}
        probs = {}

        def probe(idx, module, query, key, mask, scaling):
            probs[idx] = attention_probs(module, query, key, mask, scaling, queries).mean(1)[0].cpu()  # (Q, S)

        probes = {lay.self_attn: (lambda *a, j=j: probe(j, *a)) for j, lay in enumerate(layers)}
        with probing(model.config.text_config, probes):
            model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=x["pixel_values"],
                  use_cache=False)
        for j, p in sorted(probs.items()):
            for name, m in seg.items():
                rows.append({"sample": i, "layer": j, "segment": name, "share": float(p[:, m].sum(-1).mean()),
                             "n_tokens": int(m.sum())})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------ dataset statistics
def _scores2d(scores) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or 0 in s.shape:
        raise ValueError(f"scores must be a non-empty (n_images, N) array, got shape {s.shape}")
    return s


def mean_rank_map(scores, grid: tuple[int, int] | None = None) -> np.ndarray:
    """Average percentile rank of each token's score over the images: (H, W) in [0, 1].

    Within each image the scores are ranked (ties averaged) and scaled to [0, 1] (1 = top score);
    0.5 everywhere means no position is preferred. Scale-free, so different scores can share a colour bar.
    """
    s = _scores2d(scores)
    H, W = grid_shape(s.shape[1], grid)
    r = (scipy.stats.rankdata(s, axis=1) - 1) / max(s.shape[1] - 1, 1)
    return r.mean(0).reshape(H, W)


def kept_frequency(scores, K: int, grid: tuple[int, int] | None = None) -> np.ndarray:
    """Fraction of images in which each token is among the top-K (ties to the lower index): (H, W);
    it sums to min(K, N)."""
    s = _scores2d(scores)
    H, W = grid_shape(s.shape[1], grid)
    kept = top_k(torch.as_tensor(s), min(int(K), s.shape[1])).numpy()
    freq = np.zeros(s.shape[1])
    np.add.at(freq, kept.ravel(), 1.0)
    return (freq / s.shape[0]).reshape(H, W)


def _lookup(scores: dict, method: str, K: int) -> np.ndarray:
    return scores[f"{method}@{K}"] if f"{method}@{K}" in scores else scores[method]


def positional_table(scores: dict, budgets, grid: tuple[int, int] = (24, 24), methods=None) -> pd.DataFrame:
    """Positional statistics of the top-K sets, averaged over images, one row per (method, K).

    scores: {name: (n, N)} as from :func:`collect_scores`; a method "svd" at budget K reads "svd@K"
    when present (rank = budget, the selector's default). Columns: method, K, mean_kept_row,
    mean_kept_col, row_shift, spearman_index, spearman_row (:func:`~svdprune_utils.core.metrics.positional_bias`),
    coverage, spread (:func:`~svdprune_utils.core.metrics.spatial_stats`).
    """
    if methods is None:
        methods = list(dict.fromkeys(k.split("@")[0] for k in scores))
    rows = []
    for m in methods:
        for K in budgets:
            s = _scores2d(_lookup(scores, m, K))
            kept = top_k(torch.as_tensor(s), min(int(K), s.shape[1])).numpy()
            stats = []
            for si, ki in zip(s, kept):
                sp = spatial_stats(ki, grid)
                stats.append({**positional_bias(si, K, grid),
                              "coverage": sp["coverage"], "spread": sp["spread"]})
            rows.append({"method": m, "K": int(K), **pd.DataFrame(stats).mean().to_dict()})
    return pd.DataFrame(rows)


def answer_band(mask, grid: tuple[int, int] | None = None) -> str:
    """Where an answer region lies: "top" (every cell in the upper half of the rows), "bottom"
    (every cell in the lower half), "both" (it straddles the middle) or "none" (empty mask).
    mask: bool (H, W) or (N,) (then ``grid`` or a square N)."""
    m = np.asarray(mask).astype(bool)
    H, W = m.shape if m.ndim == 2 else grid_shape(m.size, grid)
    rows = np.nonzero(m.reshape(H, W).any(1))[0]
    if rows.size == 0:
        return "none"
    top, bottom = rows.max() < H / 2, rows.min() >= H / 2
    return "top" if top else "bottom" if bottom else "both"
