"""Speed and accuracy of the leverage-score paths on synthetic CLIP-like token matrices.

Compares, per shape (N tokens × d features) and batch size B:

- ``exact``      — ``leverage_scores(method="exact")``: eigh of the fp64 Gram matrix (the library default)
- ``exact-svd``  — ``leverage_scores(method="exact-svd")``: fp64 ``torch.linalg.svd``
- ``torch-fp32`` — plain fp32 ``torch.linalg.svd`` and l_i = Σ_{j<k} U_ij² (the baseline the ratio is to)
- ``approx``     — ``leverage_scores(method="approx")``: seeded randomized SVD (q = 2k, 4 power iterations)

Timing: median wall time over repeats (one tiny warm-up call per path first; CUDA calls synchronised).
Accuracy (batch 1, per k): max |score − reference| and the overlap |top-K ∩ top-K_ref| / K (K = 64),
the reference being fp64 ``numpy.linalg.svd``. Exact paths do a full decomposition, so their time does
not depend on k; they are timed at k = 64. The approximate path is timed at each k.

Usage::

    OMP_NUM_THREADS=2 python benchmarks/leverage_speed.py            # the table (several minutes on 2 cores)
    python benchmarks/leverage_speed.py --full                        # + 2880×4096 at batch 8 on the CPU
    python benchmarks/leverage_speed.py --quick                       # 576-token shapes only, 2 repeats
    python benchmarks/leverage_speed.py --device cuda                 # GPU timings (reference stays on CPU)
    python benchmarks/leverage_speed.py --large                       # LLaVA-NeXT / Qwen2.5-VL sizes (below)

``--large``: the exact path at the token counts of LLaVA-NeXT (2880 = five 576-patch crops: tower features
2880×1024, projected 2880×4096) and Qwen2.5-VL (8192 patches of 1280 features for a 1792×1792-pixel image, merged
2×2 into 2048 LLM tokens), at k = 16 and 64, against fp32 ``torch.linalg.svd`` of the same matrix (the median of
as many calls); every timed call follows an untimed torch matmul, as selection follows the vision tower in the
patch (SciPy's BLAS then shares the cores with torch's thread pool). Accuracy against fp64 ``numpy.linalg.svd``:
max |error| and whether the top-K sets (K = k) are identical. The selection's share of the prefill is its time
over the **FLOPs-time** of the 7B decoder prefill of that image plus 40 text tokens — decoder prefill FLOPs
(``analysis.efficiency.prefill_flops``: LLaVA-1.5-7B's Llama-2-7B dimensions, which LLaVA-NeXT-Vicuna-7B shares;
``data/configs/qwen2.5-vl-7b.json``) divided by the fp32 matmul rate measured on the same device.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

from svdprune_utils import leverage_scores
from svdprune_utils.notebook.toy import clip_like

SHAPES = [(576, 1024), (576, 4096), (2880, 4096)]
BATCHES = [1, 8]
RANKS = [16, 64]
TOPK = 64
EXACT = ["exact", "exact-svd", "torch-fp32"]


def torch_fp32_scores(X: torch.Tensor, k: int) -> torch.Tensor:
    """Leverage from a plain fp32 ``torch.linalg.svd`` (no rank clamp): (B, N, d) -> (B, N)."""
    U, _, _ = torch.linalg.svd(X.float(), full_matrices=False)
    return (U[..., :k] ** 2).sum(-1)


def run_path(name: str, X: torch.Tensor, k: int) -> torch.Tensor:
    if name == "torch-fp32":
        return torch_fp32_scores(X, k)
    if name == "approx":
        return leverage_scores(X, rank=k, method="approx", seed=0)
    return leverage_scores(X, rank=k, method=name)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(name: str, X: torch.Tensor, k: int, repeats: int, device: str) -> tuple[float, torch.Tensor]:
    """Median seconds over ``repeats`` calls and the last output."""
    times, out = [], None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = run_path(name, X, k)
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def reference(X: np.ndarray, ks: list[int]) -> dict[int, np.ndarray]:
    """fp64 numpy SVD leverage of one (N, d) matrix for each k."""
    U, _, _ = np.linalg.svd(X.astype(np.float64), full_matrices=False)
    U2 = U**2
    return {k: U2[:, :k].sum(1) for k in ks}


def overlap(a: np.ndarray, b: np.ndarray, K: int) -> float:
    ta = set(np.argsort(-a, kind="stable")[:K].tolist())
    tb = set(np.argsort(-b, kind="stable")[:K].tolist())
    return len(ta & tb) / K


def repeats_for(N: int, B: int, base: int) -> int:
    """Fewer repeats for the big shape (one exact call at 2880×4096 takes seconds to a minute on 2 CPU cores)."""
    return 1 if N >= 2880 else base


LARGE = [  # (N, d, what, config file, LLM image tokens)
    (2880, 1024, "LLaVA-NeXT tower features", "llava-1.5-7b.json", 2880),
    (2880, 4096, "LLaVA-NeXT projected", "llava-1.5-7b.json", 2880),
    (8192, 1280, "Qwen2.5-VL patch features", "qwen2.5-vl-7b.json", 2048),
]
LARGE_RANKS = [16, 64]


def matmul_rate(device: str, n: int = 2048, repeats: int = 3) -> float:
    """fp32 FLOP/s of an n×n matmul on ``device`` (median of ``repeats`` after one warm-up)."""
    g = torch.Generator().manual_seed(0)
    A, B = (torch.randn(n, n, generator=g).to(device) for _ in range(2))
    A @ B
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        A @ B
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def run_large(args) -> str:
    """The --large table (see the module docstring)."""
    import json
    import pathlib

    from transformers import CONFIG_MAPPING

    from svdprune_utils.analysis.efficiency import prefill_flops

    dev = args.device
    configs = pathlib.Path(__file__).resolve().parents[1] / "data" / "configs"
    rate = matmul_rate(dev)
    g = torch.Generator().manual_seed(1)
    busy = torch.randn(768, 768, generator=g).to(dev)  # the untimed torch work before each call
    rows = []
    for N, d, what, cfg_name, n_img in LARGE:
        Xn = clip_like(N, d, rng=args.seed)
        X = torch.from_numpy(Xn).to(dev)
        svd_times = []
        for _ in range(args.large_repeats):  # the baseline gets the same repeats and warm torch pool as the exact path
            busy @ busy
            t_one, _ = timed("torch-fp32", X, 64, 1, dev)
            svd_times.append(t_one)
        t_svd = statistics.median(svd_times)
        U = np.linalg.svd(Xn.astype(np.float64), full_matrices=False)[0]
        raw = json.loads((configs / cfg_name).read_text())
        cfg = CONFIG_MAPPING[raw["model_type"]].from_json_file(str(configs / cfg_name))
        flops_time = prefill_flops(cfg, 40 + n_img) / rate
        for k in LARGE_RANKS:
            times = []
            for _ in range(args.large_repeats):
                busy @ busy  # torch's pool has just run, as after the tower
                sync(dev)
                t0 = time.perf_counter()
                out = leverage_scores(X, rank=k)
                sync(dev)
                times.append(time.perf_counter() - t0)
            t = statistics.median(times)
            ref = (U[:, :k] ** 2).sum(1)
            got = out.double().cpu().numpy()
            same = overlap(got, ref, k) == 1.0
            rows.append((f"{N}×{d}", what, k, t, t_svd, t_svd / t, float(np.abs(got - ref).max()), same,
                         100 * t / flops_time))
        print(f"  timed {N}×{d}", file=sys.stderr, flush=True)
    lines = [
        f"fp32 matmul rate on this device: {rate / 1e9:.0f} GFLOP/s; {args.large_repeats} timed call(s) per row",
        "",
        "| shape N×d | features | k | exact s | fp32 SVD s | speed-up | max abs error | top-k identical "
        "| % of 7B prefill FLOPs-time |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    lines += [f"| {s} | {w} | {k} | {t:.3f} | {ts:.3f} | {q:.1f}× | {e:.1e} | {'yes' if ok else 'no'} | {pct:.3f} |"
              for s, w, k, t, ts, q, e, ok, pct in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--repeats", type=int, default=5, help="repeats for the 576-token shapes (big ones use fewer)")
    p.add_argument("--quick", action="store_true", help="576-token shapes only, 2 repeats")
    p.add_argument("--full", action="store_true",
                   help="also run 2880×4096 at batch 8 on the CPU (skipped by default: ~8× the batch-1 time, "
                        "CPU linalg loops over the batch; always run with --device cuda)")
    p.add_argument("--large", action="store_true",
                   help="only the LLaVA-NeXT / Qwen2.5-VL sizes (2880×1024, 2880×4096, 8192×1280; see above)")
    p.add_argument("--large-repeats", type=int, default=3, help="timed calls per --large row (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the markdown tables to this file")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device visible", file=sys.stderr)
        return 2
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores"
    if args.device == "cuda":
        machine = torch.cuda.get_device_name(0)
    if args.large:
        text = (f"Device: {args.device} ({machine}); torch {torch.__version__}; "
                f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}\n\n" + run_large(args))
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")
        return 0
    shapes = SHAPES[:2] if args.quick else SHAPES
    base = 2 if args.quick else args.repeats
    dev = args.device

    # one tiny warm-up call per path (library loading, LAPACK/cuSOLVER handles)
    w = torch.randn(1, 64, 128, generator=torch.Generator().manual_seed(0)).to(dev)
    for name in EXACT + ["approx"]:
        run_path(name, w, 8)
    sync(dev)

    t_start = time.perf_counter()
    speed_rows, acc_rows = [], []
    for si, (N, d) in enumerate(shapes):
        for B in BATCHES:
            if N * B >= 2880 * 8 and dev == "cpu" and not args.full:
                print(f"  skipped {N}×{d} B={B} on the CPU (pass --full)", file=sys.stderr, flush=True)
                continue
            Xn = clip_like(N, d, batch=B, rng=args.seed + 100 * si + B)
            X = torch.from_numpy(Xn).to(dev)
            reps = repeats_for(N, B, base)
            times, outs = {}, {}
            for name in EXACT:
                times[name], outs[name] = timed(name, X, 64, reps, dev)
            for k in RANKS:
                times[f"approx k={k}"], outs[f"approx k={k}"] = timed("approx", X, k, reps, dev)
            t_ref = times["torch-fp32"]
            for name, t in times.items():
                speed_rows.append((f"{N}×{d}", B, name, reps, t, t / t_ref))
            print(f"  timed {N}×{d} B={B} ({reps} repeat(s))", file=sys.stderr, flush=True)
            if B != 1:
                continue
            # accuracy on the batch-1 matrix, against fp64 numpy SVD
            ref = reference(Xn[0], RANKS)
            U, _, _ = torch.linalg.svd(X.float(), full_matrices=False)
            for k in RANKS:
                for name in EXACT + ["approx"]:
                    if name == "torch-fp32":
                        s = (U[..., :k] ** 2).sum(-1)
                    elif name == "approx":
                        s = outs[f"approx k={k}"]
                    elif k == 64:
                        s = outs[name]
                    else:
                        s = run_path(name, X, k)
                    s = s[0].double().cpu().numpy()
                    acc_rows.append((f"{N}×{d}", k, name, float(np.abs(s - ref[k]).max()), overlap(s, ref[k], TOPK)))
    total = time.perf_counter() - t_start

    lines = [
        f"Device: {dev} ({machine}); torch {torch.__version__}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
        f"load average at the end {os.getloadavg()[0]:.2f}; total {total:.0f} s",
        "",
        "**Speed** (median seconds; ratio = time / fp32 `torch.linalg.svd` time, < 1 is faster)",
        "",
        "| shape N×d | B | path | repeats | median s | ratio |",
        "|---|---:|---|---:|---:|---:|",
    ]
    lines += [f"| {s} | {b} | {n} | {r} | {t:.4f} | {q:.2f} |" for s, b, n, r, t, q in speed_rows]
    lines += [
        "",
        f"**Accuracy** (batch 1; vs fp64 `numpy.linalg.svd`; overlap = top-{TOPK} sets)",
        "",
        f"| shape N×d | k | path | max abs error | top-{TOPK} overlap |",
        "|---|---:|---|---:|---:|",
    ]
    lines += [f"| {s} | {k} | {n} | {e:.1e} | {o:.3f} |" for s, k, n, e, o in acc_rows]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
