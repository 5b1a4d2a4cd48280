"""Shared fixtures: tiny random models built in-process (no files, no network, seeded locally)."""

from __future__ import annotations

import pytest
import torch

IMAGE_TOKEN_ID = 127
PAD_ID, BOS_ID = 0, 1


def build_tiny_llava(seed: int = 0, text_layers: int = 4, init_std: float = 0.2, attn: str = "sdpa"):
    """A random LLaVA-1.5-shaped model: CLIP tower (336 px, patch 14 -> 576 patches + CLS, hidden 32,
    2 layers), Llama (hidden 64, 4 layers, GQA 4/2 heads, vocab 128), feature layer -2, "default" strategy.
    ``init_std`` larger than HF's 0.02 so that attention is far from uniform and the tests can fail."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=336, patch_size=14, projection_dim=32, initializer_range=init_std)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, max_position_embeddings=2048, pad_token_id=PAD_ID,
                       bos_token_id=BOS_ID, eos_token_id=None, initializer_range=init_std)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", initializer_range=init_std)
    cfg._attn_implementation = attn
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = None  # always generate max_new_tokens
    return model


def build_siglip_llava(strategy: str = "default"):
    """As :func:`build_tiny_llava` with a SigLIP tower (no CLS token: 576 patch tokens); ``strategy``: the
    feature strategy ("default" drops the first patch, "full" keeps all)."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=336, patch_size=14)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=None,
                       initializer_range=0.2)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID, vision_feature_layer=-2,
                      vision_feature_select_strategy=strategy)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, None
    return model


def build_llava_inputs(prompts, n_patches: int = 576, seed: int = 0, pad_left: bool = True) -> dict:
    """Token batches for :func:`build_tiny_llava`. ``prompts``: list of (n_text_before, n_images, n_text_after);
    each image is ``n_patches`` placeholders. Rows are padded (left by default) with PAD_ID, mask 0."""
    g = torch.Generator().manual_seed(seed)
    rows, n_img = [], 0
    for before, images, after in prompts:
        text = lambda n: torch.randint(3, IMAGE_TOKEN_ID, (n,), generator=g)  # noqa: E731
        parts = [torch.tensor([BOS_ID]), text(before)]
        for _ in range(images):
            parts += [torch.full((n_patches,), IMAGE_TOKEN_ID), text(2)]
        rows.append(torch.cat(parts + [text(after)]))
        n_img += images
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), PAD_ID)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for b, r in enumerate(rows):
        sl = slice(L - len(r), L) if pad_left else slice(0, len(r))
        ids[b, sl], mask[b, sl] = r, 1
    pixel_values = torch.randn(n_img, 3, 336, 336, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values}


@pytest.fixture
def tiny_llava():
    """A fresh random tiny LLaVA (see :func:`build_tiny_llava`), eval mode, sdpa attention."""
    return build_tiny_llava()


@pytest.fixture
def llava_inputs():
    """Factory: ``llava_inputs([(before, n_images, after), ...], seed=0)`` -> processor-like dict."""
    return build_llava_inputs


def second_turn(x: dict, sequences: torch.Tensor, seed: int = 1, n: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of a conversation's second turn: the first turn's returned ``sequences`` plus ``n`` random text
    tokens per row, the mask extending the prompt's ``x["attention_mask"]`` with ones."""
    turn = torch.randint(3, IMAGE_TOKEN_ID, (len(sequences), n), generator=torch.Generator().manual_seed(seed))
    conv = torch.cat([sequences, turn], 1)
    mask = torch.ones_like(conv)
    mask[:, : x["attention_mask"].shape[1]] = x["attention_mask"]
    return conv, mask


def kept_per_image(model, method: str, budget: int, n: int = 576) -> int:
    """Image tokens per image that reach the last decoder layers: the budget, or for sparsevlm (whose budget is an
    average over layers) the last count of its schedule (``hf.sparsevlm.schedule``)."""
    if method != "sparsevlm" or budget >= n:
        return min(budget, n)
    from svdprune_utils.hf.sparsevlm import schedule

    return schedule(budget, model.config.text_config.num_hidden_layers, n).counts[-1]


# ------------------------------------------------------------------ LLaVA-NeXT and Qwen2.5-VL (tiny, random)
NEXT_PINPOINTS = [[56, 112], [112, 56], [112, 112]]


def build_tiny_llava_next(seed: int = 0):
    """A random LLaVA-NeXT-shaped model: CLIP tower (56 px tiles, patch 14 -> 16 patches + CLS per tile, 2
    layers), anyres grid pinpoints up to 2×2 tiles, Llama (hidden 64, 2 layers), layer -2, "default" strategy."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=56, patch_size=14, projection_dim=32, initializer_range=0.2)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, pad_token_id=PAD_ID, bos_token_id=BOS_ID,
                       eos_token_id=None, initializer_range=0.2)
    cfg = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
                          vision_feature_layer=-2, vision_feature_select_strategy="default",
                          image_grid_pinpoints=NEXT_PINPOINTS)
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
    sizes = [s for _, imgs, _ in rows for s in imgs]
    tiles = [image_size_to_num_patches(s, NEXT_PINPOINTS, 56) for s in sizes]
    pixels = torch.zeros(len(sizes), max(tiles), 3, 56, 56)
    for i, t in enumerate(tiles):
        pixels[i, :t] = torch.randn(t, 3, 56, 56, generator=g)
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


QWEN_IDS = dict(image_token_id=120, video_token_id=121, vision_start_token_id=122, vision_end_token_id=123)


def build_tiny_qwen(seed: int = 0):
    """A random Qwen2.5-VL-shaped model: windowed vision tower (2 blocks, the second full attention, patch 14,
    2×2 merger, window 112 px), Qwen2 decoder (hidden 64, 2 layers, mrope sections 2/3/3)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
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
