"""FastV inside the language model of a patched LLaVA (installed by :func:`svdprune_utils.patch_llava`).

FastV (Chen et al., ECCV 2024, "An Image is Worth 1/2 Tokens After Layer 2"): decoder layers < K see
every token; at layer K each image keeps the K_img image tokens that received the most attention from
the *last prompt token* at layer K−1 (heads averaged); the others are dropped for all later layers and
for decoding. Text tokens are never dropped, and kept tokens keep their original RoPE positions.

Mechanism (tested with transformers 5.24, Llama-family decoders called by ``LlamaModel`` as
``layer(hidden_states, attention_mask=4-D mask or None, position_ids=(B, S),
position_embeddings=(cos, sin) each (B, S, head_dim), cache=DynamicCache, ...)``): forward pre-hooks
with kwargs on the decoder layers; no transformers code is replaced.

* layer K−1: recompute that layer's attention of the last query (its own q/k projections and rotary
  helper) and choose the kept image tokens with ``select_tokens(method="fastv", attention=...)``.
* layer K: gather the hidden states of the kept rows.
* layers >= K: gather the same rows of cos/sin and position_ids, and rows + columns of the 4-D mask.
  With a ``DynamicCache`` the layers >= K then cache only the kept tokens; at decoding the mask (built
  for the full length by layer 0's cache) keeps the kept prompt columns and every generated column.
  Gathering columns by index (never slicing the first ones) keeps left padding right.

A call without cache (no-cache ``generate``) reuses the selection made on the prompt, so generating
with and without cache gives the same tokens. Not supported: chunked prefill, caches other than
``DynamicCache``, rows with different numbers of images, flash/flex attention masks.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

from .selectors import select_tokens

__all__ = ["FastVCall", "decoder_attention", "fastv_pre_hook"]


@dataclass
class FastVCall:
    """What one forward of the language model needs to know (set by the patched LLaVA ``forward``).

    image_mask: (B, S) True at the image placeholders of this call's ``input_ids`` (None: unknown).
    past: tokens already in layer 0's KV cache before the call; length: S, tokens in this call.
    """

    image_mask: torch.Tensor | None
    past: int
    length: int
    memo: dict = field(default_factory=dict)


def decoder_attention(layer, hidden, position_embeddings, attention_mask=None, queries=None) -> torch.Tensor:
    """Softmax attention probabilities of a Llama-style decoder layer, recomputed from its input.

    hidden: (B, S, D) the layer's input (before ``input_layernorm``); position_embeddings: (cos, sin)
    each (B or 1, S, head_dim); attention_mask: the 4-D mask the layer receives ((B or 1, 1, S, S),
    bool "may attend" or additive float) or None (plain causal); queries: LongTensor (Q,) of query
    rows (None: all S). No KV cache: the keys are the S tokens of ``hidden``.
    Returns fp32 (B, heads, Q, S); each row sums to 1.
    """
    attn = layer.self_attn
    h = layer.input_layernorm(hidden)
    B, S, _ = h.shape
    hd = attn.head_dim
    qpos = torch.arange(S, device=h.device) if queries is None else torch.as_tensor(queries, device=h.device)
    q = attn.q_proj(h[:, qpos]).view(B, len(qpos), -1, hd).transpose(1, 2)
    k = attn.k_proj(h).view(B, S, -1, hd).transpose(1, 2)
    if hasattr(attn, "q_norm"):  # Qwen3-style per-head norms; Llama has none
        q, k = attn.q_norm(q), attn.k_norm(k)
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb  # the model's own rotary helper
    cos, sin = position_embeddings
    q, _ = rope(q, q, cos[:, qpos], sin[:, qpos])
    _, k = rope(k, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # GQA: same head order as repeat_kv
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * attn.scaling
    low = torch.finfo(torch.float32).min
    if attention_mask is None:
        allowed = torch.arange(S, device=h.device)[None, :] <= qpos[:, None]
        scores = scores.masked_fill(~allowed, low)
    else:
        m = attention_mask[:, :, qpos, :S]
        scores = scores.masked_fill(~m, low) if m.dtype == torch.bool else scores + m.float()
    return torch.softmax(scores, dim=-1)


def _select(state, call: FastVCall, layer, hidden, kwargs) -> None:
    """At layer K−1 of a prompt call: choose the kept image tokens and store the kept rows."""
    mask = call.image_mask
    n = state._tokens_per_image
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
    if state.budget >= n:
        state.kept_indices = torch.arange(n, device=hidden.device).expand(B * G, -1).clone()
        return
    last = torch.tensor([S - 1], device=hidden.device)
    probs = decoder_attention(layer, hidden, kwargs["position_embeddings"], kwargs.get("attention_mask"), last)
    score = probs.mean(1)[:, 0]  # (B, S) last prompt token -> every token, heads averaged
    attention = score.gather(1, img_pos.view(B, -1)).view(B * G, n)
    feats = hidden.gather(1, img_pos.view(B, -1, 1).expand(-1, -1, D)).view(B * G, n, D)
    idx = select_tokens(feats, state.budget, method="fastv", attention=attention)  # (B*G, K)
    kept = img_pos.gather(1, idx).view(B, -1)
    text = (~mask).nonzero()[:, 1].view(B, S - G * n)
    state._fastv_sel = torch.sort(torch.cat([text, kept], dim=1), dim=1).values  # (B, P')
    state._fastv_len = S
    state.kept_indices = idx


def _plan(state, call: FastVCall):
    """Kept query rows (None: all) and kept key columns (B, ·) of this call, in the full index space."""
    if "plan" not in call.memo:
        sel, P = state._fastv_sel, state._fastv_len
        total = call.past + call.length
        if call.past == 0 and call.length < P or 0 < call.past < P:
            raise NotImplementedError("fastv: chunked prefill / a call covering part of the prompt is not supported")
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
    if layer_idx == K - 1 and call.past == 0 and state._fastv_sel is None:
        _select(state, call, module, hidden, kwargs)
    if layer_idx < K or state._fastv_sel is None:
        return None
    rows, cols = _plan(state, call)
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
