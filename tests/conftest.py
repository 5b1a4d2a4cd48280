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
from svdprune_utils.testbed.families import (QWEN_IDS, build_tiny_qwen, build_tiny_qwen2_vl,  # noqa: E402, F401
                                             qwen_inputs)
from svdprune_utils.testbed.families import build_tiny_llava_next as _build_next  # noqa: E402
from svdprune_utils.testbed.families import next_inputs  # noqa: E402, F401

NEXT_PINPOINTS = [[56, 112], [112, 56], [112, 112]]


def build_tiny_llava_next(seed: int = 0):
    """The tests' LLaVA-NeXT: 56-px tiles (16 patches + CLS each), grid pinpoints up to 2×2 tiles."""
    return _build_next(seed, image_size=56, pinpoints=NEXT_PINPOINTS)
