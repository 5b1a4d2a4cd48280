"""SparseVLM's rules (Zhang et al., ICML 2025; "SparseVLM+", v2.0): text-guided pruning of the image tokens inside
the language model, at several decoder layers. The layer-by-layer mechanics (hooks, KV cache, batches, decoding)
are shared with FastV in :mod:`.fastv`; this module holds what is SparseVLM's own, as pure functions the tests
transcribe independently.

Follows the authors' code (Gumpest/SparseVLMs, main at 26a5f48 with ``USE_VERSION=2_0``, i.e. v2.0):

* **raters** (``llava/model/language_model/modelling_sparse_llama.py``, ``LlamaDynamicvitModel.forward``, "Select
  Text Raters"): from the decoder's *input* embeddings, ``softmax(V Tᵀ, over text).mean(over image tokens)`` with V
  the image tokens and T every token after the image; the raters are the text tokens whose value exceeds the mean.
  Chosen once per prompt, reused at every pruning layer. (:func:`raters`)
* **pruning layers** ``pruning_loc = [2, 6, 15]``: each of these layers runs on the current sequence, its attention
  probabilities score the image tokens, and its *output* keeps the top ones: layers 0–2 see every token, 3–6 the
  first count, 7–15 the second, 16– the third. (:func:`schedule`)
* **gravity correction** (v2.0, "Text-Visual Attention Gravity Correction"): the attention is divided element-wise
  by ``(RoPE(1)·RoPE(1)ᵀ)/√head_dim``, the score two all-ones query/key vectors get at those positions; it depends
  only on the distance (``(2/√d)·Σᵢ cos((m−n)θᵢ)``). (:func:`rope_gravity`)
* **head selection** (v2.0, ``score.py`` ``select_attn_head_by_sum``): the heads with the largest attention summed
  over raters × image tokens, ``topk(14)`` (of LLaVA-1.5-7B's 32, of the 13B's 40); models with fewer than 14 heads
  keep the 7B's fraction, ``max(1, round(14·H/32))``.
* **score and keep** (``score.py`` ``attn_postprocess_topk``): the selected heads' attention averaged, the raters'
  rows at the image columns averaged over raters; keep ``topk(min(count, current − 1))``, in their original order,
  with their original position ids (v2.0: ``position_ids = batch_index_select(position_ids, keep)``). Text is never
  dropped. (:func:`image_scores`)
* **counts** (``score.py``, ``sparse_token_list_*`` for v2.0): for ``RETAIN_TOKN`` 64 / 96 / 128 / 192 the counts
  after layers 2 / 6 / 15 are (66, 34, 20), (246, 54, 28), (238, 108, 60), (300, 200, 118). The budget is the
  *average number of image tokens per decoder layer* by the official counter (``num_token.append(v_token_num)``
  after each layer, the pruning layer counting its pruned output): e.g. 64 → (2·576 + 4·66 + 9·34 + 17·20)/32 =
  64.4. So SparseVLM "at 64 tokens" gives the language model all 576 image tokens, and its last 16 layers see 20
  (its counter counts 17: layer 15's pruned output); :func:`schedule` reports both.

Not carried over: v1.0/v1.5's recycling (DPC-kNN clustering of 30 % of the dropped tokens into merged tokens),
which v2.0 drops (``s_flag = False``); v1.0's rank-adaptive counts (commit b72c5d6). Numerics: the official code
computes in fp16 and breaks ties with ``torch.topk``'s unspecified order, so near-ties can keep different tokens.
Our extensions (the official code is batch-1, one image, 32 or 40 layers, budgets 64/96/128/192): rows of a batch
are scored alone, padding is not text; several images per row share the raters and heads of their row and keep
``count`` tokens each; scores are computed in fp32; ties go to the lower index; if no text token exceeds the mean
(e.g. a single one), every text token rates; for other budgets or depths see :func:`schedule`.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
import torch

__all__ = ["LAYERS", "COUNTS", "HEADS_KEPT", "Schedule", "schedule", "sparsevlm_schedule", "raters", "rope_gravity",
           "heads_kept", "image_scores"]

LAYERS = (2, 6, 15)  # pruning_loc: the layers whose output is pruned
COUNTS = {64: (66, 34, 20), 96: (246, 54, 28), 128: (238, 108, 60), 192: (300, 200, 118)}  # v2.0, of 576
HEADS_KEPT = (14, 32)  # topk(14) of LLaVA-1.5-7B's 32 heads


class Schedule(NamedTuple):
    """Where and how much SparseVLM prunes a model. layers: the decoder layers whose output is pruned (ascending);
    counts: image tokens per image kept after each of them (decreasing); average: image tokens per decoder layer
    by the official counter; official: True when the counts are the official table's."""

    layers: tuple
    counts: tuple
    average: float
    official: bool

    @property
    def cuts(self) -> tuple:
        """The first layer that sees each count (layer + 1): FastV's K for each stage."""
        return tuple(layer + 1 for layer in self.layers)

    def per_layer(self, n_tokens: int, n_layers: int) -> list:
        """Image tokens per image entering each decoder layer (the layer's own input)."""
        out, k = [], n_tokens
        for i in range(n_layers):
            for layer, c in zip(self.layers, self.counts):
                if i == layer + 1:
                    k = c
            out.append(k)
        return out


