"""FastV and SparseVLM inside the language model of a patched LLaVA (installed by :func:`svdprune_utils.patch_llava`).

FastV (Chen et al., ECCV 2024, "An Image is Worth 1/2 Tokens After Layer 2"): decoder layers < K see
every token; at layer K each image keeps the K_img image tokens that received the most attention from
the *last prompt token* at layer K−1 (heads averaged); the others are dropped for all later layers and
for decoding. Text tokens are never dropped, and kept tokens keep their original RoPE positions.

Mechanism (tested with transformers 5.24, Llama-family decoders called by ``LlamaModel`` as
``layer(hidden_states, attention_mask=4-D mask or None, position_ids=(B, S),
position_embeddings=(cos, sin) each (B, S, head_dim), cache=DynamicCache, ...)``): forward pre-hooks
with kwargs on the decoder layers; no transformers code is replaced.

* layer K−1: the attention of each row's last real prompt token (its last non-padding token) is read
  by a probe on transformers' attention-function interface (:mod:`.attention`: post-RoPE q/k as the
  layer computes them; the layer itself runs its own sdpa/eager attention).
* layer K: choose the kept image tokens with ``select_tokens(method="fastv", attention=...)`` (heads
  averaged) and gather the hidden states of the kept rows.
* layers >= K: gather the same rows of cos/sin and position_ids, and rows + columns of the 4-D mask.
  With a ``DynamicCache`` the layers >= K then cache only the kept tokens; at decoding the mask (built
  for the full length by layer 0's cache) keeps the kept prompt columns and every generated column.
  Gathering columns by index (never slicing the first ones) keeps left padding right.

LLaVA-NeXT and Qwen2.5-VL (``patch_model``): images differ in length, so FastV keeps each image's ``budget``
placeholders (LLaVA-NeXT's newline tokens are image tokens to the LLM and compete like the others) by the same
attention, and the rows must keep the same number of tokens after the cut (else NotImplementedError); SparseVLM
runs its rules unchanged when every image of the call has the same placeholder count (its schedule is computed for
that count; else NotImplementedError). Qwen's kept tokens keep their 3-D rotary positions like every token (the
cos/sin the layers receive are gathered; SparseVLM's gravity is computed from them).

SparseVLM (:mod:`.sparsevlm` holds its rules) runs on the same mechanism with several cuts: the layers of its
schedule (``Schedule.cuts``) each drop image tokens of the previous stage, scored by the attention its text raters
(chosen at layer 0 from the input embeddings) pay at the layer before the cut, gravity-corrected, over its selected
heads. Each stage's layers run on (and cache) that stage's rows; every kept token keeps its original position.

A call without cache (no-cache ``generate``) reuses the selection made on the prompt, so generating
with and without cache gives the same tokens; a prompt call stores its kept rows on the ``DynamicCache``
it fills, so that continuing that cache (multi-turn ``generate(sequences, past_key_values=...)``, or a
hand-written loop) drops the same columns. ``labels``: the loss is computed over the sequence the LM
processed (labels gathered at the kept rows). Not supported (clear errors): chunked prefill, assisted /
prompt-lookup decoding, caches other than ``DynamicCache`` (below the full budget), rows with different
numbers of images, new images in a continued cache, flash/flex attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache

from ..core.selection import select_tokens, top_k
from . import sparsevlm as svlm
from .attention import attention_probs, probing
from .families import family_of
from .prune import CACHE_CUT, CACHE_FASTV, IN_LLM, cache_of, image_token_mask, tokens_per_image

__all__ = ["FastVCall", "default_layer", "cuts_of", "fastv_pre_hook", "fastv_forward"]


def default_layer(model) -> int:
    """FastV's K: 2 as in its paper, or the last-but-one decoder layer of a shallower model."""
    return min(2, model.config.text_config.num_hidden_layers - 1)


def cuts_of(model, state, n: int) -> tuple[tuple, tuple]:
    """(cuts, counts): the decoder layers whose input is cut and the image tokens per image kept from each on —
    FastV: ((K,), (budget,)); SparseVLM: its :func:`.sparsevlm.schedule` for the budget (``Schedule.cuts``)."""
    if state.method == "fastv":
        return (state.fastv_layer,), (state.budget,)
    from .prune import kept_count

    sched = svlm.schedule(kept_count(state.budget, n), model.config.text_config.num_hidden_layers, n)
    return sched.cuts, sched.counts


