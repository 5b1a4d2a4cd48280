"""Attention read through transformers' own attention-function interface.

transformers 5 dispatches every attention module's core computation through ``ALL_ATTENTION_FUNCTIONS[
config._attn_implementation]``, called with the module and its *post-RoPE* queries and keys, the 4-D mask the
model built, and the scaling. :func:`probing` registers (once) a function ``"svdprune_probe_<base>"`` that
hands those tensors to a probe attached to chosen modules and then runs the base implementation ("sdpa" or
"eager", the model's own); the mask interface maps the new name to the base's mask builder. For the duration
of one forward the config of the probed part (language model or vision tower) points to it; nothing is
re-derived by hand (no q/k projections, no rotary helper), and every other layer keeps its implementation,
output and speed.

* :func:`attention_probs` — softmax probabilities of chosen queries from (query, key, mask, scaling).
* :func:`capture_attention` — one forward of a (patched or unpatched) LLaVA, returning the language model's
  attention to the image tokens per layer and the tower's CLS→patch attention (:class:`AttentionMaps`).
* :func:`vision_cls_attention` — a context manager that records CLS→token attention (and, on request, the
  head-averaged keys) of the tower's feature layer during the forward it wraps (used by the patch for
  ``cls_attention``, ``vispruner`` and ``visionzip``, and by the cached ablations).
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass

import torch
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

__all__ = ["AttentionMaps", "attention_probs", "capture_attention", "probing", "vision_cls_attention"]

_BASES = ("sdpa", "eager")
_PROBE = "_svdprune_probe"


def _probing_function(base: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        for probe in module.__dict__.get(_PROBE, ()):
            probe(module, query, key, attention_mask, kwargs.get("scaling"))
        if base == "eager":  # the model's own eager function, the default transformers would call
            fn = importlib.import_module(type(module).__module__).eager_attention_forward
        else:
            fn = ALL_ATTENTION_FUNCTIONS[base]
        return fn(module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"svdprune_probe_{base}"
    return attention


def _registered(base: str) -> str:
    name = f"svdprune_probe_{base}"
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _probing_function(base))
        AttentionMaskInterface.register(name, AttentionMaskInterface._global_mapping[base])
    return name


@contextlib.contextmanager
def probing(config, probes: dict):
    """Within the block, every attention module in ``probes`` calls ``probes[module](module, query, key,
    attention_mask, scaling)`` before its attention; ``config``: the sub-config those modules read
    (``model.config.text_config`` or ``.vision_config``). Blocks nest; all is restored on exit, even on error."""
    before = config._attn_implementation
    base = before.removeprefix("svdprune_probe_") if isinstance(before, str) else before
    if base not in _BASES:
        raise NotImplementedError(f"attention probing supports {_BASES} attention, the model uses {base!r}")
    config._attn_implementation = _registered(base)
    try:
        for module, fn in probes.items():
            module.__dict__.setdefault(_PROBE, []).append(fn)
        yield
    finally:
        config._attn_implementation = before
        for module, fn in probes.items():
            chain = module.__dict__.get(_PROBE, [])
            if fn in chain:
                chain.remove(fn)
            if not chain:
                module.__dict__.pop(_PROBE, None)


def attention_probs(module, query, key, attention_mask, scaling, queries=None) -> torch.Tensor:
    """Softmax attention of an attention module from what its attention function receives.

    query: (B, H, S, hd), key: (B, H_kv, T, hd) (post-RoPE; T >= S with a cache); attention_mask: the 4-D
    mask ((B or 1, 1, S, T), bool "may attend" or additive float) or None (causal for a causal module, else
    none); queries: (Q,) or (B, Q) query rows (None: all S). Returns fp32 (B, H, Q, T); rows sum to 1.
    """
    B, H, S, _ = query.shape
    T = key.shape[2]
    qpos = torch.arange(S, device=query.device) if queries is None else torch.as_tensor(queries, device=query.device)
    qpos = qpos.expand(B, -1) if qpos.ndim == 1 else qpos
    q = query.gather(2, qpos[:, None, :, None].expand(-1, H, -1, query.shape[-1]))
    k = key.repeat_interleave(H // key.shape[1], dim=1)  # GQA: the head order of repeat_kv
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    low = torch.finfo(torch.float32).min
    if attention_mask is None:
        if getattr(module, "is_causal", False):
            allowed = torch.arange(T, device=q.device)[None, None, :] <= (qpos + T - S)[:, :, None]
            scores = scores.masked_fill(~allowed[:, None], low)
    else:
        m = attention_mask[..., -T:].expand(B, -1, -1, -1)
        m = m.gather(2, qpos[:, None, :, None].expand(-1, m.shape[1], -1, T))
        scores = scores.masked_fill(~m, low) if m.dtype == torch.bool else scores + m.float()
    return torch.softmax(scores, dim=-1)


# ----------------------------------------------------------------------------------- vision tower
def _vision_layers(model):
    tower = model.model.vision_tower
    enc = getattr(tower, "encoder", None) or getattr(getattr(tower, "vision_model", None), "encoder", None)
    if enc is None:
        raise NotImplementedError(f"cannot find the encoder layers of {type(tower).__name__}")
    return enc.layers


@contextlib.contextmanager
def vision_cls_attention(model, layer=None, keys: bool = False):
    """Record, during the forward in the block, the CLS→token attention (n_images, heads, T) of the tower
    layer whose output is ``hidden_states[layer]`` (default ``vision_feature_layer``) in ``box["cls"]``
    (``with vision_cls_attention(model) as box: ...``). With ``keys``, also that layer's attention keys
    averaged over heads, (n_images, T, head_dim), in ``box["keys"]``: the ``k_proj`` output (bias included,
    unscaled) of the layer's normalised input, as its attention function receives it (VisionZip's merge metric,
    ``raw_key_states.mean(1)`` in its ``CLIPAttention_forward``)."""
    layer = model.config.vision_feature_layer if layer is None else layer
    if not isinstance(layer, int):
        raise NotImplementedError("CLS attention needs a single int vision_feature_layer")
    layers = _vision_layers(model)
    idx = layer % (len(layers) + 1) - 1
    if idx < 0:
        raise ValueError("vision_feature_layer selects the embeddings: there is no attention to read")
    box = {}

    def probe(module, query, key, mask, scaling):
        with torch.no_grad():  # a selection signal: nothing is saved for backward
            box["cls"] = attention_probs(module, query, key, mask, scaling, queries=torch.tensor([0]))[:, :, 0]
            if keys:
                box["keys"] = key.detach().mean(1)  # (B, H, T, hd) -> (B, T, hd)

    with probing(model.config.vision_config, {layers[idx].self_attn: probe}):
        yield box


# ----------------------------------------------------------------------------------- language model
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
    layers: LLM layer indices in [-L, L) (negative count from the end; default all). Read by :func:`probing` on the
    chosen layers. Under an in-LLM method (FastV, SparseVLM) ``image_positions`` of a pruned layer are columns of
    the sequence that layer processes.
    """
    lm_layers = model.model.language_model.layers
    L = len(lm_layers)
    if layers is not None:
        bad = [i for i in layers if not -L <= int(i) < L]
        if bad:
            raise ValueError(f"layers must lie in [-{L}, {L}) for this {L}-layer language model, got {bad}")
    layers = range(L) if layers is None else sorted({int(i) % L for i in layers})
    from .patch import image_token_mask

    lm, positions = {}, {}
    reduce = (lambda p: p) if per_head else (lambda p: p.mean(1))
    caller = image_token_mask(model, inputs.get("input_ids"), inputs.get("inputs_embeds"))
    state = model.__dict__.get("svdprune")
    if state is not None:
        state._last_index = None

    def image_rows(S, layer):
        img = caller
        if state is not None and state._last_index is not None:  # the prompt as cut before the LLM
            idx = state._last_index.to(img.device)
            img = torch.where(idx >= 0, img.gather(1, idx.clamp_min(0)), False)
        if S != img.shape[1]:  # inside the pruned layers of FastV / SparseVLM: the rows of this layer's stage
            call = None if state is None else state._call
            stage = [rows for K, rows in (call.stages if call is not None else []) if K <= layer]
            if not stage or stage[-1].shape[1] != S:
                raise RuntimeError(f"a layer sees {S} tokens, the prompt has {img.shape[1]}")
            img = img.gather(1, stage[-1].to(img.device))
        counts = img.sum(1)
        if bool((counts != counts[0]).any()):
            raise ValueError(f"rows see different numbers of image tokens: {counts.tolist()}")
        return img.nonzero()[:, 1].view(img.shape[0], -1)

    def probe(idx, module, query, key, mask, scaling):
        probs = attention_probs(module, query, key, mask, scaling)
        pos = image_rows(query.shape[2], idx).to(probs.device)
        cols = pos[:, None, None, :].expand(-1, probs.shape[1], probs.shape[2], -1)
        lm[idx] = reduce(probs.gather(3, cols)).cpu()
        positions[idx] = pos.cpu()

    probes = {lm_layers[i].self_attn: (lambda *a, i=i: probe(i, *a)) for i in layers}
    box = {}
    with contextlib.ExitStack() as stack:
        stack.enter_context(probing(model.config.text_config, probes))
        if inputs.get("pixel_values") is not None:
            box = stack.enter_context(vision_cls_attention(model))
        model(**{**inputs, "use_cache": False})
    vision = None
    if "cls" in box:
        vision = reduce(box["cls"][:, :, 1:] if model.config.vision_feature_select_strategy == "default" else box["cls"])
        vision = vision.cpu()
    return AttentionMaps(lm=lm, image_positions=positions, vision=vision)
