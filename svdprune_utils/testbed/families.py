"""Tiny random LLaVA-NeXT, Qwen2.5-VL and Qwen2-VL models built in-process (no download), and prompt batches
for them: what the tests and notebook 05 run :func:`svdprune_utils.hf.patch.patch_model` on. Random weights:
they show layouts, selections and the generate contract, never answers.

Token ids follow the tiny LLaVA of the tests: PAD 0, BOS 1, LLaVA-NeXT's image placeholder 127; Qwen's image,
video, vision-start and vision-end tokens 120–123 (:data:`QWEN_IDS`).
"""

from __future__ import annotations

import torch

__all__ = ["IMAGE_TOKEN_ID", "PAD_ID", "BOS_ID", "QWEN_IDS", "build_tiny_llava_next", "build_tiny_qwen",
           "build_tiny_qwen2_vl", "next_inputs", "qwen_inputs", "next_image_inputs", "qwen_image_inputs"]

IMAGE_TOKEN_ID = 127
PAD_ID, BOS_ID = 0, 1
QWEN_IDS = dict(image_token_id=120, video_token_id=121, vision_start_token_id=122, vision_end_token_id=123)


def build_tiny_llava_next(seed: int = 0, image_size: int = 336, pinpoints=None):
    """A random LLaVA-NeXT-shaped model: CLIP tower (``image_size`` px tiles, patch 14, hidden 32, 2 layers), anyres
    grid pinpoints (default LLaVA-1.6's, scaled to the tile: 1×2, 2×1, 2×2, 3×1, 1×3 tiles), Llama decoder (hidden
    64, 2 layers), feature layer −2, "default" strategy. At 336 px an image has LLaVA-1.6's real token layout."""
    s = image_size
    pinpoints = pinpoints or [[s, 2 * s], [2 * s, s], [2 * s, 2 * s], [3 * s, s], [s, 3 * s]]
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=image_size, patch_size=14, projection_dim=32, initializer_range=0.2)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, pad_token_id=PAD_ID, bos_token_id=BOS_ID,
                       eos_token_id=None, initializer_range=0.2)
    cfg = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
                          vision_feature_layer=-2, vision_feature_select_strategy="default",
                          image_grid_pinpoints=pinpoints)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlavaNextForConditionalGeneration(cfg).eval()
        with torch.no_grad():
            model.model.image_newline.normal_()
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = PAD_ID, None
    return model


def next_inputs(model, rows, seed: int = 0, pad_left: bool = True) -> dict:
    """Batches for :func:`build_tiny_llava_next`: ``rows`` lists, per row, (n_text_before, [image sizes (H, W)],
    n_text_after); each image's placeholder count is what the model's own get_image_features packs."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    g = torch.Generator().manual_seed(seed)
    side = model.config.vision_config.image_size
    sizes = [s for _, imgs, _ in rows for s in imgs]
    tiles = [image_size_to_num_patches(s, model.config.image_grid_pinpoints, side) for s in sizes]
    pixels = torch.zeros(len(sizes), max(tiles), 3, side, side)
    for i, t in enumerate(tiles):
        pixels[i, :t] = torch.randn(t, 3, side, side, generator=g)
    image_sizes = torch.tensor(sizes)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pixels, image_sizes=image_sizes, return_dict=True)
    counts = [int(p.shape[0]) for p in feats.pooler_output]
    seqs, i = [], 0
    for before, imgs, after in rows:
        parts = [torch.tensor([BOS_ID]), torch.randint(3, IMAGE_TOKEN_ID, (before,), generator=g)]
        for _ in imgs:
            parts += [torch.full((counts[i],), IMAGE_TOKEN_ID), torch.randint(3, IMAGE_TOKEN_ID, (2,), generator=g)]
            i += 1
        parts.append(torch.randint(3, IMAGE_TOKEN_ID, (after,), generator=g))
        seqs.append(torch.cat(parts))
    return _padded(seqs, pad_left) | {"pixel_values": pixels, "image_sizes": image_sizes}


def _padded(seqs, pad_left: bool, extra: dict | None = None) -> dict:
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), PAD_ID)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    out = {k: torch.zeros(len(seqs), L, dtype=torch.long) for k in (extra or {})}
    for b, s in enumerate(seqs):
        cols = slice(L - len(s), L) if pad_left else slice(0, len(s))
        ids[b, cols], mask[b, cols] = s, 1
        for k, v in (extra or {}).items():
            out[k][b, cols] = v[b]
    return {"input_ids": ids, "attention_mask": mask, **out}


def build_tiny_qwen(seed: int = 0, text_layers: int = 2):
    """A random Qwen2.5-VL-shaped model: windowed vision tower (2 blocks, the second full attention, patch 14,
    2×2 merger, window 112 px), Qwen2 decoder (hidden 64, ``text_layers`` layers, mrope sections 2/3/3)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128, initializer_range=0.2, pad_token_id=PAD_ID,
                bos_token_id=BOS_ID, eos_token_id=None,
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2, window_size=112, fullatt_block_indexes=[1], initializer_range=0.2)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **QWEN_IDS)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = PAD_ID, None
    return model