@dataclass
class FastVCall:
    """What one forward of the language model needs to know (set by :func:`fastv_forward`).

    image_mask: (B, S) True at the image placeholders of this call's sequence (None: none); real: (B, S) True at
    the non-padding tokens; last: (B,) index of each row's last real token in this call (right padding: not
    S - 1); past: tokens already in layer 0's KV cache before the call; length: S, tokens in this call;
    cuts/counts: the layers cut and the image tokens per image kept from each; stages: [(K, rows (B, P_s))] the
    kept prompt rows from layer K on, in the full index space, and P the prompt length they were chosen on —
    chosen at the cuts of a prompt call, or given (``given``) by the cache being continued / the no-cache
    generate's prompt.
    """

    image_mask: torch.Tensor | None
    last: torch.Tensor | None
    past: int
    length: int
    real: torch.Tensor | None = None
    cuts: tuple = ()
    counts: tuple = ()
    stages: list = field(default_factory=list)
    P: int = 0
    given: bool = False
    chosen: bool = False
    probs: torch.Tensor | None = None  # attention read at the layer before the next cut
    pe: tuple | None = None  # (cos, sin) the probed layer received (SparseVLM's gravity correction)
    raters: list | None = None  # SparseVLM: per row, the raters' positions (full index space)
    image: tuple | None = None  # (positions (B*G, c), patch indices (B*G, c)) of the current image tokens
    memo: dict = field(default_factory=dict)
    method: str = "fastv"


def _images(state, call: FastVCall):
    """(G, img_pos (B*G, n)): images per row and their placeholder positions, image by image."""
    mask, n = call.image_mask, state._n
    B = mask.shape[0]
    counts = mask.sum(1)
    if bool((counts != counts[0]).any()) or int(counts[0]) % n:
        raise ValueError(
            f"{state.method} needs the same number of images ({n} placeholders each) in every row; "
            f"image placeholders per row: {counts.tolist()}"
        )
    G = int(counts[0]) // n
    return G, mask.nonzero()[:, 1].view(B * G, n)  # row-major: ascending positions, image by image


def _raters(state, call: FastVCall, hidden: torch.Tensor) -> None:
    """SparseVLM, layer 0 of a prompt call: each row's raters (:func:`.sparsevlm.raters`) among its real
    tokens after its first image, from the decoder's input embeddings."""
    B, S, _ = hidden.shape
    G, img_pos = _images(state, call)
    out = []
    for b in range(B):
        pos = img_pos[b * G:(b + 1) * G].flatten()
        after = torch.arange(S, device=hidden.device) > pos.min()
        text = (after & ~call.image_mask[b] & call.real[b]).nonzero().flatten()
        if text.numel() == 0:
            raise ValueError("sparsevlm needs text after the image in every row (its raters are chosen among it)")
        out.append(text[svlm.raters(hidden[b, pos], hidden[b, text])])
    call.raters = out


def _select_varlen(state, call: FastVCall, hidden, layer_idx: int) -> None:
    """FastV's cut for images of different lengths (LLaVA-NeXT, Qwen2.5-VL; ``state._n``: the placeholders of each
    image): each image keeps its ``budget`` placeholders (newlines included: they are image tokens to the LLM)
    most attended by its row's last real token at the layer before, heads averaged (or a stored selection)."""
    from .inputs import image_runs
    from .prune import kept_count

    B = hidden.shape[0]
    runs = image_runs(call.image_mask, state._n)
    score = None if state.kept is not None else call.probs.mean(1)[:, 0]  # (B, S)
    kept_all, stage, i = [], [], 0
    for b in range(B):
        keep = [(~call.image_mask[b]).nonzero().flatten()]
        for run in runs[b]:
            if state.kept is not None:
                if i >= len(state.kept):
                    raise ValueError(f"the stored selection (kept) holds {len(state.kept)} images, this call more")
                idx = torch.as_tensor(state.kept[i]).long().to(run.device)
                if int(idx.max()) >= len(run):
                    raise ValueError(f"kept[{i}] must be strictly ascending indices in [0, {len(run)})")
            else:
                att = score[b, run.to(score.device)][None]
                k = min(kept_count(call.counts[0], len(run)), len(run))  # an int budget, or a ratio
                idx = select_tokens(hidden[b, run][None], k, method="fastv", attention=att)[0].to(run.device)
            keep.append(run[idx])
            kept_all.append(idx)
            i += 1
        stage.append(torch.cat(keep).sort().values)
    if state.kept is not None and i != len(state.kept):
        raise ValueError(f"the stored selection (kept) holds {len(state.kept)} images, this call {i}")
    if len({len(r) for r in stage}) > 1:
        raise NotImplementedError(f"fastv: the rows would keep {[len(r) for r in stage]} columns after the cut "
                                  "(text and padding included: their images differ in number or length); run them "
                                  "one by one")
    call.stages.append((layer_idx, torch.stack(stage)))
    call.P, call.chosen, call.probs, call.pe = call.image_mask.shape[1], True, None, None
    state.kept_indices = kept_all


