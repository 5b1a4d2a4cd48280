"""Is there a faster exact eigensolver for the top-k leverage path on this CPU? A probe, not a library path.

Behind benchmarks/README.md ("Selection at LLaVA-NeXT and Qwen2.5-VL sizes"). On the fp64 Gram matrix of the
smaller side of each ``--large`` shape of ``leverage_speed.py`` (``clip_like`` matrices, seed 0; m = 1024, 1280,
2880) it times, at k = 64 (median of 3 calls, each after an untimed torch matmul as in the library):

- ``evr 2 threads`` — what the library runs: ``scipy.linalg.eigh(subset_by_index=..., driver="evr")`` (the dense
  tridiagonal reduction, then k eigenvectors by MRRR), SciPy's OpenBLAS on both cores;
- ``evr 1 thread`` — the same with OpenBLAS held to one thread (``threadpoolctl``): do the threads contend?
- ``MKL eigvalsh`` — torch's ``linalg.eigvalsh``: MKL's reduction and eigenvalues only, a lower bound for any
  dense one-stage solver reachable from torch;
- ``banded k=64`` — the second stage of a two-stage reduction, given the band for free: LAPACK's banded solver
  (``scipy.linalg.eig_banded``, ``select="i"``) on a random symmetric band matrix of bandwidth 32.

    OMP_NUM_THREADS=2 python benchmarks/eigensolver_probe.py    # about two minutes on 2 cores; output: eigensolver_probe_cpu.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
import scipy.linalg
import torch
from scipy.linalg import blas
from threadpoolctl import threadpool_limits

from svdprune_utils.notebook.toy import clip_like

SHAPES = [(2880, 1024), (8192, 1280), (2880, 4096)]
K = 64
BAND = 32


def timed(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, each after an untimed torch matmul."""
    times = []
    for _ in range(repeats):
        torch.randn(512, 512) @ torch.randn(512, 512)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per cell (default 3)")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    print(f"Device: cpu ({platform.machine()}, {os.cpu_count()} CPU cores); torch {torch.__version__}; "
          f"scipy {scipy.__version__}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}\n")
    print(f"Seconds, median of {args.repeats} call(s); k = {K}, band width {BAND}.\n")
    print("| shape N×d | Gram m×m | evr 2 threads | evr 1 thread | MKL eigvalsh | banded k=64 |")
    print("|---|---|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for N, d in SHAPES:
        X = clip_like(N, d, rng=0).astype(np.float64)
        m = min(N, d)
        G0 = blas.dsyrk(1.0, X.T, trans=0 if N > d else 1)  # Xᵀ X (N > d) or X Xᵀ, upper triangle

        def evr():
            scipy.linalg.eigh(G0.copy(order="F"), lower=False, subset_by_index=[m - K, m - 1], driver="evr",
                              overwrite_a=True, check_finite=False)

        two = timed(evr, args.repeats)
        with threadpool_limits(limits=1, user_api="blas"):
            one = timed(evr, args.repeats)
        full = torch.from_numpy(np.triu(G0) + np.triu(G0, 1).T)
        mkl = timed(lambda: torch.linalg.eigvalsh(full), args.repeats)
        band = rng.standard_normal((BAND + 1, m))
        banded = timed(lambda: scipy.linalg.eig_banded(band, lower=False, select="i", select_range=(m - K, m - 1),
                                                       check_finite=False), args.repeats)
        print(f"| {N}×{d} | {m}×{m} | {two:.3f} | {one:.3f} | {mkl:.3f} | {banded:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
