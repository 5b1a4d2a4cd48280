"""One call's pre-LLM pruning, compute then apply: the tower runs once, the method picks (or merges) each
image's tokens with the signals :mod:`.signals` computes (or a stored selection is replayed), and
:func:`~svdprune_utils.hf.inputs.keep_image_tokens` turns them into the inputs the language model sees (the
kept tokens' features as ``mm_encoder_outputs``). Also the facts about a LLaVA that the patch and FastV share:
tokens per image (from the tower and the feature strategy), where the image placeholders are, and the markers a
pruned prompt leaves on the KV cache it fills."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..core.reduction import REDUCERS, reduce_tokens
from ..core.selection import SELECTORS, default_feature
from .families import family_of
from .inputs import image_runs, keep_image_tokens, kept_features
from .signals import CLS_HEADS, NEEDS_KEYS, instruction_relevance, method_signals

__all__ = ["Pruned", "CutRecord", "CACHE_CUT", "CACHE_FASTV", "IN_LLM", "known_methods", "strategy", "feature_layer",
           "tokens_per_image", "image_token_mask", "has_cls", "cache_of", "default_positions", "positions_of",
           "prune_call", "pad_id"]

# Attributes set on a cache filled by a pruned prompt, so that a later call continuing it prunes alike:
CACHE_CUT = "_svdprune_image_tokens"  # pre-LLM methods: a CutRecord
CACHE_FASTV = "_svdprune_fastv"  # in-LLM: (((K, kept prompt rows (B, P')) per cut), P, method, budget)
IN_LLM = ("fastv", "sparsevlm")  # the methods that prune inside the language model (:mod:`.fastv`)


def known_methods() -> list:
    """Every method ``patch_llava`` takes: the selectors, the merging methods and the in-LLM ones, sorted."""
    return sorted({*SELECTORS, *REDUCERS, *IN_LLM})


def default_positions(method: str) -> str:
    """The position ids a method gives its kept tokens when the patch's ``positions`` is None: "original" for
    the in-LLM methods (FastV's official code: ``position_ids = keep_indexs``; SparseVLM v2.0's:
    ``batch_index_select(position_ids, keep)``; the only value they implement), "compact" for every pre-LLM method
    (the official pre-LLM LLaVA implementations shorten the sequence before the LLM)."""
    return "original" if method in IN_LLM else "compact"


def positions_of(state, fam=None) -> str:
    """The patch's ``positions`` knob, resolved (None: the method's own, :func:`default_positions`, or the only
    one a family supports: "original" for Qwen2.5-VL, ``fam``)."""
    if state.positions is not None:
        return state.positions
    if fam is not None and len(fam.positions) == 1:
        return fam.positions[0]
    return default_positions(state.method)


class CutRecord(NamedTuple):
    """What a cache filled by a pre-LLM pruned prompt remembers (``CACHE_CUT``), so that a call continuing it
    cuts and numbers alike. k: tokens per image kept (LLaVA-NeXT, Qwen2.5-VL: the budget); prompt_len: the
    caller's prompt length (S, N placeholders per image); positions: "compact" or "original"; length: the pruned
    prompt's length (L, the cache's length after it); next_position: for "original", (B,) the position of the
    first token after the prompt in each row (the last prompt column's position + 1, generate's own rule), None
    for "compact". LLaVA-NeXT and Qwen2.5-VL (images of different lengths): counts, the placeholders of each
    image, and kept_counts, the tokens each kept; prompt_positions: Qwen's (3, B, L) rotary positions of the
    pruned prompt; row_images: the images of each prompt row; method: the method that cut the prompt."""

    k: int
    prompt_len: int
    positions: str = "compact"
    length: int = 0
    next_position: torch.Tensor | None = None
    counts: tuple | None = None
    kept_counts: tuple | None = None
    prompt_positions: torch.Tensor | None = None
    row_images: tuple | None = None
    method: str | None = None


@dataclass
class Pruned:
    """What :func:`prune_inputs` returns: ``inputs`` for ``model(**inputs)`` / ``generate`` (pruned
    placeholders, kept features as ``mm_encoder_outputs``, no ``pixel_values``), ``kept`` (n_images, K)
    and ``index`` (B, L): the column of the caller's sequence each entry of ``inputs`` came from (-1: pad).
    ``record``: what a cache filled by these inputs must remember (``CACHE_CUT``; None when continuing one)."""

    inputs: dict
    kept: torch.Tensor | None
    index: torch.Tensor | None
    record: CutRecord | None = None

    def mark(self, *caches) -> None:
        """Set ``record`` on every cache given (the caller's, the one the model returned) that exists."""
        for c in caches:
            if self.record is not None and c is not None and hasattr(c, "get_seq_length"):
                setattr(c, CACHE_CUT, self.record)


def strategy(model, value=None) -> str:
    return model.config.vision_feature_select_strategy if value is None else value


def feature_layer(model, value=None):
    return model.config.vision_feature_layer if value is None else value


def _embeddings(model):
    tower = model.model.vision_tower
    return getattr(getattr(tower, "vision_model", tower), "embeddings", None)


def tokens_per_image(model, vision_feature_select_strategy: str | None = None) -> int:
    """N, the image features one image gives the LLM: the tower's tokens (patches, + CLS where the tower
    has one) minus the first when the strategy is "default" (as ``LlavaModel.get_image_features`` does)."""
    n = getattr(_embeddings(model), "num_positions", None)
    if n is None:
        raise NotImplementedError(f"cannot count the tokens of a {type(model.model.vision_tower).__name__} tower")
    return int(n) - (strategy(model, vision_feature_select_strategy) == "default")


def has_cls(model) -> bool:
    return hasattr(_embeddings(model), "class_embedding")


def image_token_mask(model, input_ids=None, inputs_embeds=None) -> torch.Tensor:
    """(B, S) True at the image placeholders, from ``input_ids`` or, as transformers does, from the rows of
    ``inputs_embeds`` equal to the placeholder's embedding."""
    if input_ids is not None:
        return input_ids == model.config.image_token_id
    ph = model.get_input_embeddings()(torch.tensor(model.config.image_token_id, device=inputs_embeds.device))
    return (inputs_embeds == ph.to(inputs_embeds.dtype)).all(-1)


def cache_of(kw):
    """The KV cache a call was given (``cache``, or its deprecated name ``past_key_values``), or None."""
    return kw.get("cache") if kw.get("cache") is not None else kw.get("past_key_values")


# ----------------------------------------------------------------------------- compute: selection
def _vision_signals(model, state, kw, box):
    """Run the tower once: (full image outputs, projected features (list), features to score, their space).
    For the methods of ``signals.CLS_HEADS`` the tower's CLS attention (and keys) are recorded in ``box``."""
    layer = feature_layer(model, kw.get("vision_feature_layer"))
    strat = strategy(model, kw.get("vision_feature_select_strategy"))
    mm = kw.get("mm_encoder_outputs") or {}
    if state.method in CLS_HEADS and state.kept is None and mm.get("image") is None and not has_cls(model):
        tower = type(model.model.vision_tower).__name__
        raise ValueError(f"{state.method} needs a vision tower with a CLS token (its CLS→patch attention); "
                         f"{tower} has none")
    out = _image_outputs(model, state, kw, layer, box, lambda: model.model.get_image_features(
        pixel_values=kw["pixel_values"], vision_feature_layer=layer, vision_feature_select_strategy=strat,
        image_sizes=kw.get("image_sizes"), return_dict=True))
    proj = list(out.pooler_output)
    if state.kept is not None:
        return out, proj, None, None
    if (state.feature or default_feature(state.method)) == "projected":
        return out, proj, torch.stack(proj), "projected"
    hs = getattr(out, "hidden_states", None)
    if hs is None:
        raise ValueError("mm_encoder_outputs without hidden_states: the vision features to score are missing; "
                         "pass pixel_values, or feature='projected'")
    sel = [hs[i] for i in ([layer] if isinstance(layer, int) else layer)]
    return out, proj, torch.cat([h[:, 1:] if strat == "default" else h for h in sel], dim=-1), "vision"


def _image_outputs(model, state, kw: dict, layer, box: dict, encode):
    """The call's image outputs: the caller's precomputed ``mm_encoder_outputs``, or ``encode()`` (the tower and
    projector, run once) with the feature layer's CLS attention (and keys) recorded in ``box`` for the methods of
    ``signals.CLS_HEADS``."""
    from .attention import vision_cls_attention

    mm = kw.get("mm_encoder_outputs") or {}
    wants_cls = state.method in CLS_HEADS and state.kept is None
    if mm.get("image") is not None:
        if wants_cls:
            raise ValueError(f"{state.method} needs the vision tower's CLS attention, which precomputed "
                             "mm_encoder_outputs do not carry: pass pixel_values")
        return mm["image"]
    keys = state.method in NEEDS_KEYS
    with vision_cls_attention(model, layer, keys=keys) if wants_cls else contextlib.nullcontext({}) as cls:
        out = encode()
    box.update(cls)
    return out


def merged_to_llm(model, features: torch.Tensor, space: str) -> torch.Tensor:
    """A merging method's output tokens as the language model reads them: the projector applied when they were
    merged in the tower's space (``space="vision"``, as VisionZip applies ``mm_projector`` to its compressed
    sequence), used as they are when merged after it (``"projected"``). The one rule for the patch and the cached
    ablation path."""
    if space not in ("vision", "projected"):
        raise ValueError(f"space must be 'vision' or 'projected', got {space!r}")
    return features if space == "projected" else model.model.multi_modal_projector(features)


def _select(model, state, kw, img: torch.Tensor, N: int) -> tuple[torch.Tensor, list]:
    """kept (n_images, K), ascending, and the K features per image the LLM receives (list of (K, d)), for
    this call's images (``img``: the caller's placeholder mask, runs of N).

    A selection keeps the kept tokens' projected features. A merging method (VisionZip) returns its merged
    features in the space it scored (``feature``: "vision" -> the projector is applied to the K merged tokens,
    as VisionZip applies ``mm_projector`` to its compressed sequence; "projected" -> used as they are); each
    output token sits at the placeholder of its position (``Reduction.kept``: a contextual token at its
    target's), the tokens sorted by position with their features (``Reduction.in_raster_order``). The merge
    runs on detached features (as every core method), so merged tokens pass gradients to the projector only,
    not to the tower (LLaVA-1.5 trains with the tower frozen)."""
    box = {}
    out, proj, feats, space = _vision_signals(model, state, kw, box)
    runs = image_runs(img, N)
    n_images = sum(len(r) for r in runs)
    if len(proj) != n_images:
        raise ValueError(f"the prompts hold {n_images} images, the image inputs {len(proj)}")
    if state.kept is not None:
        if state.kept.shape[0] != n_images:
            raise ValueError(f"the stored selection (kept) holds {state.kept.shape[0]} images, this call {n_images}")
        idx = state.kept.long()
        return idx, kept_features(proj, idx)
    n = feats.shape[1]
    signals = dict(state.selector_kwargs)
    side = int(round(n**0.5))
    if side * side == n:
        signals.setdefault("grid", (side, side))
    rows = torch.cat([torch.full((len(r),), b, dtype=torch.long) for b, r in enumerate(runs)])
    default = strategy(model, kw.get("vision_feature_select_strategy")) == "default"
    signals.update(method_signals(model, state.method, state.selector_kwargs, kw, box, default, img, rows, proj))
    red = reduce_tokens(feats, state.budget, state.method, **signals).in_raster_order()  # (n_images, K)
    if red.features is None:  # a selection
        return red.kept, kept_features(proj, red.kept)
    return red.kept, list(merged_to_llm(model, red.features, space))


def prune_call(model, state, kw: dict, past: int = 0) -> Pruned | None:
    """The pre-LLM pruning of one call (``kw``: the caller's keyword inputs), or None when the call has
    nothing to prune (no image runs, or budget >= N)."""
    fam = family_of(model)
    if fam is not None:
        return _family_call(model, state, kw, past, fam)
    N = tokens_per_image(model, kw.get("vision_feature_select_strategy"))
    view = _view(model, kw, past)
    if view is None:
        return None
    ids, embeds, mm, has_images, img, cache, record = view
    cache_k, prompt_len = (record.k, record.prompt_len) if record is not None else (None, 0)
    positions = positions_of(state)
    if past and getattr(cache, CACHE_FASTV, None) is not None:
        method = getattr(cache, CACHE_FASTV)[2]
        raise ValueError(f"this cache was built by {method} (pruned inside the LLM); continue it with "
                         f"method={method!r}")
    if past and not has_images:
        img = _cached_images(img, record, past)
    if not bool(img.any()):
        return None
    if state.budget >= N and state.kept is None and cache_k is None:  # the unpatched run
        if has_images and int(img.sum()) % N == 0:
            state.kept_indices = torch.arange(N, device=img.device).expand(int(img.sum()) // N, -1).clone()
        return None
    if has_images and mm.get("image") is not None and kw.get("pixel_values") is None:
        counts = {int(p.shape[0]) for p in mm["image"].pooler_output}
        if counts != {N}:  # already reduced (our own inputs inside generate, or the user's own selection)
            return None
    if past and not has_images:  # continuing a cache: cut the cached prompt's runs as they were cut
        if cache_k is None or cache_k >= N:
            return None
        _check_continuation(record, state, positions, min(state.budget, N))
        n_images = sum(len(r) for r in image_runs(img, N))
        kept = torch.arange(cache_k).expand(n_images, -1)  # which ones is moot: only the uncached tail is used
        cut = keep_image_tokens(kw, kept, image_mask=img, tokens_per_image=N, positions=positions,
                                pad_token_id=pad_id(model))
        return Pruned(inputs=cut, kept=None, index=cut.pop("index"))
    if not has_images:
        return None
    if past:
        raise NotImplementedError("continuing a cache with new images is not supported by the pruning patch: "
                                  "generate again from the whole conversation")
    kept, feats = _select(model, state, kw, img, N)
    state.kept_indices = kept
    cut = keep_image_tokens({k: v for k, v in kw.items() if k != "pixel_values"}, kept, image_mask=img,
                            tokens_per_image=N, positions=positions, pad_token_id=pad_id(model))
    cut["mm_encoder_outputs"] = {**mm, "image": BaseModelOutputWithPooling(pooler_output=feats)}
    state._last_index = cut["index"]
    seq = ids if ids is not None else embeds
    L = cut["index"].shape[1]
    nxt = cut["position_ids"][:, -1] + 1 if positions == "original" else None
    record = CutRecord(min(state.budget, N), seq.shape[1], positions, L, nxt, method=state.method)
    return Pruned(inputs=cut, kept=kept, index=cut.pop("index"), record=record)


def _view(model, kw: dict, past: int):
    """What one call brings: (input_ids, inputs_embeds, mm_encoder_outputs, has_images, placeholder mask (B, S),
    cache, its CutRecord when continuing one), or None for a call without a sequence."""
    ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
    if ids is None and embeds is None:
        return None
    mm = kw.get("mm_encoder_outputs") or {}
    has_images = kw.get("pixel_values") is not None or mm.get("image") is not None
    cache = cache_of(kw)
    record = getattr(cache, CACHE_CUT, None) if past else None
    return ids, embeds, mm, has_images, image_token_mask(model, ids, embeds), cache, record


def _cached_images(img: torch.Tensor, record, past: int) -> torch.Tensor:
    """Continuing a cache: only the cached prompt's image runs are images; later placeholder ids are text."""
    img = img.clone()
    prompt_len = record.prompt_len if record is not None else 0
    cached = prompt_len + past - record.length if record is not None else 0  # caller columns in the cache
    whole = record is None or img.shape[1] > cached  # the whole conversation, or only the uncached tail
    img[:, prompt_len if whole else 0:] = False
    return img


def _check_continuation(record, state, positions: str, budget) -> None:
    if record.method is not None and record.method != state.method:
        raise ValueError(f"this cache was built by {record.method}; the patch's method is now {state.method}: "
                         "continue with the method it was built with")
    if record.k != budget:
        what = f"{record.k} tokens per image" if isinstance(record.k, int) else f"budget ratio {record.k}"
        raise ValueError(f"this cache was built with {what}; the patch's budget is now "
                         f"{state.budget}: continue with the budget it was built with")
    if record.positions != positions:
        raise ValueError(f"this cache was built with positions={record.positions!r}; the patch's positions are "
                         f"now {positions!r}: continue with the positions it was built with")


def pad_id(model) -> int:
    pad = model.generation_config.pad_token_id
    pad = pad[0] if isinstance(pad, (list, tuple)) else pad
    return 0 if pad is None else int(pad)


# ------------------------------------------------------------------ LLaVA-NeXT and Qwen2.5-VL (:mod:`.families`)
@dataclass
class _Reduced(BaseModelOutputWithPooling):
    """The kept tokens' features the patch hands the model (``mm_encoder_outputs["image"]``): marks inputs
    already cut, which the patched forward passes on unchanged; ``record``: what a cache they fill remembers (so
    that a hand-written loop on :func:`prune_inputs`' inputs continues it as ``generate`` would)."""

    record: CutRecord | None = None


def _family_call(model, state, kw: dict, past: int, fam) -> Pruned | None:
    """:func:`prune_call` for a family whose images differ in length (``fam``: its adapter). Inside the patched
    ``generate`` the inputs are already cut (or have nothing to cut): the forwards pass them on."""
    if state._in_generate:
        return None
    fam.check_videos(kw)
    view = _view(model, kw, past)
    if view is None:
        return None
    ids, embeds, mm, has_images, img, cache, record = view
    positions = positions_of(state, fam)
    if past and not has_images:
        img = _cached_images(img, record, past)
    if not bool(img.any()):
        return None
    if past and not has_images:  # continuing a cache: cut the cached prompt's runs as they were cut
        if record is None:
            return None
        _check_continuation(record, state, positions, state.budget)
        counts, kept_counts = _expanded(record, img.shape[0])
        kept = [torch.arange(k) for k in kept_counts]  # which ones is moot: only the uncached tail is used
        cut = keep_image_tokens(kw, kept, image_mask=img, tokens_per_image=counts, positions=positions,
                                pad_token_id=pad_id(model))
        index = cut.pop("index")
        if record.prompt_positions is not None:
            cut["position_ids"] = _continued_rotary(record, index)
        return Pruned(inputs=cut, kept=None, index=index)
    if not has_images:
        return None
    if isinstance(mm.get("image"), _Reduced):  # inputs the patch cut (prune_inputs): mark the cache they fill
        return None if past else Pruned(inputs=kw, kept=None, index=None, record=mm["image"].record)
    fam.check_call(model, kw)
    lay = fam.layout(model, kw)
    if mm.get("image") is not None and kw.get("pixel_values") is None:
        if [int(p.shape[0]) for p in mm["image"].pooler_output] != lay.counts:
            return None  # already reduced (the user's own selection)
    if state.kept is None and all(_whole(state, lay, i) for i in range(len(lay.counts))):  # the unpatched run
        state.kept_indices = [torch.arange(n) for n in lay.counts]
        return None
    if past:
        raise NotImplementedError("continuing a cache with new images is not supported by the pruning patch: "
                                  "generate again from the whole conversation")
    runs = image_runs(img, lay.counts)  # raises, naming the row, when the placeholders do not match the images
    kept, feats = _family_select(model, state, kw, img, fam, lay, runs)
    state.kept_indices = kept
    full = fam.full_positions(model, kw)  # Qwen: (3, B, S); the cut gathers them below
    drop = ("pixel_values",) if full is None else ("pixel_values", "position_ids")
    cut = keep_image_tokens({k: v for k, v in kw.items() if k not in drop}, kept, image_mask=img,
                            tokens_per_image=lay.counts, positions=positions, pad_token_id=pad_id(model))
    cut["mm_encoder_outputs"] = {**mm, "image": _Reduced(pooler_output=feats)}
    index = cut.pop("index")
    state._last_index = index
    rotary = None
    if full is not None:  # the kept columns' own rotary positions, never recomputed for the cut grid
        rotary = full.gather(2, index.clamp_min(0).to(full.device)[None].expand(full.shape[0], -1, -1))
        cut["position_ids"] = rotary = rotary.masked_fill((index < 0).to(full.device)[None], 0)
    if positions == "original":  # the row's largest position + 1 (Qwen's rope rule; the last real column)
        pos = cut["position_ids"] if rotary is None else rotary.amax(0)
        nxt = pos.masked_fill((index < 0).to(pos.device), -1).amax(-1) + 1
    else:
        nxt = None
    seq = ids if ids is not None else embeds
    record = CutRecord(state.budget, seq.shape[1], positions, index.shape[1], nxt, tuple(lay.counts),
                       tuple(len(k) for k in kept), rotary, tuple(len(r) for r in runs), state.method)
    cut["mm_encoder_outputs"]["image"].record = record
    return Pruned(inputs=cut, kept=kept, index=index, record=record)


def _expanded(record: CutRecord, rows: int) -> tuple[list, list]:
    """The record's per-image counts and kept counts for ``rows`` rows: generate repeats every prompt row
    (num_return_sequences, beams) before the cache fills, so a continuation holds each row's images that often."""
    per_row, i = [], 0
    for n in record.row_images:
        per_row.append(range(i, i + n))
        i += n
    reps = max(rows // len(per_row), 1)
    order = [j for r in per_row for _ in range(reps) for j in r]
    return [record.counts[j] for j in order], [record.kept_counts[j] for j in order]


def kept_count(budget, n: int) -> int:
    """Tokens kept out of ``n``: an int budget as it is, a float one a ratio (ceil(ratio × n), at least 1)."""
    return budget if isinstance(budget, int) else max(1, math.ceil(budget * n - 1e-9))


def _continued_rotary(record: CutRecord, index: torch.Tensor) -> torch.Tensor:
    """(3, B, L) rotary positions for a call continuing a Qwen cache: the pruned prompt's own, then the text
    after it numbered on from ``next_position`` (only the uncached tail is read)."""
    pp = record.prompt_positions
    reps = max(index.shape[0] // pp.shape[1], 1)  # beams / num_return_sequences
    pp = pp.repeat_interleave(reps, dim=1).to(index.device)
    nxt = record.next_position.repeat_interleave(reps).to(index.device)
    tail = nxt[:, None] + torch.arange(index.shape[1] - pp.shape[2], device=index.device)
    return torch.cat([pp, tail[None].expand(pp.shape[0], -1, -1)], dim=2)


def _family_select(model, state, kw, img, fam, lay, runs) -> tuple[list, list]:
    """Per image: kept offsets into its placeholder run (ascending) and the features the LLM receives there
    (``runs``: :func:`image_runs` of the call). CLS methods on a tower without CLS are refused by the patch's
    checks (``patch._check_family``, at patch time and every call)."""
    layer = feature_layer(model, kw.get("vision_feature_layer")) if fam.has_cls else None
    box = {}
    out = _image_outputs(model, state, kw, layer, box, lambda: fam.encode(model, kw, layer))
    proj = list(out.pooler_output)
    if len(proj) != len(lay.counts):
        raise ValueError(f"the prompts hold {len(lay.counts)} images, the image inputs {len(proj)}")
    if state.kept is not None:
        kept = [torch.as_tensor(k).long() for k in state.kept]
        if len(kept) != len(proj):
            raise ValueError(f"the stored selection (kept) holds {len(kept)} images, this call {len(proj)}")
        return kept, kept_features(proj, kept)
    space = state.feature or default_feature(state.method)
    feats = fam.features(model, kw, out, lay, layer, proj, space)
    att = keys = None
    if "cls" in box:
        att = fam.tower_signal(box["cls"].sum(1) if CLS_HEADS[state.method] == "sum" else box["cls"].mean(1), lay)
    if "keys" in box:
        keys = fam.tower_signal(box["keys"], lay)
    rows = [b for b, r in enumerate(runs) for _ in r]
    kept_all, out_feats = [], []
    for i, cand in enumerate(lay.candidates):
        if _whole(state, lay, i):  # this image whole, newlines included
            kept_all.append(torch.arange(lay.counts[i]))
            out_feats.append(proj[i])
            continue
        signals = {}
        if att is not None:
            signals["attention"] = att[i]
        if keys is not None:
            signals["keys"] = keys[i]
        if state.method == "cdpruner":
            signals["relevance"] = instruction_relevance(model, kw, img, torch.tensor([rows[i]]),
                                                         [proj[i][cand.to(proj[i].device)]])[0]
        kept, merged = _reduce_image(state, fam, lay, i, feats[i], signals)
        full = proj[i]
        if merged is not None:
            full = full.clone()
            full[kept.to(full.device)] = merged_to_llm(model, merged, space).to(full.dtype)
        if state.newlines == "keep":
            kept = fam.keep_newlines(lay, i, kept)
        kept_all.append(kept)
        out_feats.append(full[kept.to(full.device)])
    return kept_all, out_feats


def _groups(state, lay, i: int) -> list:
    """The candidate groups of image ``i`` that each get the budget: the whole image, or (``scope="tile"``) each
    of its tiles."""
    if state.scope == "tile":
        tiles = lay.tiles[i]
        return [(tiles == t).nonzero().flatten() for t in torch.unique(tiles)]
    return [torch.arange(len(lay.candidates[i]))]


def _whole(state, lay, i: int) -> bool:
    """Whether image ``i`` keeps every token (each group's budget covers it): it then enters whole, newlines
    included, as unpatched."""
    return all(kept_count(state.budget, len(g)) >= len(g) for g in _groups(state, lay, i))


def _reduce_image(state, fam, lay, i: int, feats: torch.Tensor, signals: dict):
    """One image's reduction over its candidates, per image or per tile (``state.scope``): kept offsets into its
    placeholder run (ascending) and, for a merging method, their merged features (in that order)."""
    cand = lay.candidates[i]
    grid = lay.grids[i]
    groups = _groups(state, lay, i)
    if state.method == "uniform" and (grid is None or len(groups) > 1):
        raise ValueError(f"uniform spreads its tokens over one patch grid; the {fam.name} candidates of an image do "
                         "not form one (base tile + unpadded tile grid): use another method")
    picked, merged = [], []
    for g in groups:
        k = kept_count(state.budget, len(g))
        if len(g) <= k:
            picked.append(g)
            merged.append(None)
            continue
        dev = feats.device
        sig = {k: v[g.to(v.device)][None] for k, v in signals.items()}
        sig.update(state.selector_kwargs)
        if grid is not None:
            sig.setdefault("grid", grid)
        red = reduce_tokens(feats[g.to(dev)][None], k, state.method, **sig).in_raster_order()
        picked.append(g[red.kept[0].cpu()])
        merged.append(None if red.features is None else red.features[0])
    order = torch.cat(picked)
    kept = cand[order]
    srt = kept.argsort()
    if all(m is None for m in merged):
        return kept[srt], None
    if any(m is None for m in merged):  # a tile small enough to keep whole: its own features
        merged = [m if m is not None else feats[g.to(feats.device)] for m, g in zip(merged, picked)]
    return kept[srt], torch.cat(merged)[srt.to(feats.device)]
