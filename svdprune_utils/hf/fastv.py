"""FastV inside the language model of a patched LLaVA (installed by :func:`svdprune_utils.patch_llava`).

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

from ..core.selection import select_tokens
from .attention import attention_probs, probing
from .prune import CACHE_CUT, CACHE_FASTV, cache_of, image_token_mask, tokens_per_image

__all__ = ["FastVCall", "default_layer", "fastv_pre_hook", "fastv_forward"]


def default_layer(model) -> int:
    """FastV's K: 2 as in its paper, or the last-but-one decoder layer of a shallower model."""
    return min(2, model.config.text_config.num_hidden_layers - 1)


@dataclass
class FastVCall:
    """What one forward of the language model needs to know (set by :func:`fastv_forward`).

    image_mask: (B, S) True at the image placeholders of this call's sequence (None: none);
    last: (B,) index of each row's last real token in this call (right padding: not S - 1);
    past: tokens already in layer 0's KV cache before the call; length: S, tokens in this call;
    sel/P: kept prompt rows (B, P') in the full index space and the prompt length P they were chosen on —
    chosen at layer K−1 of a prompt call, or taken from the cache being continued.
    """

    image_mask: torch.Tensor | None
    last: torch.Tensor | None
    past: int
    length: int
    sel: torch.Tensor | None = None
    P: int = 0
    chosen: bool = False
    probs: torch.Tensor | None = None  # (B, heads, 1, S) attention of each row's last token at layer K−1
    memo: dict = field(default_factory=dict)


def _select(state, call: FastVCall, hidden) -> None:
    """At layer K of a prompt call: choose the kept image tokens (from the attention the probe read at layer
    K−1, or a stored selection) and store the kept rows in ``call``."""
    mask = call.image_mask
    n = state._n
    if mask is None or not bool(mask.any()):
        return
    B, S, D = hidden.shape
    counts = mask.sum(1)
    if bool((counts != counts[0]).any()) or int(counts[0]) % n:
        raise ValueError(
            f"fastv needs the same number of images ({n} placeholders each) in every row; "
            f"image placeholders per row: {counts.tolist()}"
        )
    G = int(counts[0]) // n  # images per row
    img_pos = mask.nonzero()[:, 1].view(B * G, n)  # row-major: ascending positions, image by image
    if state.kept is not None:
        if tuple(state.kept.shape[:1]) != (B * G,):
            raise ValueError(f"the stored selection (kept) holds {state.kept.shape[0]} images, this call {B * G}")
        idx = state.kept.long().to(hidden.device)
    else:
        score = call.probs.mean(1)[:, 0]  # (B, S) each row's last real token -> every token, heads averaged
        attention = score.gather(1, img_pos.view(B, -1).to(score.device)).view(B * G, n)
        feats = hidden.gather(1, img_pos.view(B, -1, 1).expand(-1, -1, D)).view(B * G, n, D)
        idx = select_tokens(feats, state.budget, method="fastv", attention=attention)  # (B*G, K)
    kept = img_pos.gather(1, idx).view(B, -1)
    text = (~mask).nonzero()[:, 1].view(B, S - G * n)
    call.sel = torch.sort(torch.cat([text, kept], dim=1), dim=1).values  # (B, P')
    call.P, call.chosen, call.probs = S, True, None
    state.kept_indices = idx


def _plan(call: FastVCall):
    """Kept query rows (None: all) and kept key columns (B, ·) of this call, in the full index space."""
    if "plan" not in call.memo:
        sel, P = call.sel, call.P
        total = call.past + call.length
        if call.past == 0 and call.length < P or 0 < call.past < P:
            raise NotImplementedError("fastv: a call covering part of the prompt (chunked prefill) is not supported")
        extra = torch.arange(P, total, device=sel.device).expand(sel.shape[0], -1)
        cols = torch.cat([sel, extra], dim=1)
        call.memo["plan"] = (cols if call.past == 0 else None, cols)
    return call.memo["plan"]


def _gather_rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """t (B or 1, S, ...) -> (B, S', ...) keeping ``rows`` (B, S') along dim 1."""
    t = t.expand(rows.shape[0], *t.shape[1:])
    idx = rows.view(*rows.shape, *([1] * (t.ndim - 2))).expand(-1, -1, *t.shape[2:])
    return t.gather(1, idx)


def _gather_mask(m, rows, cols, total):
    if m is None:
        return None  # sdpa's is_causal path: causal among the kept tokens, all of the (pruned) cache
    if not isinstance(m, torch.Tensor) or m.ndim != 4 or m.shape[-1] != total:
        raise NotImplementedError(f"fastv needs a 4-D eager/sdpa attention mask over {total} keys, got {type(m)}")
    m = m.expand(cols.shape[0], *m.shape[1:])
    if rows is not None:
        m = m.gather(2, rows[:, None, :, None].expand(-1, m.shape[1], -1, m.shape[3]))
    return m.gather(3, cols[:, None, None, :].expand(-1, m.shape[1], m.shape[2], -1))