def qwen_inputs(rows, seed: int = 0, pad_left: bool = True) -> dict:
    """Batches for :func:`build_tiny_qwen`: ``rows`` lists, per row, (n_text_before, [patch grids (h, w)],
    n_text_after); each image is <vision_start> + h·w/4 placeholders + <vision_end>, as the processor lays it."""
    g = torch.Generator().manual_seed(seed)
    grids = [(1, h, w) for _, imgs, _ in rows for h, w in imgs]
    pixels = torch.randn(sum(t * h * w for t, h, w in grids), 3 * 2 * 14 * 14, generator=g)
    seqs, types, i = [], [], 0
    text = lambda n: torch.randint(3, 120, (n,), generator=g)  # noqa: E731
    for before, imgs, after in rows:
        parts, tt = [torch.tensor([BOS_ID]), text(before)], [torch.zeros(1 + before, dtype=torch.long)]
        for _ in imgs:
            n = grids[i][1] * grids[i][2] // 4
            parts += [torch.tensor([QWEN_IDS["vision_start_token_id"]]), torch.full((n,), QWEN_IDS["image_token_id"]),
                      torch.tensor([QWEN_IDS["vision_end_token_id"]]), text(2)]
            tt += [torch.zeros(1, dtype=torch.long), torch.ones(n, dtype=torch.long), torch.zeros(3, dtype=torch.long)]
            i += 1
        parts.append(text(after))
        tt.append(torch.zeros(after, dtype=torch.long))
        seqs.append(torch.cat(parts))
        types.append(torch.cat(tt))
    out = _padded(seqs, pad_left, {"mm_token_type_ids": types})
    return out | {"pixel_values": pixels, "image_grid_thw": torch.tensor(grids)}


def build_tiny_qwen2_vl(seed: int = 0):
    """A random Qwen2-VL-shaped model (full-attention tower, no windows), with :func:`qwen_inputs`' token ids."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128, initializer_range=0.2, pad_token_id=PAD_ID,
                bos_token_id=BOS_ID, eos_token_id=None, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                  mlp_ratio=2)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision,
                                                              **QWEN_IDS)).eval()
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = PAD_ID, None
    return model


# ------------------------------------------------------------------------- one real image, processed
def next_image_inputs(model, image, n_before: int = 4, n_after: int = 8, seed: int = 0) -> dict:
    """One prompt for :func:`build_tiny_llava_next` with a real image (H×W×3 array or PIL image), preprocessed by
    transformers' ``LlavaNextImageProcessor`` with the model's tile size and grid pinpoints; the placeholder run is
    the model's own packed length; the text around it is random ids."""
    from transformers import LlavaNextImageProcessorPil

    from ..hf.families import FAMILIES

    side = model.config.vision_config.image_size
    proc = LlavaNextImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                                   image_grid_pinpoints=model.config.image_grid_pinpoints)
    px = proc(images=image, return_tensors="pt")
    n = FAMILIES["llava_next"].layout(model, {"image_sizes": px["image_sizes"]}).counts[0]
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, IMAGE_TOKEN_ID, (n_before + n_after,), generator=g)
    ids = torch.cat([torch.tensor([BOS_ID]), text[:n_before], torch.full((n,), IMAGE_TOKEN_ID), text[n_before:]])
    return {"input_ids": ids[None], "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
            "pixel_values": px["pixel_values"], "image_sizes": px["image_sizes"]}


def qwen_image_inputs(image, max_pixels: int = 448 * 448, n_before: int = 4, n_after: int = 8, seed: int = 0) -> dict:
    """One prompt for :func:`build_tiny_qwen` with a real image, preprocessed by transformers' Qwen2-VL image
    processor (dynamic resolution: resized to a multiple of 28 px, at most ``max_pixels``); <vision_start>, the
    image's t·h·w/4 placeholders and <vision_end>, with random text ids around them."""
    from transformers import Qwen2VLImageProcessorPil

    proc = Qwen2VLImageProcessorPil(max_pixels=max_pixels)
    px = proc(images=image, return_tensors="pt")
    t, h, w = px["image_grid_thw"][0].tolist()
    n = t * h * w // 4
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, 120, (n_before + n_after,), generator=g)
    mid = torch.tensor([QWEN_IDS["vision_start_token_id"], *[QWEN_IDS["image_token_id"]] * n,
                        QWEN_IDS["vision_end_token_id"]])
    ids = torch.cat([torch.tensor([BOS_ID]), text[:n_before], mid, text[n_before:]])
    return {"input_ids": ids[None], "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
            "mm_token_type_ids": (ids == QWEN_IDS["image_token_id"]).long()[None],
            "pixel_values": px["pixel_values"], "image_grid_thw": px["image_grid_thw"]}
