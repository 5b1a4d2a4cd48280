"""Prefill latency vs budget for a pruned LLaVA, next to the FLOPs model, and selection overhead.

    python benchmarks/llava_speed.py --model data/<embedded model>                 # trained weights
    python benchmarks/llava_speed.py --random-weights --config llava-1.5-7b --device cuda

``--random-weights`` builds the architecture of ``data/configs/<config>.json`` (or a JSON path) with
random weights: speed and memory only, answers meaningless; nothing is downloaded. For every budget
and method the model is patched with ``patch_llava`` and one prefill (a forward with the KV cache on,
image included) is timed (median of ``--repeats`` after a warm-up). The FLOPs ratio is the decoder
FLOPs at that budget over those at 576 (``efficiency.prefill_flops``). The selection overhead is the
median time of ``select_tokens`` alone on one image's (576, d_vision) features on the device.
Prints a markdown table; ``--out`` also writes it (and a CSV next to it).
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import LlavaConfig, LlavaForConditionalGeneration

from svdprune_utils import select_tokens
from svdprune_utils.efficiency import measure_prefill, prefill_flops, synchronize
from svdprune_utils.llava import patch_llava, unpatch_llava

REPO = pathlib.Path(__file__).resolve().parents[1]


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_config(name: str) -> LlavaConfig:
    path = pathlib.Path(name) if name.endswith(".json") else REPO / "data" / "configs" / f"{name}.json"
    if not path.is_file():
        raise SystemExit(f"config not found: {path}")
    return LlavaConfig.from_json_file(str(path))


def build_model(args, device, dtype) -> LlavaForConditionalGeneration:
    if args.random_weights:
        config = load_config(args.config)
        torch.manual_seed(args.seed)  # a script, not the library: seeding the global RNG is fine here
        with torch.device(device):
            model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    else:
        model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=dtype).to(device)
    return model.eval()


def make_inputs(model, n_text: int, device, dtype, seed: int) -> dict:
    """One image + ``n_text`` random text tokens around the image placeholder run (LLaVA-1.5 layout)."""
    cfg = model.config
    vc = cfg.vision_config
    n_img = (vc.image_size // vc.patch_size) ** 2
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


def selection_overhead(method: str, n: int, d: int, budget: int, device, repeats: int, seed: int) -> float:
    """Median seconds of ``select_tokens`` on one image's (n, d) features (after one warm-up)."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, d, generator=g).to(device)
    signals = {"attention": torch.rand(n, generator=g).to(device)} if method in ("cls_attention", "fastv") else {}
    times = []
    for i in range(repeats + 1):
        synchronize(device)
        t0 = time.perf_counter()
        select_tokens(feats, budget, method, **signals)
        synchronize(device)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(args) -> pd.DataFrame:
    device = resolve_device(args.device)
    dtype = {"auto": torch.float16 if device.type == "cuda" else torch.float32,
             "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    model = build_model(args, device, dtype)
    inputs = make_inputs(model, args.text_tokens, device, dtype, args.seed)
    n_img = inputs["input_ids"].shape[1] - args.text_tokens
    cfg = model.config
    full_flops = prefill_flops(cfg, args.text_tokens + n_img)
    rows = []
    base = None
    budgets = sorted({int(b) for b in args.budgets.split(",")}, reverse=True)
    jobs = [(m, b) for m in args.methods.split(",") for b in budgets]
    for method, budget in tqdm(jobs, desc="method x budget"):
        patch_llava(model, method=method, budget=budget)
        try:
            t = measure_prefill(model, inputs, repeats=args.repeats, warmup=1)["median_s"]
        finally:
            unpatch_llava(model)
        k = min(budget, n_img)
        if method == "fastv":
            flops = prefill_flops(cfg, args.text_tokens + n_img, n_after=args.text_tokens + k, prune_layer=2)
        else:
            flops = prefill_flops(cfg, args.text_tokens + k)
        if budget >= n_img and base is None:
            base = t
        rows.append({"method": method, "budget": k, "prefill_ms": 1e3 * t, "flops_ratio": flops / full_flops})
    if base is None:
        patch_llava(model, method="svd", budget=n_img)
        try:
            base = measure_prefill(model, inputs, repeats=args.repeats, warmup=1)["median_s"]
        finally:
            unpatch_llava(model)
    df = pd.DataFrame(rows)
    df["latency_ratio"] = df["prefill_ms"] / (1e3 * base)
    df["speedup_vs_flops"] = (1 / df["latency_ratio"]) / (1 / df["flops_ratio"])
    d_vis = cfg.vision_config.hidden_size
    K = args.overhead_budget
    sel = {m: selection_overhead(m, n_img, d_vis, K, device, args.repeats, args.seed) for m in args.methods.split(",")}
    df["selection_ms"] = df["method"].map(lambda m: 1e3 * sel[m])
    pruned = df[df["budget"] == min(K, n_img)].set_index("method")["prefill_ms"]
    df["selection_pct_of_pruned_prefill"] = df["method"].map(lambda m: 100 * 1e3 * sel[m] / pruned.get(m, float("nan")))
    return df


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a local directory or hub id of a LlavaForConditionalGeneration")
    src.add_argument("--random-weights", action="store_true", help="random weights for --config (speed only)")
    p.add_argument("--config", default="llava-1.5-7b", help="data/configs/<name>.json or a JSON path")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp16", "bf16", "fp32"])
    p.add_argument("--budgets", default="576,192,128,64,32,16")
    p.add_argument("--methods", default="svd,fastv,cls_attention,random")
    p.add_argument("--text-tokens", type=int, default=40, help="prompt tokens besides the image")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--overhead-budget", type=int, default=64, help="K for the selection-overhead columns")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the markdown table here (and a .csv beside it)")
    args = p.parse_args(argv)
    df = run(args)
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    header = f"device: {name}; model: {args.model or args.config + ' (random weights)'}; torch {torch.__version__}\n\n"
    table = header + df.to_markdown(index=False, floatfmt=".3f")
    print(table)
    if args.out:
        out = pathlib.Path(args.out)
        out.write_text(table + "\n")
        df.to_csv(out.with_suffix(".csv"), index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
