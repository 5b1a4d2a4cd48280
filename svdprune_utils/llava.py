"""Plug-and-play visual-token pruning for Hugging Face ``LlavaForConditionalGeneration``.

    patch_llava(model, method="svd", budget=64)   # any key of SELECTORS; "fastv" prunes inside the LLM
    out = model.generate(**processor(images=..., text=..., return_tensors="pt", padding=True))
    model.svdprune.budget = 32                    # knobs are plain attributes, read at every call
    model.svdprune.kept_indices                   # (n_images, K) kept patch indices of the last call
    unpatch_llava(model)                          # back to the original, bit for bit

Tested with transformers 5.24 (LLaVA-1.5 layout: CLIP tower, ``vision_feature_layer=-2``, "default"
strategy, Llama decoder). Nothing in transformers is edited; the patch only sets instance attributes
and hooks, all listed in ``model.svdprune`` and removed by :func:`unpatch_llava`:

* ``model.generate`` and ``model.forward`` (``functools.wraps``: generate inspects the signatures):
  before anything else, each image's run of N placeholder tokens (576 for LLaVA-1.5) is shrunk to its
  first K = min(budget, N) in ``input_ids``/``attention_mask`` (``position_ids`` and ``labels`` too,
  when given), rows re-padded on their padding side. Positions become contiguous, so generate's cache
  positions, the KV cache and left padding stay consistent. ``generate`` then returns the caller's
  prompt (with its N placeholders) followed by the new tokens, as unpatched; ``forward`` returns
  logits over the shrunk sequence.
* ``model.model.get_image_features``: scores each image's N tokens (``feature="vision"``: the
  ``vision_feature_layer`` patch features, CLS dropped, taken from the tower's own output, no second
  run; ``feature="projected"``: after the projector) with ``select_tokens`` and returns the projected
  features of the K kept tokens, in raster order (``.pooler_output``: list of (K, d) per image).
  ``cls_attention`` gets its signal from a hook held only during that call (no eager attention).
* ``fastv``: no input shrinking; forward pre-hooks on the decoder layers (see :mod:`.fastv`).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LlavaForConditionalGeneration
from transformers.cache_utils import DynamicCache

from ._validate import check_budget
from .fastv import FastVCall, decoder_attention, fastv_pre_hook
from .selectors import SELECTORS, select_tokens

__all__ = ["PruneState", "patch_llava", "unpatch_llava", "capture_attention", "AttentionMaps", "cls_attention"]

_FEATURES = ("vision", "projected")


@dataclass
class PruneState:
    """Everything a patch holds (``model.svdprune``). Public fields may be changed between calls.

    method: a key of ``SELECTORS`` ("fastv" prunes at LLM layer ``fastv_layer``, all others before the
    LLM); budget: K tokens kept per image (>= N keeps all); feature: "vision" or "projected" (what
    pre-LLM selectors score); selector_kwargs: extra signals for ``select_tokens`` (``rank``,
    ``center``, ``seed``, ...); kept_indices: LongTensor (n_images, K) of kept patch indices (raster
    order, 0..N-1) of the last call that saw images, images in batch order.
    """

    method: str
    budget: int
    feature: str = "vision"
    fastv_layer: int = 2
    selector_kwargs: dict = field(default_factory=dict)
    kept_indices: torch.Tensor | None = None
    _tokens_per_image: int = field(default=0, repr=False)
    _originals: dict = field(default_factory=dict, repr=False)  # owner attr -> (owner, had_own, value)
    _handles: list = field(default_factory=list, repr=False)
    _in_generate: bool = field(default=False, repr=False)
    _call: FastVCall | None = field(default=None, repr=False)
    _fastv_sel: torch.Tensor | None = field(default=None, repr=False)  # (B, P') kept prompt rows
    _fastv_len: int = field(default=0, repr=False)  # P, prompt length the selection was made on


def _lm_layers(model):
    return model.model.language_model.layers


def _vision_layers(model):
    tower = model.model.vision_tower
    enc = getattr(tower, "encoder", None) or getattr(getattr(tower, "vision_model", None), "encoder", None)
    if enc is None:
        raise NotImplementedError(f"cannot find the encoder layers of {type(tower).__name__}")
    return enc.layers


def _feature_layer(model, value=None) -> int | list[int]:
    return model.config.vision_feature_layer if value is None else value


def _strategy(model, value=None) -> str:
    return model.config.vision_feature_select_strategy if value is None else value


def _tokens_per_image(model) -> int:
    vc = model.config.vision_config
    return (vc.image_size // vc.patch_size) ** 2 + (_strategy(model) == "full")


def _check(model, state: PruneState) -> None:
    """Validate the knobs (at patch time and at every call, since they are plain attributes)."""
    if state.method not in SELECTORS:
        raise ValueError(f"unknown method {state.method!r}; registered: {sorted(SELECTORS)}")
    state.budget = check_budget(state.budget)
    if state.feature not in _FEATURES:
        raise ValueError(f"feature must be one of {_FEATURES}, got {state.feature!r}")
    n_layers = len(_lm_layers(model))
    if state.method == "fastv" and not 1 <= state.fastv_layer < n_layers:
        raise ValueError(f"fastv_layer must be in [1, {n_layers - 1}], got {state.fastv_layer}")


# ----------------------------------------------------------------------------- input shrinking
def _shrink_inputs(model, state: PruneState, kw: dict) -> dict:
    """Keep the first K of each image's N placeholders in input_ids/attention_mask/position_ids/labels."""
    ids, n = kw["input_ids"], state._tokens_per_image
    k = min(state.budget, n)
    is_img = ids == model.config.image_token_id
    keep = torch.ones_like(is_img)
    for b in range(ids.shape[0]):
        pos = is_img[b].nonzero().flatten()
        chunks = pos.view(-1, n) if pos.numel() % n == 0 else None
        if chunks is None or bool((chunks[:, -1] - chunks[:, 0] != n - 1).any()):
            raise ValueError(f"row {b}: image placeholders must come in runs of {n}, found {pos.numel()} in total")
        keep[b, chunks[:, k:].flatten()] = False
    dropped = ~keep
    mask = kw.get("attention_mask")
    if mask is not None:  # drop every row's padding too, then re-pad to the longest row
        keep &= mask.to(keep.device) != 0
    lengths = keep.sum(1)
    if mask is None and bool((lengths != lengths[0]).any()):
        mask = torch.ones_like(ids)
    right = mask is not None and bool((mask[:, -1] == 0).any())
    pad_id = model.generation_config.pad_token_id
    fills = {"input_ids": 0 if pad_id is None else pad_id, "attention_mask": 0, "position_ids": 0, "labels": -100}
    out = dict(kw, attention_mask=mask)
    if kw.get("position_ids") is not None:
        pid = kw["position_ids"].expand(ids.shape[0], -1)
        out["position_ids"] = pid - dropped.long().cumsum(1).to(pid.device)  # contiguous after the cut
    L = int(lengths.max())
    for name, fill in fills.items():
        t = out.get(name)
        if t is None:
            continue
        rows = [t[b][keep[b].to(t.device)] for b in range(t.shape[0])]
        pad = [torch.full((L - len(r),), fill, dtype=t.dtype, device=t.device) for r in rows]
        out[name] = torch.stack([torch.cat([r, p] if right else [p, r]) for r, p in zip(rows, pad)])
    return out