def _select(state, call: FastVCall, hidden, layer_idx: int) -> None:
    """At cut ``layer_idx`` of a prompt call: choose each image's kept tokens among its current ones (from the
    attention the probe read at the layer before, or a stored selection) and append the stage's kept rows."""
    if isinstance(state._n, list):
        return _select_varlen(state, call, hidden, layer_idx)
    s = len(call.stages)
    B, _, D = hidden.shape
    G, img_pos = _images(state, call)
    prev = call.stages[-1][1] if call.stages else None  # (B, P_{s-1}) current rows, full index space
    if call.image is None:
        call.image = (img_pos, torch.arange(img_pos.shape[1], device=img_pos.device).expand(B * G, -1))
    cur, patch = call.image  # (B*G, c)
    c = cur.shape[1]
    k = min(call.counts[s], c - 1) if state.method == "sparsevlm" else call.counts[s]

    def local(rows_b, pos):  # column of full-index positions within a row's current sequence
        return pos if prev is None else torch.searchsorted(rows_b, pos)

    if state.kept is not None:
        if tuple(state.kept.shape[:1]) != (B * G,):
            raise ValueError(f"the stored selection (kept) holds {state.kept.shape[0]} images, this call {B * G}")
        idx = state.kept.long().to(hidden.device)
    elif state.method == "fastv":
        score = call.probs.mean(1)[:, 0]  # (B, S) each row's last real token -> every token, heads averaged
        attention = score.gather(1, cur.view(B, -1).to(score.device)).view(B * G, c)
        feats = hidden.gather(1, cur.view(B, -1, 1).expand(-1, -1, D)).view(B * G, c, D)
        idx = select_tokens(feats, k, method="fastv", attention=attention)  # (B*G, k)
    else:
        scores = []
        for b in range(B):
            rows_b = None if prev is None else prev[b]
            grav = svlm.rope_gravity(call.pe[0][min(b, call.pe[0].shape[0] - 1)],
                                     call.pe[1][min(b, call.pe[1].shape[0] - 1)], call.pe[0].shape[-1])
            scores += svlm.image_scores(call.probs[b], grav, local(rows_b, call.raters[b]),
                                        local(rows_b, cur[b * G:(b + 1) * G].flatten()), [c] * G)
        idx = top_k(torch.stack(scores), k)
    kept = cur.gather(1, idx)
    call.image = (kept, patch.gather(1, idx))
    text = (~call.image_mask).nonzero()[:, 1].view(B, -1)
    call.stages.append((layer_idx, torch.sort(torch.cat([text, kept.view(B, -1)], dim=1), dim=1).values))
    call.P, call.chosen, call.probs, call.pe = call.image_mask.shape[1], True, None, None
    state.kept_indices = call.image[1]


def _plan(call: FastVCall, s: int):
    """Stage ``s``'s kept query rows (None: all) and kept key columns (B, ·), in the full index space."""
    key = ("plan", s)
    if key not in call.memo:
        sel, P = call.stages[s][1], call.P
        total = call.past + call.length
        if call.past == 0 and call.length < P or 0 < call.past < P:
            raise NotImplementedError(f"{call.method}: a call covering part of the prompt (chunked prefill) is not "
                                      "supported")
        extra = torch.arange(P, total, device=sel.device).expand(sel.shape[0], -1)
        cols = torch.cat([sel, extra], dim=1)
        call.memo[key] = (cols if call.past == 0 else None, cols)
    return call.memo[key]


def _gather_rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """t (B or 1, S, ...) -> (B, S', ...) keeping ``rows`` (B, S') along dim 1."""
    t = t.expand(rows.shape[0], *t.shape[1:])
    idx = rows.view(*rows.shape, *([1] * (t.ndim - 2))).expand(-1, -1, *t.shape[2:])
    return t.gather(1, idx)