def _layers(n_layers: int) -> tuple:
    if n_layers > LAYERS[-1] + 1:
        return LAYERS
    if n_layers < 2:
        raise ValueError(f"sparsevlm prunes the output of a decoder layer for the layers after it: the decoder needs "
                         f"at least 2 layers, it has {n_layers}")
    scaled = {min(math.floor(layer * n_layers / 32 + 0.5), n_layers - 2) for layer in LAYERS}
    return tuple(sorted(scaled))


def _average(layers, counts, n_tokens, n_layers) -> float:
    total, prev, k = 0, 0, n_tokens
    for layer, c in zip(layers, counts):
        total += (layer - prev) * k
        prev, k = layer, c
    total += (n_layers - prev) * k
    return total / n_layers


def schedule(budget: int, n_layers: int, n_tokens: int = 576) -> Schedule:
    """The pruning layers and counts that give ``budget`` image tokens per decoder layer on average (the official
    counter) for a decoder of ``n_layers`` layers and ``n_tokens`` image tokens per image.

    * 576 tokens, budget 64/96/128/192, a decoder of 32 or 40 layers: the official v2.0 layers and table
      (``official=True``), as the official code runs them on the 7B (32 layers: the average is the budget) and the
      13B (40 layers: the same counts, so the average is lower, e.g. 128 -> 114.4).
    * Layers: the official (2, 6, 15) for every decoder of more than 16 layers; a shallower decoder prunes at the
      same fractions of its depth, ``round(ℓ·L/32)`` capped at L − 2 (duplicates merged): 6 layers → (0, 1, 3),
      3 layers → (0, 1).
    * Other counts: the official table row of the nearest budget (by ``budget/n_tokens`` against ``b/576``, on a log
      scale), scaled by the one factor that brings the counter's average closest to ``budget`` (counts rounded,
      each stage dropping at least one token and keeping at least one). The average reached is in
      ``Schedule.average``.

    Raises ValueError for a budget that is not an int in [1, n_tokens) (at n_tokens nothing is pruned: the
    caller runs the unpatched model), below the average the unpruned first layers already give, or fewer image
    tokens than the stages need (one more than the number of pruning layers)."""
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or not 1 <= budget < n_tokens:
        raise ValueError(f"sparsevlm's budget must be an int in [1, {n_tokens}) (image tokens per layer on average; "
                         f"{n_tokens} or more prunes nothing), got {budget!r}")
    return _schedule(int(budget), int(n_layers), int(n_tokens))


