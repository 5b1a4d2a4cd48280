"""What pruning buys: a prefill FLOPs model, KV-cache bytes, and measured prefill/decode timings.

FLOPs model (decoder layers of the language model; one multiply-add = 2 FLOPs). For a Llama layer with
hidden size d, n_kv key/value heads of size h (d_kv = n_kv·h), FFN width m and a prefill of n tokens:

    projections  2·n·(2·d² + 2·d·d_kv)     (q and o: d×d; k and v: d×d_kv)
    attention    2·2·n²·d                  (scores QKᵀ and the weighted sum AV)
    FFN (SwiGLU) 2·3·n·d·m                 (gate, up, down)

With d_kv = d this is 2·(4nd² + 2n²d + 3ndm); ``formula="fastv"`` gives FastV's count
4nd² + 2n²d + 2ndm (MACs of a two-matrix FFN), to compare with numbers quoted in papers.
Pruning inside the LLM counts each layer at the length it processes: FastV's layers < K at the full length and
the rest at the pruned one; SparseVLM's stages by its schedule (a pruning layer still processes its input, only
its output is cut). :func:`llm_tokens` gives the lengths per layer for every method and :func:`budget_table`
what a budget means for each (tokens entering the LLM, image tokens per layer, prefill FLOPs), and
:func:`equal_flops_budget` the pre-LLM budget that costs what an in-LLM method costs (to compare them at equal
compute, as the field reports FastV and SparseVLM, next to equal tokens). The vision tower
and the LM head are excluded (they do not change with the budget).

KV cache: 2 (k and v) · n_kv · h · n · bytes(dtype) per layer, summed over layers.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import numpy as np
import torch

__all__ = [
    "text_config", "llm_tokens", "budget_table", "equal_flops_budget", "prefill_flops",
    "kv_cache_bytes", "cache_bytes", "measure_prefill", "measure_generate",
    "synchronize", "time_call", "selection_time", "check_methods", "prefill_table",
]


def text_config(config: Any):
    """The language-model config of a LLaVA config (``.text_config``) or the config itself."""
    return getattr(config, "text_config", None) or config


def _dims(config: Any) -> tuple[int, int, int, int, int]:
    t = text_config(config)
    d = int(t.hidden_size)
    heads = int(t.num_attention_heads)
    head_dim = int(getattr(t, "head_dim", None) or d // heads)
    n_kv = int(getattr(t, "num_key_value_heads", None) or heads)
    return d, n_kv * head_dim, int(t.intermediate_size), int(t.num_hidden_layers), n_kv


def _layer_flops(n: int, d: int, d_kv: int, m: int, formula: str) -> int:
    if formula == "llama":
        return 2 * n * (2 * d * d + 2 * d * d_kv) + 4 * n * n * d + 6 * n * d * m
    if formula == "fastv":
        return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m
    raise ValueError(f"formula must be 'llama' or 'fastv', got {formula!r}")


def llm_tokens(config: Any, method: str, budget: int, n_text: int, n_img: int, fastv_layer: int = 2) -> list:
    """Tokens (text + image) each decoder layer processes in the prefill of one prompt with ``n_text`` text tokens
    and one image of ``n_img`` tokens, patched with ``method`` at ``budget``: pre-LLM methods min(budget, n_img)
    image tokens in every layer; FastV n_img in layers < ``fastv_layer``, min(budget, n_img) after; SparseVLM its
    :func:`~svdprune_utils.hf.sparsevlm.schedule` (budget = its official average per layer)."""
    L = _dims(config)[3]
    if budget >= n_img:
        return [n_text + n_img] * L
    if method == "fastv":
        return [n_text + (n_img if i < fastv_layer else budget) for i in range(L)]
    if method == "sparsevlm":
        from ..hf.sparsevlm import schedule

        return [n_text + c for c in schedule(budget, L, n_img).per_layer(n_img, L)]
    return [n_text + budget] * L


def _check_budget_args(methods, budgets, n_text, n_img) -> list:
    """The method list (one name or several), after checking every argument: known methods, budgets ints >= 1,
    n_text an int >= 0, n_img an int >= 1 (ValueError naming the bad one)."""
    from ..hf.prune import known_methods

    methods = [methods] if isinstance(methods, str) else list(methods)
    unknown = [m for m in methods if m not in known_methods()]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {known_methods()}")
    bad = [b for b in budgets if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1]
    if bad:
        raise ValueError(f"budgets must be ints >= 1, got {bad}")
    for name, v in (("n_text", n_text), ("n_img", n_img)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < (0 if name == "n_text" else 1):
            raise ValueError(f"{name} must be an int >= {0 if name == 'n_text' else 1}, got {v!r}")
    return methods


def equal_flops_budget(config: Any, method: str, budget: int, n_text: int, n_img: int, fastv_layer: int = 2) -> int:
    """The pre-LLM budget at equal prefill compute: the largest K' <= ``n_img`` whose pre-LLM prefill (K' image
    tokens in every decoder layer) costs no more decoder FLOPs than ``method`` at ``budget`` (per layer as in
    :func:`llm_tokens`). For a pre-LLM method this is min(budget, n_img); for FastV and SparseVLM it is larger,
    since their first layers read every image token. One prompt of ``n_text`` text tokens and one image.
    ValueError for an unknown method, a budget SparseVLM cannot reach, or a bad count."""
    _check_budget_args(method, [budget], n_text, n_img)
    target = prefill_flops(config, 0, per_layer=llm_tokens(config, method, int(budget), n_text, n_img, fastv_layer))
    lo, hi = 0, int(n_img)  # prefill FLOPs grow with the token count: bisect for the last K' within the target
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if prefill_flops(config, n_text + mid) <= target:
            lo = mid
        else:
            hi = mid - 1
    return lo


def budget_table(config: Any, methods, budgets, n_text: int, n_img: int, fastv_layer: int = 2):
    """What a budget means for each method, for one prompt of ``n_text`` text tokens and one image of ``n_img``
    image tokens (576 for LLaVA-1.5), as a DataFrame: tokens_entering_llm (image tokens per image at the
    decoder's input), image_tokens_last_layer, image_tokens_per_layer (mean over the decoder layers of what each
    processes), official_average (SparseVLM's own counter, which counts a pruning layer at its pruned output; NaN
    for the others), flops_ratio (decoder prefill FLOPs to the unpruned prompt's) and kv_ratio (KV-cache size, same
    ratio) and equal_flops_budget (the pre-LLM budget of the same prefill FLOPs: :func:`equal_flops_budget`).
    Budgets a method cannot reach (SparseVLM below its minimum) are left out."""
    import pandas as pd

    from ..hf.sparsevlm import schedule

    methods = _check_budget_args(methods, budgets, n_text, n_img)
    L = _dims(config)[3]
    full = prefill_flops(config, n_text + n_img)
    rows = []
    for method in methods:
        for b in budgets:
            try:
                per = llm_tokens(config, method, int(b), n_text, n_img, fastv_layer)
            except ValueError:
                continue
            official = float("nan")
            if method == "sparsevlm":
                official = schedule(int(b), L, n_img).average if b < n_img else float(n_img)
            rows.append({"method": method, "budget": int(b), "tokens_entering_llm": per[0] - n_text,
                         "image_tokens_last_layer": per[-1] - n_text,
                         "image_tokens_per_layer": sum(per) / L - n_text, "official_average": official,
                         "flops_ratio": prefill_flops(config, 0, per_layer=per) / full,
                         "kv_ratio": sum(per) / (L * (n_text + n_img)),
                         "equal_flops_budget": equal_flops_budget(config, method, int(b), n_text, n_img, fastv_layer)})
    return pd.DataFrame(rows)


def prefill_flops(
    config: Any,
    n_tokens: int,
    *,
    n_after: int | None = None,
    prune_layer: int = 0,
    formula: str = "llama",
    per_layer: list | None = None,
) -> int:
    """FLOPs of the decoder layers for a prefill of ``n_tokens`` tokens (text + image).

    ``n_after``/``prune_layer``: the sequence shrinks to ``n_after`` tokens from layer ``prune_layer``
    on (FastV). Pre-LLM pruning is simply a smaller ``n_tokens``. ``per_layer``: the tokens each layer
    processes (:func:`llm_tokens`), instead of the other arguments.
    """
    d, d_kv, m, L, _ = _dims(config)
    if per_layer is not None:
        if len(per_layer) != L or min(per_layer) < 0:
            raise ValueError(f"per_layer needs {L} non-negative token counts (one per decoder layer), got "
                             f"{list(per_layer)}")
        return sum(_layer_flops(int(n), d, d_kv, m, formula) for n in per_layer)
    if n_tokens < 0 or (n_after is not None and not 0 <= n_after <= n_tokens):
        raise ValueError(f"need 0 <= n_after <= n_tokens, got n_tokens={n_tokens}, n_after={n_after}")
    if not 0 <= prune_layer <= L:
        raise ValueError(f"prune_layer must lie in [0, {L}], got {prune_layer}")
    after = n_tokens if n_after is None else n_after
    full = _layer_flops(n_tokens, d, d_kv, m, formula)
    return prune_layer * full + (L - prune_layer) * _layer_flops(after, d, d_kv, m, formula)


def kv_cache_bytes(
    config: Any,
    n_tokens: int,
    dtype: torch.dtype = torch.float16,
    *,
    n_after: int | None = None,
    prune_layer: int = 0,
    per_layer: list | None = None,
) -> int:
    """Bytes of the key/value cache holding ``n_tokens`` positions (layers >= ``prune_layer`` hold
    ``n_after`` when given; ``per_layer``: the positions each layer holds, :func:`llm_tokens`)."""
    d, d_kv, _, L, _ = _dims(config)
    per_token_layer = 2 * d_kv * torch.empty((), dtype=dtype).element_size()
    if per_layer is not None:
        if len(per_layer) != L:
            raise ValueError(f"per_layer needs {L} token counts (one per decoder layer), got {len(per_layer)}")
        return per_token_layer * sum(int(n) for n in per_layer)
    after = n_tokens if n_after is None else n_after
    return per_token_layer * (prune_layer * n_tokens + (L - prune_layer) * after)


@torch.inference_mode()
def cache_bytes(model: torch.nn.Module, inputs: dict) -> int:
    """Bytes the key/value cache actually holds after one prefill of ``inputs`` (patched or not).

    Sums the keys and values of every layer of the returned cache — the measured counterpart of
    :func:`kv_cache_bytes`.
    """
    out = model(**inputs, use_cache=True)
    keys = out.keys() if hasattr(out, "keys") else ()
    cache = out["cache"] if "cache" in keys else out["past_key_values"] if "past_key_values" in keys else None
    layers = getattr(cache, "layers", None)
    if not layers:
        raise ValueError(f"the model returned no per-layer KV cache (got {type(cache).__name__})")
    total = 0
    for layer in layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def synchronize(device: torch.device | str) -> None:
    """Wait for queued kernels on CUDA (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _device(model: torch.nn.Module) -> torch.device:
    """``model.device`` (transformers models); a plain ``nn.Module`` has none: its first parameter's."""
    return model.device if hasattr(model, "device") else next(model.parameters()).device


def time_call(fn: Callable[[], Any], device: torch.device | str, repeats: int = 5, warmup: int = 1) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones (CUDA events on a GPU,
    ``perf_counter`` on the CPU)."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


@torch.inference_mode()
def measure_prefill(model: torch.nn.Module, inputs: dict, repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median wall time of one prefill (a forward with the KV cache on), after ``warmup`` runs.

    CUDA: timed with CUDA events and a synchronize. Returns ``{"median_s", "min_s", "repeats"}``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = _device(model)
    times = time_call(lambda: model(**inputs, use_cache=True), device, repeats, warmup)
    return {"median_s": statistics.median(times), "min_s": min(times), "repeats": repeats}


@torch.inference_mode()
def measure_generate(model: torch.nn.Module, inputs: dict, max_new_tokens: int = 16, repeats: int = 3) -> dict[str, float]:
    """Time to first token, decode tokens/s and, on CUDA, peak memory of greedy generation.

    Every forward call of ``model`` inside ``generate`` is timed by hooks: the first is the prefill
    (vision tower, selection, language model), the others are decoding steps. TTFT = from the call of
    ``generate`` to the end of its first forward; decode tokens/s = 1 / median decoding-step time.
    Medians over ``repeats`` runs after one warm-up; ``min_new_tokens = max_new_tokens`` so every run
    decodes the same count.
    """
    if max_new_tokens < 2:
        raise ValueError("max_new_tokens must be >= 2 to time decoding steps")
    device = _device(model)
    starts: list[float] = []
    ends: list[float] = []

    def pre(module, args, kwargs):
        synchronize(device)
        starts.append(time.perf_counter())

    def post(module, args, kwargs, output):
        synchronize(device)
        ends.append(time.perf_counter())

    gen = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ttfts, steps = [], []
    handles = [model.register_forward_pre_hook(pre, with_kwargs=True),
               model.register_forward_hook(post, with_kwargs=True)]
    try:
        for r in range(repeats + 1):
            starts.clear()
            ends.clear()
            synchronize(device)
            t0 = time.perf_counter()
            model.generate(**inputs, **gen)
            if r:  # run 0 is the warm-up
                ttfts.append(ends[0] - t0)
                steps.extend(e - s for s, e in zip(starts[1:], ends[1:]))
    finally:
        for h in handles:
            h.remove()
    return {
        "ttft_s": statistics.median(ttfts),
        "decode_tok_per_s": 1.0 / statistics.median(steps),
        "peak_mem_bytes": float(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else float("nan"),
    }


def selection_time(method: str, n: int, d: int, budget: int, device="cpu", repeats: int = 5, seed: int = 0) -> float:
    """Median seconds of ``select_tokens`` alone on one image's (n, d) features (one warm-up run).

    Attention-based methods get a random ``attention`` signal (their cost is a top-K; SparseVLM's is timed as one
    top-K too: its scoring runs inside the LLM, in the measured prefill).
    """
    from ..core.selection import select_tokens

    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, d, generator=g).to(device)
    attention_based = method in ("cls_attention", "fastv", "sparsevlm")
    signals = {"attention": torch.rand(n, generator=g).to(device)} if attention_based else {}
    method = "fastv" if method == "sparsevlm" else method  # the same ranking step: top-K of a score
    return statistics.median(time_call(lambda: select_tokens(feats, budget, method, **signals), device, repeats, 1))


def check_methods(model, methods, budgets, fastv_layer: int = 2) -> None:
    """Patch and unpatch ``model`` once per (method, budget): what this model cannot run (an unknown method, FastV
    on a decoder of fewer than ``fastv_layer`` + 1 layers, a CLS method on a tower without CLS...) raises the
    patch's ValueError before any timing starts."""
    from ..hf.patch import patch_model, unpatch_model

    for method in methods:
        for budget in budgets:
            try:
                patch_model(model, method=method, budget=budget, fastv_layer=fastv_layer)
            except ValueError as e:
                raise ValueError(f"method {method!r} at budget {budget}: {e}") from None
            finally:
                unpatch_model(model)


def prefill_table(model, inputs: dict, methods, budgets, repeats: int = 5, fastv_layer: int = 2,
                  overhead_budget: int = 64, progress: bool = True, selection_shape: tuple | None = None):
    """Measured prefill latency per (method, budget) next to the FLOPs model, as a DataFrame.

    ``inputs``: processor output for ONE prompt with one image (its placeholder run gives N). The configurations are
    timed in interleaved rounds — one warm-up round, then ``repeats`` rounds in which every (method, budget) runs
    one prefill (as ``generate``'s: KV cache on, logits of the last position only), patched with
    :func:`~svdprune_utils.hf.patch.patch_model` and unpatched around it — so a slow drift of the machine (another
    process, clock changes) hits every configuration alike; each gets the median of its rounds (CUDA events on a
    GPU). Columns: method, budget (tokens kept), prefill_ms, latency_ratio (to the unpruned prefill), flops_ratio
    (decoder FLOPs, same ratio), speedup_vs_flops (measured speed-up / FLOPs speed-up; 1 = the FLOPs saving is fully
    realised), kv_cache_bytes (model dtype), selection_ms (selection alone at ``overhead_budget``, on the model's
    device) and selection_pct (of the pruned prefill at that budget).

    Any family ``patch_model`` supports (on LLaVA-1.5 it is ``patch_llava``): N is the
    prompt's placeholder count (LLaVA-NeXT: newlines included), and ``selection_shape`` (n, d) the features the
    method scores for the selection columns (default: N × the tower's hidden size, LLaVA-1.5's).
    """
    import pandas as pd
    from tqdm import tqdm

    from ..hf.patch import patch_model, unpatch_model

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    cfg = model.config
    ids = inputs["input_ids"]
    if ids.shape[0] != 1:
        raise ValueError(f"prefill_table times one prompt; got a batch of {ids.shape[0]}")
    n_img = int((ids == cfg.image_token_id).sum())
    n_text = ids.shape[1] - n_img
    device, dtype = model.device, model.dtype
    jobs = [(m, min(int(b), n_img)) for m in methods for b in sorted(set(budgets), reverse=True)]
    jobs = list(dict.fromkeys(jobs))
    base_job = next((j for j in jobs if j[1] == n_img), ("svd", n_img))
    timed = jobs if base_job in jobs else jobs + [base_job]  # no unpruned run asked for: add one
    for method, budget in timed:  # before any timing
        check_methods(model, [method], [budget], fastv_layer)

    def once(method, budget):
        patch_model(model, method=method, budget=budget, fastv_layer=fastv_layer)
        try:
            return time_call(lambda: model(**inputs, use_cache=True, logits_to_keep=1), device, 1, 0)[0]
        finally:
            unpatch_model(model)

    times: dict = {j: [] for j in timed}
    with torch.inference_mode():
        for r in tqdm(range(repeats + 1), desc="prefill rounds", disable=not progress):
            for job in timed:
                t = once(*job)
                if r:  # round 0 is the warm-up
                    times[job].append(t)
    base = statistics.median(times[base_job])
    rows = []
    for method, k in jobs:
        per = llm_tokens(cfg, method, k, n_text, n_img, fastv_layer)
        rows.append({"method": method, "budget": k, "prefill_ms": 1e3 * statistics.median(times[method, k]),
                     "flops_ratio": prefill_flops(cfg, 0, per_layer=per) / prefill_flops(cfg, n_text + n_img),
                     "kv_cache_bytes": kv_cache_bytes(cfg, 0, dtype, per_layer=per)})
    df = pd.DataFrame(rows)
    df["latency_ratio"] = df["prefill_ms"] / (1e3 * base)
    df["speedup_vs_flops"] = df["flops_ratio"] / df["latency_ratio"]
    n_sel, d_sel = selection_shape or (n_img, cfg.vision_config.hidden_size)
    sel = {m: 1e3 * selection_time(m, n_sel, d_sel, overhead_budget, device, repeats) for m in methods}
    df["selection_ms"] = df["method"].map(sel)
    at = df[df["budget"] == min(overhead_budget, n_img)].set_index("method")["prefill_ms"]
    df["selection_pct"] = df["method"].map(lambda m: 100 * sel[m] / at.get(m, float("nan")))
    return df


def add_prefill_arguments(parser, budgets: str, methods: str, repeats: int) -> None:
    """The options the prefill benchmarks share (``benchmarks/llava_speed.py``, ``family_speed.py``): device, dtype,
    budgets, methods, text tokens, repeats, the selection-overhead budget, seed and output path."""
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp16", "bf16", "fp32"])
    parser.add_argument("--budgets", default=budgets, help="tokens kept per image")
    parser.add_argument("--methods", default=methods)
    parser.add_argument("--text-tokens", type=int, default=40, help="prompt tokens besides the image")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--overhead-budget", type=int, default=64, help="K for the selection-overhead columns")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the markdown table here (and a .csv beside it)")


def bench_dtype(name: str, device) -> torch.dtype:
    """``--dtype``: "auto" is fp16 on CUDA and fp32 elsewhere; else fp16, bf16 or fp32."""
    auto = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    return {"auto": auto, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def device_name(device) -> str:
    """A benchmark table's device line: the CUDA device's name, or the CPU with its thread count."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"


def report_table(df, header: str, out=None) -> str:
    """Print ``header`` and ``df`` as a markdown table; with ``out``, also write it there and the CSV beside it."""
    from pathlib import Path

    table = header + df.to_markdown(index=False, floatfmt=".3f")
    print(table)
    if out:
        out = Path(out)
        out.write_text(table + "\n")
        df.to_csv(out.with_suffix(".csv"), index=False)
    return table
