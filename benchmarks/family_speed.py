"""Prefill latency vs budget for LLaVA-NeXT (anyres) and Qwen2.5-VL pruned with ``patch_model``, built with random
weights from a config shipped in ``data/configs/`` (nothing downloaded; speed and memory only, answers meaningless).

    python benchmarks/family_speed.py --config llava-v1.6-vicuna-7b --image 672x672 --device cuda
    python benchmarks/family_speed.py --config qwen2.5-vl-7b --image 1008x1008 --device cuda
    python benchmarks/family_speed.py --config qwen2.5-vl-7b --text-layers 1 --vision-layers 2   # a CPU

One prompt with one image of ``--image`` pixels (H×W): LLaVA-NeXT tiles it as its processor would (the grid
pinpoint that fits, ``image_size_to_num_patches``) and the placeholder run is the model's own packed length
(base tile + unpadded grid + newlines); Qwen2.5-VL gets a (1, H/14, W/14) patch grid, H·W/784 merged tokens.
The table is :func:`svdprune_utils.analysis.efficiency.prefill_table` (interleaved rounds, median per
configuration, decoder-FLOPs ratio, KV-cache bytes, and the selection alone on the device at the size the method
scores: LLaVA-NeXT the patch tokens × the tower width, Qwen the merged tokens × 4 × the tower width).
``--text-layers`` / ``--vision-layers`` keep only the first layers (full width) where the model does not fit or
the machine is slow; the FLOPs model then uses the same truncated config.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch

from svdprune_utils.analysis.efficiency import (add_prefill_arguments, bench_dtype, check_methods, device_name,
                                                prefill_table, report_table)
from svdprune_utils.testbed.tiny import auto_device

REPO = pathlib.Path(__file__).resolve().parents[1]


def load(name: str):
    """(config, model class) for ``data/configs/<name>.json`` or a JSON path, by its ``model_type``."""
    from transformers import (LlavaNextConfig, LlavaNextForConditionalGeneration, Qwen2_5_VLConfig,
                              Qwen2_5_VLForConditionalGeneration)

    path = pathlib.Path(name) if name.endswith(".json") else REPO / "data" / "configs" / f"{name}.json"
    if not path.is_file():
        raise SystemExit(f"config not found: {path}")
    kind = json.loads(path.read_text()).get("model_type")
    classes = {"llava_next": (LlavaNextConfig, LlavaNextForConditionalGeneration),
               "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration)}
    if kind not in classes:
        raise SystemExit(f"{path}: model_type {kind!r} is not one of {sorted(classes)} (LLaVA-1.5: llava_speed.py)")
    cfg_cls, model_cls = classes[kind]
    return cfg_cls.from_json_file(str(path)), model_cls


def build(args, device, dtype):
    config, model_cls = load(args.config)
    text = config.text_config
    vision = config.vision_config
    if args.text_layers is not None:
        if not 1 <= args.text_layers <= text.num_hidden_layers:
            raise SystemExit(f"--text-layers must be in [1, {text.num_hidden_layers}], got {args.text_layers}")
        text.num_hidden_layers = args.text_layers
        if getattr(text, "layer_types", None):
            text.layer_types = text.layer_types[:args.text_layers]
    if args.vision_layers is not None:
        name = "depth" if hasattr(vision, "depth") else "num_hidden_layers"
        if not 1 <= args.vision_layers <= getattr(vision, name):
            raise SystemExit(f"--vision-layers must be in [1, {getattr(vision, name)}], got {args.vision_layers}")
        setattr(vision, name, args.vision_layers)
        if hasattr(vision, "fullatt_block_indexes"):  # keep one full-attention block among the windowed ones
            vision.fullatt_block_indexes = [args.vision_layers - 1]
    torch.manual_seed(args.seed)  # a script, not the library: seeding the global RNG is fine here
    with torch.device(device):
        model = model_cls._from_config(config, dtype=dtype)
    return model.eval()


def make_inputs(model, image: tuple, n_text: int, device, dtype, seed: int) -> tuple[dict, tuple]:
    """One prompt: 4 text tokens, the image's placeholders, the rest of ``n_text``; and the (n, d) the methods
    score for this image."""
    from svdprune_utils.hf.families import FAMILIES, family_name

    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    H, W = image
    vocab = cfg.text_config.vocab_size
    special = {getattr(cfg, k, None) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                                 "vision_end_token_id", "vision_token_id")}
    pool = torch.tensor([t for t in range(3, min(1000, vocab)) if t not in special])  # plain text ids, any vocab
    text = pool[torch.randint(len(pool), (n_text,), generator=g)]
    if family_name(model) == "llava_next":
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        side = cfg.vision_config.image_size
        tiles = image_size_to_num_patches((H, W), cfg.image_grid_pinpoints, side)
        sizes = torch.tensor([[H, W]])
        lay = FAMILIES["llava_next"].layout(model, {"image_sizes": sizes})
        ids = torch.cat([text[:4], torch.full((lay.counts[0],), cfg.image_token_id), text[4:]])[None]
        x = {"pixel_values": torch.randn(1, tiles, 3, side, side, generator=g), "image_sizes": sizes}
        shape = (len(lay.candidates[0]), cfg.vision_config.hidden_size)
    else:
        p = cfg.vision_config.patch_size
        m = cfg.vision_config.spatial_merge_size
        if H % (p * m) or W % (p * m):
            raise SystemExit(f"--image must be a multiple of {p * m} pixels on each side for Qwen, got {H}x{W}")
        h, w = H // p, W // p
        n = h * w // (m * m)
        mid = [cfg.vision_start_token_id, *[cfg.image_token_id] * n, cfg.vision_end_token_id]
        ids = torch.cat([text[:4], torch.tensor(mid), text[4:]])[None]
        types = (ids == cfg.image_token_id).long()
        pix = torch.randn(h * w, 3 * cfg.vision_config.temporal_patch_size * p * p, generator=g)
        x = {"pixel_values": pix, "image_grid_thw": torch.tensor([[1, h, w]]), "mm_token_type_ids": types}
        shape = (n, m * m * cfg.vision_config.hidden_size)
    x |= {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return {k: (v.to(device=device, dtype=dtype) if k == "pixel_values" else v.to(device)) for k, v in x.items()}, shape


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="llava-v1.6-vicuna-7b", help="data/configs/<name>.json or a JSON path")
    p.add_argument("--image", default="672x672", help="image size HxW in pixels")
    p.add_argument("--text-layers", type=int, help="keep only the first N decoder layers (full width)")
    p.add_argument("--vision-layers", type=int, help="keep only the first N vision-tower layers (full width)")
    add_prefill_arguments(p, budgets="576,192,64", methods="svd,random", repeats=3)  # the unpruned run is added
    args = p.parse_args(argv)
    try:
        image = tuple(int(v) for v in args.image.lower().split("x"))
    except ValueError:
        image = ()
    if len(image) != 2 or min(image) < 1:
        p.error(f"--image must be HxW in pixels, e.g. 672x672; got {args.image!r}")
    try:
        budgets = [int(b) for b in args.budgets.split(",")]
    except ValueError:
        p.error(f"--budgets must be comma-separated integers, got {args.budgets!r}")
    device = auto_device(args.device)
    dtype = bench_dtype(args.dtype, device)
    model = build(args, device, dtype)
    inputs, shape = make_inputs(model, image, args.text_tokens, device, dtype, args.seed)
    n_img = int((inputs["input_ids"] == model.config.image_token_id).sum())
    try:  # e.g. fastv on a decoder cut to fewer than 3 layers: one line, before any timing
        check_methods(model, args.methods.split(","), budgets + [n_img])
    except ValueError as e:
        p.error(str(e))
    df = prefill_table(model, inputs, args.methods.split(","), budgets + [n_img], repeats=args.repeats,
                       overhead_budget=args.overhead_budget, selection_shape=shape)
    name = device_name(device)
    cut = ", ".join(f"first {n} {what} layers" for n, what in ((args.text_layers, "decoder"),
                                                               (args.vision_layers, "vision")) if n)
    header = (f"device: {name}; model: {args.config} (random weights{', ' + cut if cut else ''}); image {args.image}: "
              f"{n_img} placeholders, selection on {shape[0]}×{shape[1]} features; dtype {dtype}; "
              f"torch {torch.__version__}\n\n")
    if torch.cuda.is_available() and device.type == "cuda":
        header += f"peak memory: {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB\n\n"
    report_table(df, header, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
