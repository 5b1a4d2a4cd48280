"""Prefill latency vs budget for a pruned LLaVA, next to the FLOPs model, and selection overhead.

    python benchmarks/llava_speed.py --model data/<embedded model>                 # trained weights
    python benchmarks/llava_speed.py --random-weights --config llava-1.5-7b --device cuda

``--random-weights`` builds the architecture of ``data/configs/<config>.json`` (or a JSON path) with
random weights: speed and memory only, answers meaningless; nothing is downloaded. ``--text-layers N``
keeps only the first N decoder layers (full width) where the whole model does not fit (a CPU laptop):
the FLOPs model then uses the same truncated config, and the vision tower's fixed cost weighs more. The table comes
from ``svdprune_utils.analysis.efficiency.prefill_table``: for every budget and method the model is patched
with ``patch_llava`` and one prefill (a forward with the KV cache on, image included) is timed, in
interleaved rounds (a warm-up round, then ``--repeats`` rounds over every configuration; median per
configuration), next to the decoder-FLOPs ratio to the unpruned prefill and the
time of ``select_tokens`` alone on one image's features on the device.
Prints a markdown table; ``--out`` also writes it (and a CSV next to it).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import pandas as pd
import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from svdprune_utils.analysis.efficiency import (add_prefill_arguments, bench_dtype, check_methods, device_name,
                                                prefill_table, report_table)
from svdprune_utils.testbed.tiny import auto_device

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_config(name: str) -> LlavaConfig:
    path = pathlib.Path(name) if name.endswith(".json") else REPO / "data" / "configs" / f"{name}.json"
    if not path.is_file():
        raise SystemExit(f"config not found: {path}")
    kind = json.loads(path.read_text()).get("model_type")
    if kind != "llava":
        raise SystemExit(f"{path}: model_type {kind!r} is not 'llava' (LLaVA-NeXT, Qwen2.5-VL: family_speed.py)")
    return LlavaConfig.from_json_file(str(path))


def build_model(args, device, dtype) -> LlavaForConditionalGeneration:
    if args.random_weights:
        config = load_config(args.config)
        if args.text_layers is not None:
            if not 1 <= args.text_layers <= config.text_config.num_hidden_layers:
                raise SystemExit(f"--text-layers must be in [1, {config.text_config.num_hidden_layers}], "
                                 f"got {args.text_layers}")
            config.text_config.num_hidden_layers = args.text_layers
        torch.manual_seed(args.seed)  # a script, not the library: seeding the global RNG is fine here
        with torch.device(device):
            model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    else:
        model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=dtype).to(device)
    return model.eval()


def make_inputs(model, n_text: int, device, dtype, seed: int) -> dict:
    """One image + ``n_text`` random text tokens around the image placeholder run (LLaVA-1.5 layout)."""
    from svdprune_utils.hf.patch import tokens_per_image

    cfg = model.config
    vc = cfg.vision_config
    n_img = tokens_per_image(model)  # from the tower and the feature strategy
    g = torch.Generator().manual_seed(seed)
    vocab = min(cfg.text_config.vocab_size, cfg.image_token_id)
    text = torch.randint(3, vocab, (n_text,), generator=g)
    ids = torch.cat([text[:4], torch.full((n_img,), cfg.image_token_id), text[4:]])[None]
    pixels = torch.randn(1, 3, vc.image_size, vc.image_size, generator=g)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "pixel_values": pixels.to(device=device, dtype=dtype),
    }


def run(args, parser=None) -> pd.DataFrame:
    device = auto_device(args.device)
    dtype = bench_dtype(args.dtype, device)
    model = build_model(args, device, dtype)
    inputs = make_inputs(model, args.text_tokens, device, dtype, args.seed)
    try:
        budgets = [int(b) for b in args.budgets.split(",")]
        check_methods(model, args.methods.split(","), budgets)  # e.g. fastv on < 3 decoder layers: before timing
    except ValueError as e:
        if parser is None:
            raise
        parser.error(str(e))
    return prefill_table(model, inputs, args.methods.split(","), budgets, repeats=args.repeats,
                         overhead_budget=args.overhead_budget)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a local directory or hub id of a LlavaForConditionalGeneration")
    src.add_argument("--random-weights", action="store_true", help="random weights for --config (speed only)")
    p.add_argument("--config", default="llava-1.5-7b", help="data/configs/<name>.json or a JSON path")
    p.add_argument("--text-layers", type=int, help="with --random-weights: keep only the first N decoder layers "
                   "(the full width, for machines that cannot hold the whole model; FLOPs use the same config)")
    add_prefill_arguments(p, budgets="576,192,128,64,32,16", methods="svd,fastv,cls_attention,random", repeats=5)
    args = p.parse_args(argv)
    if args.text_layers is not None and not args.random_weights:
        p.error("--text-layers truncates a --random-weights model; it cannot apply to --model")
    df = run(args, p)
    model_name = args.model or args.config + " (random weights" + (
        f", first {args.text_layers} decoder layers)" if args.text_layers else ")")
    header = f"device: {device_name(auto_device(args.device))}; model: {model_name}; torch {torch.__version__}\n\n"
    report_table(df, header, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
