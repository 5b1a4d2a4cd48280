"""The one step from kept image tokens to the inputs a LLaVA-style language model sees.

Selection is model-free (features -> kept indices per image, :func:`svdprune_utils.select_tokens`); this
module applies a selection to a batch of prompts. Everything that prunes before the language model goes
through :func:`keep_image_tokens`: the patch (:func:`svdprune_utils.hf.patch.patch_llava` and the public
:func:`svdprune_utils.hf.patch.prune_inputs` for hand-written loops), the cached ablations, the tiny model's
training-time token dropping, the bias analysis and the scripts in ``results/``.

Layout of a prompt batch (what a LLaVA processor returns)::

    input_ids       (B, S)   each image is a run of N consecutive placeholder tokens (image_token_id); N may
                             differ per image (``tokens_per_image`` as one count per image)
    attention_mask  (B, S)   1 = token, 0 = padding (left or right)
    kept            (n_images, K) ascending indices into each image's N tokens, images in row-major
                             order (row 0's images left to right, then row 1's, ...)

``keep_image_tokens`` keeps, in each run, the rows ``kept[i]`` and drops the others; padding is dropped and
the rows re-padded on their padding side to the longest row. ``positions`` says which position ids the
kept tokens get: "compact" (consecutive, what the official pre-LLM LLaVA implementations do and what
``generate`` assumes when it derives positions from the mask) or "original" (each kept token keeps the
position it had in the full prompt; padding gets 0).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence

import torch

__all__ = ["POSITIONS", "LLAVA_PROMPT", "image_runs", "keep_image_tokens", "kept_features"]

POSITIONS = ("compact", "original")
LLAVA_PROMPT = "USER: <image>\n{question} ASSISTANT:"  # the LLaVA-1.5 conversation format, one image
# what each sequence-shaped input is padded with after the cut
_FILL = {"input_ids": None, "attention_mask": 0, "position_ids": 0, "labels": -100, "inputs_embeds": 0.0,
         "mm_token_type_ids": 0}


def _counts(tokens_per_image):
    """An int N for every image (int-like scalars included), or a list of per-image counts."""
    if isinstance(tokens_per_image, numbers.Integral) and not isinstance(tokens_per_image, bool):
        return int(tokens_per_image)
    if isinstance(tokens_per_image, torch.Tensor) and tokens_per_image.ndim == 0:
        return int(tokens_per_image)
    items = None if isinstance(tokens_per_image, (str, bytes)) else _try_list(tokens_per_image)
    if items is None or not all(_integral(x) for x in items):
        raise ValueError(f"tokens_per_image must be an int or a sequence of integer per-image counts, "
                         f"got {tokens_per_image!r}")
    return [int(x) for x in items]


def _try_list(x):
    try:
        return list(x)
    except TypeError:
        return None


def _integral(x) -> bool:
    """An integer count: a Python/NumPy int or an integer 0-d tensor (not a bool, not a float)."""
    if isinstance(x, torch.Tensor):
        return x.ndim == 0 and not x.is_floating_point() and x.dtype != torch.bool
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool,))


def image_runs(image_mask: torch.Tensor, tokens_per_image) -> list:
    """Placeholder positions of every image, row by row: a list with one entry per row.

    tokens_per_image: N, the same for every image -> each entry is a LongTensor (images in that row, N); or a
    sequence of per-image counts in row-major order (row 0's images left to right, then row 1's, ...), for
    models whose images differ in length (LLaVA-NeXT's anyres) -> each entry is a list of 1-D LongTensors.
    Raises ValueError naming the row when its placeholders are not consecutive runs of those lengths.
    """
    if image_mask.ndim != 2:
        raise ValueError(f"image_mask must be (batch, sequence), got shape {tuple(image_mask.shape)}")
    counts = _counts(tokens_per_image)
    if isinstance(counts, int):
        n = counts
        out = []
        for b in range(image_mask.shape[0]):
            pos = image_mask[b].nonzero().flatten()
            runs = pos.view(-1, n) if n > 0 and pos.numel() % n == 0 else None
            if runs is None or bool((runs[:, -1] - runs[:, 0] != n - 1).any()):
                raise ValueError(f"row {b}: image placeholders must come in runs of {n} consecutive tokens, "
                                 f"found {pos.numel()} placeholders")
            out.append(runs)
        return out
    lengths = counts
    if any(x < 1 for x in lengths):
        raise ValueError(f"per-image token counts must be >= 1, got {lengths}")
    out, i = [], 0
    for b in range(image_mask.shape[0]):
        pos = image_mask[b].nonzero().flatten()
        row, used = [], 0
        while used < pos.numel() and i < len(lengths):
            run = pos[used:used + lengths[i]]
            if run.numel() != lengths[i] or int(run[-1] - run[0]) != lengths[i] - 1:
                raise ValueError(f"row {b}: image {i}'s placeholders must be a run of {lengths[i]} consecutive "
                                 f"tokens (the row holds {pos.numel()} placeholders)")
            row.append(run)
            used += lengths[i]
            i += 1
        if used != pos.numel():
            raise ValueError(f"row {b}: {pos.numel()} placeholders, but the per-image counts run out after {used}")
        out.append(row)
    if i != len(lengths):
        raise ValueError(f"the prompts hold {i} images, tokens_per_image lists {len(lengths)}")
    return out


def _as_kept(kept, bounds: Sequence[int]) -> list[torch.Tensor]:
    """``kept`` as one ascending index tensor per image, image i's inside [0, bounds[i])."""
    n_images = len(bounds)
    rows = list(kept) if not isinstance(kept, torch.Tensor) or kept.ndim == 2 else None
    if rows is None or len(rows) != n_images:
        got = tuple(kept.shape) if isinstance(kept, torch.Tensor) else f"{len(list(kept))} entries"
        raise ValueError(f"kept must hold one index row per image ({n_images} images in the batch), got {got}")
    out = []
    for i, (r, bound) in enumerate(zip(rows, bounds)):
        r = torch.as_tensor(r)
        if r.dtype in (torch.bool,) or r.is_floating_point() or r.ndim != 1 or r.numel() == 0:
            raise ValueError(f"kept[{i}] must be a non-empty 1-D integer index tensor, got {r.dtype} {tuple(r.shape)}")
        if int(r.min()) < 0 or int(r.max()) >= bound or bool((r.diff() <= 0).any()):
            raise ValueError(f"kept[{i}] must be strictly ascending indices in [0, {bound}), got {r.tolist()[:8]}...")
        out.append(r.long())
    return out


def keep_image_tokens(inputs: Mapping, kept, *, image_mask: torch.Tensor, tokens_per_image,
                      positions: str = "compact", pad_token_id: int = 0, padding_side: str | None = None) -> dict:
    """Cut every image's run of N placeholders down to its kept tokens; returns a new dict.

    inputs: sequence-shaped entries among input_ids (B, S), inputs_embeds (B, S, D), attention_mask (B, S),
        position_ids (B or 1, S), labels (B, S), mm_token_type_ids (B, S) (Qwen2.5-VL's modality of each token);
        other entries are copied unchanged. Nothing is modified.
    kept: (n_images, K) LongTensor or a list of 1-D index tensors (one per image, ascending, K may differ).
    image_mask: (B, S) True at the placeholders; tokens_per_image: N, or one count per image in row-major order
        (images of different lengths, :func:`image_runs`).
    positions: "compact" -> position ids are consecutive over each row's kept tokens (returned only when
        the caller gave position_ids: otherwise the model derives the same ones from the mask);
        "original" -> position_ids (always returned) are the kept tokens' positions in the full prompt
        (the caller's position_ids, else ``attention_mask.cumsum(-1) - 1``).
    padding_side: "left"/"right"; None = "right" if some row ends in padding, else "left".

    The result has an ``attention_mask`` whenever the input had one, rows end up with different lengths, or
    positions is "original" (without a mask transformers would read the gaps in the position ids as the
    boundaries of packed sequences), and ``index``: (B, L) LongTensor, the column of the full prompt each kept
    entry came from (-1 at padding).
    """
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    seq = inputs.get("input_ids") if inputs.get("input_ids") is not None else inputs.get("inputs_embeds")
    if seq is None:
        raise ValueError("inputs need input_ids or inputs_embeds")
    B, S = seq.shape[:2]
    if tuple(image_mask.shape) != (B, S):
        raise ValueError(f"image_mask has shape {tuple(image_mask.shape)}, the sequence is {(B, S)}")
    dev = seq.device
    image_mask = image_mask.to(dev)
    runs = image_runs(image_mask, tokens_per_image)
    rows_kept = _as_kept(kept, [len(run) for r in runs for run in r])  # each image's own length bounds its indices
    keep = ~image_mask
    i = 0
    for b, r in enumerate(runs):
        for run in r:
            keep[b, run[rows_kept[i].to(dev)]] = True
            i += 1
    mask = inputs.get("attention_mask")
    full_pos = inputs.get("position_ids")
    if positions == "original" and full_pos is None:
        base = mask if mask is not None else torch.ones(B, S, dtype=torch.long, device=dev)
        full_pos = (base.long().cumsum(-1) - 1).clamp_min(0)
    if full_pos is not None:
        full_pos = full_pos.expand(B, -1)
        if positions == "compact" and inputs.get("position_ids") is not None:  # contiguous after the cut
            full_pos = full_pos - (~keep).long().cumsum(-1).to(full_pos.device)
    if mask is not None:
        real = mask.to(dev) != 0
        keep &= real
        side = padding_side or ("right" if bool((~real[:, -1]).any()) else "left")
    else:
        side = padding_side or "left"
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    lengths = keep.sum(1)
    L = int(lengths.max())
    out = dict(inputs)
    if mask is None and (bool((lengths != L).any()) or positions == "original"):
        # "original": gapped position ids without a mask read as packed sequences to transformers (masking_utils)
        mask = torch.ones(B, S, dtype=torch.long, device=dev)
    src = {k: inputs.get(k) for k in ("input_ids", "inputs_embeds", "labels", "mm_token_type_ids")}
    src["attention_mask"] = mask
    src["position_ids"] = full_pos
    src["index"] = torch.arange(S, device=dev).expand(B, -1)
    fill = dict(_FILL, input_ids=pad_token_id, index=-1)
    for name, t in src.items():
        if t is None:
            continue
        pieces = []
        for b in range(B):
            r = t[b][keep[b].to(t.device)]
            pad = torch.full((L - len(r), *r.shape[1:]), fill[name], dtype=t.dtype, device=t.device)
            pieces.append(torch.cat([r, pad] if side == "right" else [pad, r]))
        out[name] = torch.stack(pieces)
    return out


def kept_features(features: Sequence[torch.Tensor] | torch.Tensor, kept) -> list[torch.Tensor]:
    """The rows ``kept[i]`` of each image's features (N, d): a list of (K_i, d) tensors, the order in which
    the model scatters them into the kept placeholders (``pooler_output`` of ``mm_encoder_outputs``)."""
    feats = list(features)
    rows = _as_kept(kept, [f.shape[0] for f in feats])
    return [f.index_select(0, r.to(f.device)) for f, r in zip(feats, rows)]