def _gather_mask(m, rows, cols, total):
    if m is None:
        return None  # sdpa's is_causal path: causal among the kept tokens, all of the (pruned) cache
    if not isinstance(m, torch.Tensor) or m.ndim != 4 or m.shape[-1] != total:
        raise NotImplementedError(f"in-LLM pruning needs a 4-D eager/sdpa attention mask over {total} keys, "
                                  f"got {type(m)}")
    m = m.expand(cols.shape[0], *m.shape[1:])
    if rows is not None:
        m = m.gather(2, rows[:, None, :, None].expand(-1, m.shape[1], -1, m.shape[3]))
    return m.gather(3, cols[:, None, None, :].expand(-1, m.shape[1], m.shape[2], -1))


def fastv_pre_hook(state, layer_idx: int, module, args, kwargs):
    """Forward pre-hook (``with_kwargs=True``) on decoder layer ``layer_idx``; a no-op unless the patch's method
    prunes inside the LLM ("fastv", "sparsevlm") and a patched forward is running."""
    call = state._call
    if call is None or state.method not in IN_LLM:
        return None
    hidden = args[0] if args else kwargs["hidden_states"]
    choosing = call.past == 0 and not call.given and call.image_mask is not None and bool(call.image_mask.any())
    if choosing and layer_idx == 0 and state.method == "sparsevlm" and state.kept is None:
        _raters(state, call, hidden)
    if choosing and layer_idx in call.cuts and len(call.stages) == call.cuts.index(layer_idx):
        _select(state, call, hidden, layer_idx)
    s = sum(1 for K, _ in call.stages if K <= layer_idx) - 1
    probed = choosing and state.method == "sparsevlm" and layer_idx + 1 in call.cuts
    if s < 0:
        if probed:
            call.pe = kwargs["position_embeddings"]
        return None
    rows, cols = _plan(call, s)
    if layer_idx == call.stages[s][0] and rows is not None:
        local = rows if s == 0 else torch.searchsorted(_plan(call, s - 1)[0], rows)
        hidden = _gather_rows(hidden, local)
    kwargs = dict(kwargs)
    memo = call.memo.setdefault(s, {})
    if rows is not None:
        if "pe" not in memo:
            cos, sin = kwargs["position_embeddings"]
            pid = kwargs.get("position_ids")
            memo["pe"] = (_gather_rows(cos, rows), _gather_rows(sin, rows))
            memo["pid"] = None if pid is None else _gather_rows(pid, rows)
        kwargs["position_embeddings"] = memo["pe"]
        if "position_ids" in kwargs:
            kwargs["position_ids"] = memo["pid"]
    if "mask" not in memo:
        memo["mask"] = _gather_mask(kwargs.get("attention_mask"), rows, cols, call.past + call.length)
    kwargs["attention_mask"] = memo["mask"]
    if probed:
        call.pe = kwargs["position_embeddings"]
    if args:
        return (hidden, *args[1:]), kwargs
    kwargs["hidden_states"] = hidden
    return args, kwargs


def _image_counts(model, fam, kw: dict, past: int):
    """N for LLaVA-1.5 (``fam`` None); for a family whose images differ in length the placeholders of each of the
    call's images (from the pre-encoded image outputs inside ``generate``, else from the family's layout), []
    without images."""
    if fam is None:
        return tokens_per_image(model, kw.get("vision_feature_select_strategy"))
    fam.check_videos(kw)
    mm = kw.get("mm_encoder_outputs") or {}
    if past or (kw.get("pixel_values") is None and mm.get("image") is None):
        return []
    if mm.get("image") is not None:
        return [int(p.shape[0]) for p in mm["image"].pooler_output]
    fam.check_call(model, kw)
    return fam.layout(model, kw).counts


