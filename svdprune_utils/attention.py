"""Attention read from a (patched or unpatched) LLaVA: the language model's attention to the image tokens
and the vision tower's CLS->patch attention, by scoped hooks that are removed afterwards, even on error."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .fastv import decoder_attention

__all__ = ["AttentionMaps", "capture_attention", "cls_attention", "vision_attention_hook"]


def _vision_layers(model):
    tower = model.model.vision_tower
    enc = getattr(tower, "encoder", None) or getattr(getattr(tower, "vision_model", None), "encoder", None)
    if enc is None:
        raise NotImplementedError(f"cannot find the encoder layers of {type(tower).__name__}")
    return enc.layers


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


def vision_attention_hook(model, layer, box: dict):
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
    lm_layers = model.model.language_model.layers
    layers = range(len(lm_layers)) if layers is None else sorted({int(i) % len(lm_layers) for i in layers})
    seen, lm, positions, box = {}, {}, {}, {}
    reduce = (lambda p: p) if per_head else (lambda p: p.mean(1))

    def lm_hook(idx, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        img = seen["ids"] == model.config.image_token_id
        state = model.__dict__.get("svdprune")
        if hidden.shape[1] != img.shape[1]:  # inside FastV's pruned layers
            call = None if state is None else state._call
            if call is None or call.sel is None:
                raise RuntimeError(f"layer {idx} sees {hidden.shape[1]} tokens, the prompt has {img.shape[1]}")
            img = img.gather(1, call.sel.to(img.device))
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
            handles.append(vision_attention_hook(model, model.config.vision_feature_layer, box))
        model(**{**inputs, "use_cache": False})
    finally:
        for h in handles:
            h.remove()
    vision = None
    if "cls" in box:
        vision = reduce(box["cls"][:, :, 1:] if model.config.vision_feature_select_strategy == "default" else box["cls"]).cpu()
    return AttentionMaps(lm=lm, image_positions=positions, vision=vision)