def _restore_prompt(out, prompt: torch.Tensor, shrunk_len: int):
    """Put the caller's prompt back in front of the generated tokens (tensor or GenerateOutput)."""
    seq = out if isinstance(out, torch.Tensor) else out.sequences
    reps = seq.shape[0] // prompt.shape[0]
    full = torch.cat([prompt.to(seq.device).repeat_interleave(reps, 0), seq[:, shrunk_len:]], dim=1)
    if isinstance(out, torch.Tensor):
        return full
    out.sequences = full
    return out


def _bind(fn, args, kwargs) -> dict:
    """Positional + keyword arguments of ``fn`` as one flat keyword dict."""
    sig = inspect.signature(fn)
    bound = sig.bind_partial(*args, **kwargs).arguments
    var_kw = [p.name for p in sig.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
    extra = bound.pop(var_kw[0], {}) if var_kw else {}
    return {**bound, **extra}


# ------------------------------------------------------------------------------------ wrappers
def _wrap_generate(model, state, orig):
    @functools.wraps(orig)
    def generate(*args, **kwargs):
        _check(model, state)
        prompt = None
        key = "inputs" if args or "inputs" in kwargs else "input_ids"
        ids = args[0] if args else kwargs.get(key)
        if state.method == "fastv":
            cfg = kwargs.get("generation_config") or model.generation_config
            if kwargs.get("prefill_chunk_size") or getattr(cfg, "prefill_chunk_size", None):
                raise NotImplementedError("fastv does not support chunked prefill (prefill_chunk_size)")
        elif ids is not None and kwargs.get("pixel_values") is not None and state.budget < state._tokens_per_image:
            names = ("attention_mask", "position_ids")
            new = _shrink_inputs(model, state, {"input_ids": ids, **{k: kwargs.get(k) for k in names}})
            kwargs.update({k: new[k] for k in names if new.get(k) is not None})
            prompt, args = ids, args[1:]
            kwargs[key] = new["input_ids"]
        state._in_generate, state._fastv_sel = True, None
        try:
            out = orig(*args, **kwargs)
        finally:
            state._in_generate, state._fastv_sel = False, None
        return out if prompt is None else _restore_prompt(out, prompt, kwargs[key].shape[1])

    return generate


def _wrap_forward(model, state, orig):
    @functools.wraps(orig)
    def forward(*args, **kwargs):
        _check(model, state)
        kw = _bind(orig, args, kwargs)
        if state.method != "fastv":
            if (
                not state._in_generate
                and kw.get("pixel_values") is not None
                and kw.get("input_ids") is not None
                and state.budget < state._tokens_per_image
            ):
                kw = _shrink_inputs(model, state, kw)
            return orig(**kw)
        cache = kw.get("cache", kw.get("past_key_values"))
        if cache is not None and not isinstance(cache, DynamicCache):
            raise TypeError(f"fastv supports only DynamicCache, got {type(cache).__name__}")
        past = cache.get_seq_length() if cache is not None else 0
        if past == 0 and not (state._in_generate and state._fastv_sel is not None):
            state._fastv_sel = None  # a new prompt (no-cache generate steps reuse the prompt's choice)
        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        mask = None if ids is None else ids == model.config.image_token_id
        length = (ids if ids is not None else embeds).shape[1]
        state._call = FastVCall(image_mask=mask, past=past, length=length)
        try:
            return orig(**kw)
        finally:
            state._call = None

    return forward


def cls_attention(attn_module, hidden: torch.Tensor) -> torch.Tensor:
    """CLS→token attention of a CLIP-style self-attention module, recomputed from its input.

    hidden: (n, T, D) the module's input (after ``layer_norm1``), token 0 = CLS.
    Returns fp32 (n, heads, T): softmax(q_cls · kᵀ / √d_head) per head (no mask: the tower is bidirectional).
    """
    n, T, _ = hidden.shape
    hd = attn_module.head_dim
    q = attn_module.q_proj(hidden[:, :1]).view(n, 1, -1, hd).transpose(1, 2)
    k = attn_module.k_proj(hidden).view(n, T, -1, hd).transpose(1, 2)
    scale = getattr(attn_module, "scale", hd**-0.5)
    return torch.softmax(torch.matmul(q.float(), k.float().transpose(-1, -2))[:, :, 0] * scale, dim=-1)


def _vision_attention_hook(model, layer, box: dict):
    """Register a hook storing CLS→token attention (n, heads, T) of the layer whose output is
    ``hidden_states[layer]`` (encoder layer index ``layer mod (L+1) − 1``) in ``box["cls"]``."""
    if not isinstance(layer, int):
        raise NotImplementedError("CLS attention needs a single int vision_feature_layer")
    layers = _vision_layers(model)
    idx = layer % (len(layers) + 1) - 1
    if idx < 0:
        raise ValueError("vision_feature_layer selects the embeddings: there is no attention to read")

    def hook(module, args, kwargs, output):
        box["cls"] = cls_attention(module, kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

    return layers[idx].self_attn.register_forward_hook(hook, with_kwargs=True)


def _wrap_image_features(model, state, orig):
    @functools.wraps(orig)
    def get_image_features(*args, **kwargs):
        _check(model, state)
        if state.method == "fastv":
            return orig(*args, **kwargs)
        kw = _bind(orig, args, kwargs)
        layer = _feature_layer(model, kw.get("vision_feature_layer"))
        strategy = _strategy(model, kw.get("vision_feature_select_strategy"))
        as_tuple = kw.get("return_dict") is False
        kw["return_dict"] = True
        box, handle = {}, None
        if state.method == "cls_attention":
            handle = _vision_attention_hook(model, layer, box)
        try:
            out = orig(**kw)
        finally:
            if handle is not None:
                handle.remove()
        proj = list(out.pooler_output)
        if state.feature == "projected":
            feats = torch.stack(proj)
        else:
            hs = out.hidden_states
            sel = [hs[i] for i in ([layer] if isinstance(layer, int) else layer)]
            feats = torch.cat([h[:, 1:] if strategy == "default" else h for h in sel], dim=-1)
        n = feats.shape[1]
        signals = dict(state.selector_kwargs)
        side = int(round(n**0.5))
        if side * side == n:
            signals.setdefault("grid", (side, side))
        if "cls" in box:
            signals["attention"] = box["cls"].mean(1)[:, 1:] if strategy == "default" else box["cls"].mean(1)
        idx = select_tokens(feats, state.budget, method=state.method, **signals)  # (n_images, K)
        if idx.shape[1] < n:
            out.pooler_output = [p.index_select(0, i.to(p.device)) for p, i in zip(proj, idx)]
        state.kept_indices = idx
        return out.to_tuple() if as_tuple else out

    return get_image_features


# ---------------------------------------------------------------------------------- public API
def _set(state: PruneState, owner, name: str, value) -> None:
    state._originals[(id(owner), name)] = (owner, name, name in owner.__dict__, owner.__dict__.get(name))
    setattr(owner, name, value)


def patch_llava(model, method: str = "svd", budget: int = 64, feature: str = "vision", *, fastv_layer: int = 2,
                **selector_kwargs: Any):
    """Prune the visual tokens of a ``LlavaForConditionalGeneration`` in place; returns ``model``.

    method: a key of ``SELECTORS``; "fastv" prunes inside the LLM at ``fastv_layer`` (K, default 2),
    every other method before the LLM. budget: tokens kept per image (>= N: identical to unpatched).
    feature: "vision" (vision_feature_layer patch features) or "projected", what pre-LLM methods score.
    selector_kwargs: extra signals for ``select_tokens`` (e.g. ``rank=``, ``center=``, ``seed=``).
    Patching a patched model replaces the first patch. Raises TypeError for a non-LLaVA model and
    ValueError for a bad method, budget, feature or fastv_layer.
    """
    if not isinstance(model, LlavaForConditionalGeneration):
        raise TypeError(f"patch_llava needs a LlavaForConditionalGeneration, got {type(model).__name__}")
    state = PruneState(method=method, budget=budget, feature=feature, fastv_layer=fastv_layer,
                       selector_kwargs=dict(selector_kwargs))
    _check(model, state)
    if "attention" in selector_kwargs:
        raise ValueError("`attention` is computed by the patch (cls_attention, fastv); do not pass it")
    unpatch_llava(model)
    state._tokens_per_image = _tokens_per_image(model)
    try:
        _set(state, model, "generate", _wrap_generate(model, state, model.generate))
        _set(state, model, "forward", _wrap_forward(model, state, model.forward))
        base = model.model
        _set(state, base, "get_image_features", _wrap_image_features(model, state, base.get_image_features))
        for i, layer in enumerate(_lm_layers(model)):
            hook = functools.partial(fastv_pre_hook, state, i)
            state._handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    finally:
        model.svdprune = state  # set even on failure so that unpatch_llava can undo a partial patch
    return model


def unpatch_llava(model):
    """Remove the patch (hooks and wrapped methods) and ``model.svdprune``; a no-op if unpatched."""
    state = model.__dict__.get("svdprune")
    if state is None:
        return model
    for h in state._handles:
        h.remove()
    for owner, name, had_own, value in reversed(list(state._originals.values())):
        if had_own:
            setattr(owner, name, value)
        else:
            delattr(owner, name)
    del model.svdprune
    return model


# --------------------------------------------------------------------------- attention capture
@dataclass
class AttentionMaps:
    """Attention read by :func:`capture_attention`; plain fp32 CPU tensors, heads averaged unless
    ``per_head`` (then a heads axis follows the batch axis).

    lm: {layer: (B, Q, M)} softmax attention of every query of that layer's sequence (Q tokens: the
        prompt as the LLM sees it, after any pruning) to its M image tokens; ``lm[l].sum(-1)`` is the
        share of attention each query gives to the image.
    image_positions: {layer: (B, M)} positions of those image tokens in the layer's sequence.
    vision: (n_images, N) CLS→patch attention of the vision tower at the feature layer (the layer
        whose output is ``hidden_states[vision_feature_layer]``), or None without ``pixel_values``.
    """

    lm: dict
    image_positions: dict
    vision: torch.Tensor | None


@torch.no_grad()
def capture_attention(model, inputs: dict, layers=None, per_head: bool = False) -> AttentionMaps:
    """Run one forward of ``model(**inputs)`` (no cache) and return its attention maps.

    Works on unpatched and patched models (the maps then show what the pruned LLM attends to).
    layers: LLM layer indices (negative allowed; default all). Attention is recomputed from each
    layer's input by scoped hooks (no eager switch), removed afterwards even on error.
    """
    lm_layers = _lm_layers(model)
    layers = range(len(lm_layers)) if layers is None else sorted({int(i) % len(lm_layers) for i in layers})
    seen, lm, positions, box = {}, {}, {}, {}
    reduce = (lambda p: p) if per_head else (lambda p: p.mean(1))

    def lm_hook(idx, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        img = seen["ids"] == model.config.image_token_id
        state = model.__dict__.get("svdprune")
        if hidden.shape[1] != img.shape[1]:  # inside FastV's pruned layers
            if state is None or state._fastv_sel is None:
                raise RuntimeError(f"layer {idx} sees {hidden.shape[1]} tokens, the prompt has {img.shape[1]}")
            img = img.gather(1, state._fastv_sel.to(img.device))
        counts = img.sum(1)
        if bool((counts != counts[0]).any()):
            raise ValueError(f"rows see different numbers of image tokens: {counts.tolist()}")
        pos = img.nonzero()[:, 1].view(img.shape[0], -1).to(hidden.device)
        probs = decoder_attention(module, hidden, kwargs["position_embeddings"], kwargs.get("attention_mask"))
        cols = pos[:, None, None, :].expand(-1, probs.shape[1], probs.shape[2], -1)
        lm[idx] = reduce(probs.gather(3, cols)).cpu()
        positions[idx] = pos.cpu()

    handles = []
    try:
        handles.append(model.get_input_embeddings().register_forward_hook(
            lambda m, args, out: seen.__setitem__("ids", args[0])))
        for i in layers:
            handles.append(lm_layers[i].register_forward_pre_hook(functools.partial(lm_hook, i), with_kwargs=True))
        if inputs.get("pixel_values") is not None:
            handles.append(_vision_attention_hook(model, _feature_layer(model), box))
        model(**{**inputs, "use_cache": False})
    finally:
        for h in handles:
            h.remove()
    vision = None
    if "cls" in box:
        vision = reduce(box["cls"][:, :, 1:] if _strategy(model) == "default" else box["cls"]).cpu()
    return AttentionMaps(lm=lm, image_positions=positions, vision=vision)