def fastv_forward(model, state, orig, kw: dict):
    """The patched ``forward`` for the in-LLM methods "fastv" and "sparsevlm" (called by :mod:`.patch` with the
    bound arguments)."""
    ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
    seq = ids if ids is not None else embeds
    mask = None if seq is None else image_token_mask(model, ids, embeds)
    cache = cache_of(kw)
    past = cache.get_seq_length() if cache is not None else 0
    if past and getattr(cache, CACHE_CUT, None) is not None:
        raise ValueError("this cache was built by a pre-LLM method (its prompt was cut before the LLM); continue it "
                         "with that method")
    stored = getattr(cache, CACHE_FASTV, None) if past else None  # a pruned cache is continued as it was pruned
    if stored is not None and (stored[2], stored[3]) != (state.method, state.budget):
        raise ValueError(f"this cache was built by {stored[2]} at budget {stored[3]}; the patch is now "
                         f"{state.method} at budget {state.budget}: continue it with the method and budget it was "
                         "built with")
    fam = family_of(model)
    n = _image_counts(model, fam, kw, past)  # N, or (LLaVA-NeXT, Qwen) the placeholders of each image
    if isinstance(n, list):
        from .prune import kept_count

        if state.kept is None and stored is None and (not n or all(kept_count(state.budget, c) >= c for c in n)):
            if n:
                state.kept_indices = [torch.arange(c) for c in n]
            return orig(**kw)
        if state.method == "sparsevlm" and n:  # its stages prune every image alike: one count for all
            if len(set(n)) > 1:
                raise NotImplementedError(f"sparsevlm on {type(model).__name__}: every image of a call must have the "
                                          f"same number of placeholders, got {n}: run them one by one")
            n = n[0]
    elif state.budget >= n and state.kept is None and stored is None:  # nothing to prune: the unpatched run
        if mask is not None and bool(mask.any()) and int(mask.sum()) % n == 0:
            state.kept_indices = torch.arange(n, device=seq.device).expand(int(mask.sum()) // n, -1).clone()
        return orig(**kw)
    if cache is not None and not isinstance(cache, DynamicCache):
        raise TypeError(f"{state.method} supports only DynamicCache, got {type(cache).__name__}")
    S = seq.shape[1]
    am = kw.get("attention_mask")
    last = torch.full((seq.shape[0],), S - 1, device=seq.device)
    real = torch.ones(seq.shape[:2], dtype=torch.bool, device=seq.device)
    if isinstance(am, torch.Tensor) and am.ndim == 2:  # each row's last real token (right padding)
        real = am[:, -S:].to(seq.device) != 0
        last = S - 1 - real.flip(1).int().argmax(1)
    state._n = n
    call = FastVCall(image_mask=mask, last=last, past=past, length=S, real=real, method=state.method)
    if past == 0 and state._in_generate and state._fastv_prompt is not None:
        (call.stages, call.P), call.given = state._fastv_prompt, True  # no-cache generate: the prompt's choice
    elif past > 0:
        mm = kw.get("mm_encoder_outputs") or {}
        if kw.get("pixel_values") is not None or mm.get("image") is not None:
            raise NotImplementedError(f"{state.method} prunes the prompt's images only: continuing a cache with new "
                                      "images is not supported; generate again from the whole conversation")
        call.image_mask, call.given = None, True  # placeholder ids after the prompt are plain tokens
        call.stages, call.P = (list(stored[0]), stored[1]) if stored is not None else ([], 0)
    if call.given:
        call.cuts = tuple(K for K, _ in call.stages)
    else:
        call.cuts, call.counts = cuts_of(model, state, n)  # a stored kept set: fastv only (sparsevlm refuses it)
    labels = kw.pop("labels", None)
    as_tuple = kw.get("return_dict") is False
    if labels is not None:
        kw["return_dict"] = True
    probes = {}
    if not call.given and past == 0 and state.kept is None and mask is not None and bool(mask.any()):
        def probe(module, query, key, attention_mask, scaling):  # the layer before a cut: the scoring attention
            with torch.no_grad():  # a selection signal: no gradient, nothing saved for backward
                rows = call.last[:, None] if state.method == "fastv" else None  # SparseVLM: every row (raters)
                call.probs = attention_probs(module, query, key, attention_mask, scaling, queries=rows)

        layers = model.model.language_model.layers
        probes = {layers[K - 1].self_attn: probe for K in call.cuts}
    state._call = call
    try:
        with probing(model.config.text_config, probes):
            out = orig(**kw)
    finally:
        state._call = None
    if call.chosen and isinstance(state.kept_indices, torch.Tensor) and fam is not None:
        state.kept_indices = list(state.kept_indices)  # LLaVA-NeXT / Qwen: one tensor per image, as everywhere
    if call.chosen:
        record = (tuple(call.stages), call.P, state.method, state.budget)
        for c in (cache, getattr(out, "cache", None)):
            if isinstance(c, DynamicCache):  # the cache the caller passed, or the one the model made
                setattr(c, CACHE_FASTV, record)
        if state._in_generate:
            state._fastv_prompt = (list(call.stages), call.P)
    if labels is not None:
        rows = _plan(call, len(call.stages) - 1)[0] if call.stages else None
        lab = labels if rows is None else labels.to(rows.device).gather(1, rows)
        extra = {k: kw[k] for k in ("num_items_in_batch", "ignore_index") if k in kw}
        loss = model.loss_function(logits=out.logits, labels=lab, vocab_size=model.config.text_config.vocab_size,
                                   **extra)
        out = type(out)(loss=loss, **{k: v for k, v in out.items() if k != "loss"})  # loss first, as unpatched
        if as_tuple:
            return out.to_tuple()
    return out
