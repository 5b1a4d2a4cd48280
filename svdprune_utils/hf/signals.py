"""The signals a pre-LLM method needs besides the features, computed by the patch from the call itself.

=================  ===================  ========================================================================
method             features (default)   signals the patch computes
=================  ===================  ========================================================================
``cls_attention``  vision (layer −2)    ``attention``: the tower's CLS→patch attention at the feature layer,
                                        mean over heads (FasterVLM)
``vispruner``      vision (layer −2)    ``attention`` as ``cls_attention`` (VisPruner: ``.mean(dim=1)``); the
                                        layer −2 patch features feed its near-duplicate removal
``visionzip``      vision (layer −2)    ``attention``: the same CLS→patch attention SUMMED over heads
                                        (VisionZip: ``.sum(dim=1)``); ``keys``: that layer's ``k_proj`` keys
                                        averaged over heads (VisionZip's ``raw_key_states.mean(1)``)
``cdpruner``       projected            ``relevance``: see :func:`instruction_relevance`
=================  ===================  ========================================================================

The CLS attention and keys are read during the tower's own forward (:func:`.attention.vision_cls_attention`,
through transformers' attention-function interface); for a "default" strategy the CLS column is dropped so
that the signals index the same N patches as the features. Signals are computed on the call that holds the
images (the prompt); a call continuing a cache never recomputes them (the cache holds the image tokens chosen
on the prompt), as for every pre-LLM method.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["CLS_HEADS", "NEEDS_KEYS", "USER_RELEVANCE", "special_token_ids", "text_token_mask",
           "instruction_relevance", "method_signals"]

# methods that read the tower's CLS attention, and how they reduce its heads as their authors' code does (sum and
# mean rank alike, and these methods only rank it: the choice is for fidelity, not for a different selection)
CLS_HEADS = {"cls_attention": "mean", "vispruner": "mean", "visionzip": "sum"}
NEEDS_KEYS = {"visionzip"}  # methods that also read the feature layer's head-averaged keys
USER_RELEVANCE = ("relevance", "image_embeds", "text_embeds")  # cdpruner signals a user may give instead


def special_token_ids(model) -> set[int]:
    """The ids a prompt's instruction never consists of: BOS, EOS and padding, as ``model.config.text_config``
    and ``model.generation_config`` name them (lists included)."""
    ids = set()
    for cfg in (model.config.text_config, model.generation_config):
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(cfg, name, None)
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if v is not None:
                    ids.add(int(v))
    return ids


def text_token_mask(model, kw: dict, image_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) True at the prompt's text tokens: not an image placeholder (``image_mask``), not padding
    (``attention_mask`` 0), and not a special token (:func:`special_token_ids`; with ``inputs_embeds`` only,
    rows equal to such a token's input embedding)."""
    text = ~image_mask
    mask = kw.get("attention_mask")
    if mask is not None:
        text &= mask.to(text.device) != 0
    special = sorted(special_token_ids(model))
    if special:
        ids = kw.get("input_ids")
        if ids is not None:
            text &= ~torch.isin(ids, torch.tensor(special, device=ids.device))
        else:
            emb = kw["inputs_embeds"]
            table = model.get_input_embeddings()(torch.tensor(special, device=emb.device)).to(emb.dtype)
            text &= ~(emb[:, :, None, :] == table[None, None]).all(-1).any(-1)
    return text


@torch.no_grad()
def instruction_relevance(model, kw: dict, image_mask: torch.Tensor, image_rows: torch.Tensor,
                          projected: list) -> torch.Tensor:
    """CDPruner's raw relevance without CLIP's text tower (llava-hf checkpoints do not ship it): (n_images, N)
    fp64, the cosine between each projected image token (the LLM-space features the LLM receives) and the mean
    of the LLM input embeddings (the rows of ``model.get_input_embeddings().weight``; a model that scales its
    embeddings scales every row alike, which no cosine sees) of its row's text tokens
    (:func:`text_token_mask`: every non-placeholder, non-padding token except BOS/EOS/pad — so the chat template's
    words, e.g. "USER:" and "ASSISTANT:", count with the question). ``image_rows`` (n_images,): each image's
    batch row; the images of one row share that row's text. The selector then negates it and min-max normalises
    it per image, as the official code does with CLIP's image–text cosine.

    A documented variant, not CDPruner's signal (CLIP ``visual_projection(post_layernorm(layer −2))`` against CLIP
    text embeddings of the raw question): pass ``relevance`` or ``image_embeds`` + ``text_embeds`` to the patch
    for the official one. Raises ValueError for a row without text tokens.
    """
    text = text_token_mask(model, kw, image_mask)
    ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
    table = model.get_input_embeddings().weight  # rows, not a call: hooks on the embedding see only the LLM's
    means = []
    for b in range(text.shape[0]):
        if not bool(text[b].any()):
            raise ValueError(f"cdpruner: row {b} has no text tokens to compute the instruction relevance from; "
                             "pass relevance= (or image_embeds= and text_embeds=) to patch_llava")
        rows = table[ids[b][text[b]]] if ids is not None else embeds[b][text[b]]
        means.append(rows.double().mean(0))
    t = F.normalize(torch.stack(means), dim=-1)[image_rows.to(text.device)]  # (n_images, D)
    x = F.normalize(torch.stack([p.double() for p in projected]).to(t.device), dim=-1)  # (n_images, N, D)
    return (x @ t.unsqueeze(-1)).squeeze(-1)


def method_signals(model, method: str, user: dict, kw: dict, box: dict, default_strategy: bool,
                   image_mask: torch.Tensor, image_rows: torch.Tensor, projected: list) -> dict:
    """The signals the patch computes for ``method`` on one call: ``box`` holds what the tower's forward
    recorded (``"cls"`` (n_images, heads, T), ``"keys"`` (n_images, T, hd)); ``user``: the patch's
    ``selector_kwargs`` (a user's ``relevance`` / ``image_embeds`` + ``text_embeds`` replace cdpruner's own)."""
    out = {}
    first = 1 if default_strategy else 0  # the "default" strategy drops CLS from the features
    if "cls" in box:
        att = box["cls"].sum(1) if CLS_HEADS[method] == "sum" else box["cls"].mean(1)
        out["attention"] = att[:, first:]
    if "keys" in box:
        out["keys"] = box["keys"][:, first:]
    if method == "cdpruner" and not any(k in user for k in USER_RELEVANCE):
        out["relevance"] = instruction_relevance(model, kw, image_mask, image_rows, projected)
    return out
