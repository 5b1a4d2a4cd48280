"""What pruning buys: a prefill FLOPs model, KV-cache bytes, and measured prefill/decode timings.

FLOPs model (decoder layers of the language model; one multiply-add = 2 FLOPs). For a Llama layer with
hidden size d, n_kv key/value heads of size h (d_kv = n_kv·h), FFN width m and a prefill of n tokens:

    projections  2·n·(2·d² + 2·d·d_kv)     (q and o: d×d; k and v: d×d_kv)
    attention    2·2·n²·d                  (scores QKᵀ and the weighted sum AV)
    FFN (SwiGLU) 2·3·n·d·m                 (gate, up, down)

With d_kv = d this is 2·(4nd² + 2n²d + 3ndm); ``formula="fastv"`` gives FastV's count
4nd² + 2n²d + 2ndm (MACs of a two-matrix FFN), to compare with numbers quoted in papers.
Pruning inside the LLM at layer K (FastV) counts layers < K at the full length and the rest at the
pruned length. The vision tower and the LM head are excluded (they do not change with the budget).

KV cache: 2 (k and v) · n_kv · h · n · bytes(dtype) per layer, summed over layers.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

__all__ = ["text_config", "prefill_flops", "kv_cache_bytes", "measure_prefill", "measure_generate", "synchronize"]


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


def prefill_flops(
    config: Any,
    n_tokens: int,
    *,
    n_after: int | None = None,
    prune_layer: int = 0,
    formula: str = "llama",
) -> int:
    """FLOPs of the decoder layers for a prefill of ``n_tokens`` tokens (text + image).

    ``n_after``/``prune_layer``: the sequence shrinks to ``n_after`` tokens from layer ``prune_layer``
    on (FastV). Pre-LLM pruning is simply a smaller ``n_tokens``.
    """
    if n_tokens < 0 or (n_after is not None and not 0 <= n_after <= n_tokens):
        raise ValueError(f"need 0 <= n_after <= n_tokens, got n_tokens={n_tokens}, n_after={n_after}")
    d, d_kv, m, L, _ = _dims(config)
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
) -> int:
    """Bytes of the key/value cache holding ``n_tokens`` positions (layers >= ``prune_layer`` hold
    ``n_after`` when given)."""
    d, d_kv, _, L, _ = _dims(config)
    per_token_layer = 2 * d_kv * torch.empty((), dtype=dtype).element_size()
    after = n_tokens if n_after is None else n_after
    return per_token_layer * (prune_layer * n_tokens + (L - prune_layer) * after)


def synchronize(device: torch.device | str) -> None:
    """Wait for queued kernels on CUDA (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _time(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> list[float]:
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
    device = _device_of(model)
    times = _time(lambda: model(**inputs, use_cache=True), device, repeats, warmup)
    return {"median_s": statistics.median(times), "min_s": min(times), "repeats": repeats}


@torch.inference_mode()
def measure_generate(model: torch.nn.Module, inputs: dict, max_new_tokens: int = 16, repeats: int = 3) -> dict[str, float]:
    """Time to first token (prefill + first step), decode tokens/s and, on CUDA, peak memory.

    Decoding is greedy with ``min_new_tokens = max_new_tokens`` so every run decodes the same count.
    """
    device = _device_of(model)
    gen = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ttft = statistics.median(_time(lambda: model.generate(**inputs, max_new_tokens=1, do_sample=False), device, repeats, 1))
    total = statistics.median(_time(lambda: model.generate(**inputs, **gen), device, repeats, 0))
    out = {
        "ttft_s": ttft,
        "decode_tok_per_s": (max_new_tokens - 1) / max(total - ttft, 1e-9),
        "peak_mem_bytes": float(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else float("nan"),
    }
    return out