@functools.lru_cache(maxsize=256)
def _schedule(budget: int, n_layers: int, n_tokens: int) -> Schedule:
    """:func:`schedule` for checked arguments; cached, since the patch checks the budget at every call (decode
    steps included) and a scaled schedule is a search."""
    layers = _layers(n_layers)
    if n_tokens <= len(layers):
        raise ValueError(f"sparsevlm drops at least one token at each of its {len(layers)} pruning layers: it needs "
                         f"more than {len(layers)} image tokens per image, got {n_tokens}")
    if n_layers in (32, 40) and n_tokens == 576 and budget in COUNTS:
        counts = COUNTS[budget]
        return Schedule(layers, counts, _average(layers, counts, n_tokens, n_layers), True)
    floor = _average(layers, tuple(range(len(layers), 0, -1)), n_tokens, n_layers)
    if budget < floor - 0.5:
        raise ValueError(f"sparsevlm cannot average {budget} image tokens per layer on this model: its first pruning "
                         f"layer is {layers[0]} of {n_layers}, so at least {floor:.1f} (counts ..., 2, 1); "
                         f"use a budget >= {math.ceil(floor - 0.5)}")
    ref = min(COUNTS, key=lambda b: (abs(math.log(b / 576) - math.log(budget / n_tokens)), b))
    shape = [c / 576 * n_tokens for c in COUNTS[ref]][: len(layers)]

    def counts_at(f):  # each stage drops at least one token, as the official min(count, current - 1)
        out, prev = [], n_tokens
        for i, s in enumerate(shape):
            prev = min(max(int(math.floor(s * f + 0.5)), len(shape) - i), prev - 1)
            out.append(prev)
        return tuple(out)

    lo, hi = 0.0, float(n_tokens)  # the average is non-decreasing in the factor
    for _ in range(60):
        mid = (lo + hi) / 2
        if _average(layers, counts_at(mid), n_tokens, n_layers) < budget:
            lo = mid
        else:
            hi = mid
    best = min((counts_at(f) for f in (lo, hi)),
               key=lambda c: (abs(_average(layers, c, n_tokens, n_layers) - budget), c))
    return Schedule(layers, best, _average(layers, best, n_tokens, n_layers), False)


sparsevlm_schedule = schedule  # the name the package exports (``sp.sparsevlm_schedule``)


def raters(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Indices (into ``text``) of the text raters: ``image`` (n, d) and ``text`` (t, d) the decoder's input
    embeddings of one row's image tokens and of the tokens after the image. ``softmax(image @ textᵀ, over text)``
    averaged over the image tokens; the raters are the text tokens above its mean (every one if none is)."""
    m = (image.float() @ text.float().T).softmax(dim=1).mean(0)
    idx = torch.nonzero(m > m.mean()).flatten()
    return idx if idx.numel() else torch.arange(text.shape[0], device=text.device)


def rope_gravity(cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(..., S, S) ``RoPE(1)·RoPE(1)ᵀ/√head_dim`` for the positions whose rotary ``cos``/``sin`` (..., S, head_dim)
    are given (the layer's own, so any RoPE variant is honoured): each all-ones vector rotated as
    ``x·cos + rotate_half(x)·sin``."""
    ones = torch.ones(head_dim, dtype=torch.float32, device=cos.device)
    half = head_dim // 2
    rot = torch.cat([-ones[half:], ones[:half]])  # rotate_half of all-ones
    r = ones * cos.float() + rot * sin.float()
    return r @ r.transpose(-1, -2) / math.sqrt(head_dim)


def heads_kept(n_heads: int) -> int:
    """How many heads score the image tokens: the official ``topk(14)`` wherever it runs (14 or more heads: the 7B's
    32, the 13B's 40); fewer heads keep the 7B's fraction, ``round(14·H/32)``, at least 1."""
    if n_heads >= HEADS_KEPT[0]:
        return HEADS_KEPT[0]
    return max(1, math.floor(HEADS_KEPT[0] * n_heads / HEADS_KEPT[1] + 0.5))


def image_scores(probs: torch.Tensor, gravity: torch.Tensor, rater_rows: torch.Tensor,
                 image_cols: torch.Tensor, groups: list | None = None) -> list:
    """One row's SparseVLM scores of its current image tokens at a pruning layer.

    probs: (H, S, S) the layer's attention probabilities (heads, queries, keys) over the current sequence;
    gravity: (S, S) :func:`rope_gravity` of the current positions; rater_rows: (R,)
    the raters' rows; image_cols: (n,) the current image tokens' columns, image after image; groups: how many of
    them each image holds (None: one image). Returns one (n_g,) fp32 score per image: the heads chosen over all
    the row's image tokens (:func:`heads_kept`), their attention averaged, the raters' rows averaged."""
    a = (probs.float() / gravity.float())[:, rater_rows][:, :, image_cols]  # (H, R, n)
    order = torch.sort(a.sum((1, 2)), descending=True, stable=True).indices
    a = a[order[: heads_kept(a.shape[0])]]
    score = a.mean(0).mean(0)
    return list(torch.split(score, groups if groups is not None else [score.shape[0]]))