def fastv_pre_hook(state, layer_idx: int, module, args, kwargs):
    """Forward pre-hook (``with_kwargs=True``) on decoder layer ``layer_idx``; a no-op unless the
    patch's method is "fastv" and a patched forward is running."""
    call = state._call
    if call is None or state.method != "fastv":
        return None
    K = state.fastv_layer
    hidden = args[0] if args else kwargs["hidden_states"]
    if layer_idx == K and call.past == 0 and call.sel is None:
        _select(state, call, hidden)
    if layer_idx < K or call.sel is None:
        return None
    rows, cols = _plan(call)
    if layer_idx == K and rows is not None:
        hidden = _gather_rows(hidden, rows)
    kwargs = dict(kwargs)
    memo = call.memo
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
    if args:
        return (hidden, *args[1:]), kwargs
    kwargs["hidden_states"] = hidden
    return args, kwargs


def fastv_forward(model, state, orig, kw: dict):
    """The patched ``forward`` for method "fastv" (called by :mod:`.patch` with the bound arguments)."""
    n = tokens_per_image(model, kw.get("vision_feature_select_strategy"))
    ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
    seq = ids if ids is not None else embeds
    mask = None if seq is None else image_token_mask(model, ids, embeds)
    cache = cache_of(kw)
    past = cache.get_seq_length() if cache is not None else 0
    if past and getattr(cache, CACHE_CUT, None) is not None:
        raise ValueError("this cache was built by a pre-LLM method (its prompt was cut before the LLM); continue it "
                         "with that method")
    stored = getattr(cache, CACHE_FASTV, None) if past else None  # a FastV cache is continued as it was pruned
    if state.budget >= n and state.kept is None and stored is None:  # nothing to prune: the unpatched run
        if mask is not None and bool(mask.any()) and int(mask.sum()) % n == 0:
            state.kept_indices = torch.arange(n, device=seq.device).expand(int(mask.sum()) // n, -1).clone()
        return orig(**kw)
    if cache is not None and not isinstance(cache, DynamicCache):
        raise TypeError(f"fastv supports only DynamicCache, got {type(cache).__name__}")
    S = seq.shape[1]
    am = kw.get("attention_mask")
    last = torch.full((seq.shape[0],), S - 1, device=seq.device)
    if isinstance(am, torch.Tensor) and am.ndim == 2:  # each row's last real token (right padding)
        cur = am[:, -S:].to(seq.device) != 0
        last = S - 1 - cur.flip(1).int().argmax(1)
    state._n = n
    call = FastVCall(image_mask=mask, last=last, past=past, length=S)
    if past == 0 and state._in_generate and state._fastv_prompt is not None:
        call.sel, call.P = state._fastv_prompt  # no-cache generate: every step reuses the prompt's choice
    elif past > 0:
        mm = kw.get("mm_encoder_outputs") or {}
        if kw.get("pixel_values") is not None or mm.get("image") is not None:
            raise NotImplementedError("fastv prunes the prompt's images only: continuing a cache with new images "
                                      "is not supported; generate again from the whole conversation")
        call.image_mask = None  # placeholder ids after the prompt are plain tokens (no image features)
        call.sel, call.P = stored if stored is not None else (None, 0)
    labels = kw.pop("labels", None)
    as_tuple = kw.get("return_dict") is False
    if labels is not None:
        kw["return_dict"] = True
    probes = {}
    if call.sel is None and past == 0 and state.kept is None and mask is not None and bool(mask.any()):
        def probe(module, query, key, attention_mask, scaling):  # layer K−1: the last real tokens' attention
            with torch.no_grad():  # a selection signal: no gradient, nothing saved for backward
                call.probs = attention_probs(module, query, key, attention_mask, scaling, queries=call.last[:, None])

        probes = {model.model.language_model.layers[state.fastv_layer - 1].self_attn: probe}
    state._call = call
    try:
        with probing(model.config.text_config, probes):
            out = orig(**kw)
    finally:
        state._call = None
    if call.chosen:
        for c in (cache, getattr(out, "cache", None)):
            if isinstance(c, DynamicCache):  # the cache the caller passed, or the one the model made
                setattr(c, CACHE_FASTV, (call.sel, call.P))
        if state._in_generate:
            state._fastv_prompt = (call.sel, call.P)
    if labels is not None:
        rows = call.memo["plan"][0] if "plan" in call.memo else None
        lab = labels if rows is None else labels.to(rows.device).gather(1, rows)
        extra = {k: kw[k] for k in ("num_items_in_batch", "ignore_index") if k in kw}
        loss = model.loss_function(logits=out.logits, labels=lab, vocab_size=model.config.text_config.vocab_size,
                                   **extra)
        out = type(out)(loss=loss, **{k: v for k, v in out.items() if k != "loss"})  # loss first, as unpatched
        if as_tuple:
            return out.to_tuple()
    return out
