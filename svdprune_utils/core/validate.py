"""Input checks shared by the library: one place that turns bad input into a clear error.

Every public function that takes a token-feature matrix calls :func:`as_features`, which accepts a
torch tensor or a numpy array of shape (N, d) or (B, N, d), refuses what cannot be scored, and
returns a *new* torch tensor (the caller's object is never modified).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["as_features", "as_signal", "check_budget", "check_flag", "check_int", "restore_kind", "unit_scale",
           "unit_scale_factors"]


def as_features(x: Any, name: str = "features", allow_nonfinite: bool = False) -> tuple[torch.Tensor, bool, bool]:
    """Validate a feature matrix and return ``(X, was_numpy, was_batched)``.

    ``X`` is a torch tensor of shape (B, N, d) (a 2-D input gets B = 1) on the input's device, in its
    floating dtype. Raises ValueError for: a non-array, integer/bool/complex dtype, ndim not in {2, 3},
    an empty axis, and (unless ``allow_nonfinite``) NaN or Inf entries, naming the count.
    """
    was_numpy = isinstance(x, np.ndarray)
    if was_numpy:
        if x.dtype.kind not in "f":
            raise ValueError(f"{name} must be a floating-point array, got dtype {x.dtype}")
        if x.dtype.itemsize > 8:  # torch has no extended precision
            raise ValueError(f"{name} must be float16, float32 or float64, got dtype {x.dtype}")
        t = torch.from_numpy(np.array(x, copy=True) if not x.flags.writeable else np.ascontiguousarray(x))
    elif isinstance(x, torch.Tensor):
        if not (x.is_floating_point()):
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
        if x.layout != torch.strided:
            raise ValueError(f"{name} must be a dense tensor, got layout {x.layout} (call .to_dense() first)")
        t = x.detach()
    else:
        raise ValueError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    if t.ndim not in (2, 3):
        raise ValueError(f"{name} must have shape (N, d) or (B, N, d), got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(t.shape)}")
    if not allow_nonfinite:
        # One pass without a mask: aminmax propagates NaN and ±Inf, so both ends are finite iff every entry is.
        lo, hi = torch.aminmax(t)
        bad = 0 if bool(torch.isfinite(lo) & torch.isfinite(hi)) else int((~torch.isfinite(t)).sum())
        if bad:
            n_nan = int(torch.isnan(t).sum())
            raise ValueError(
                f"{name} contains {bad} non-finite value(s) ({n_nan} NaN, {bad - n_nan} Inf) "
                f"out of {t.numel()}"
            )
    batched = t.ndim == 3
    if not batched:
        t = t.unsqueeze(0)
    return t, was_numpy, batched


def check_budget(budget: Any) -> int:
    """Return ``budget`` as a positive int; ValueError for non-integers and values <= 0."""
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)):
        raise ValueError(f"budget must be a positive integer, got {budget!r}")
    if budget <= 0:
        raise ValueError(f"budget must be a positive integer, got {budget}")
    return int(budget)


def as_signal(value: Any, name: str, B: int, N: int, device, *, vector: bool = False) -> torch.Tensor:
    """A per-token input signal as a new fp64 tensor on ``device``: shape (B, N) (``vector=False``; an (N,)
    input is shared by the B samples) or (B, N, e) (``vector=True``; an (N, e) input is shared).

    ValueError, naming ``name``, when the signal is missing (None), misshaped or holds NaN/Inf."""
    what = "per-token vectors of shape (B, N, e)" if vector else "per-token scores of shape (B, N)"
    if value is None:
        raise ValueError(f"this method needs the signal `{name}` ({what})")
    try:
        t = torch.as_tensor(np.asarray(value) if isinstance(value, np.ndarray) else value)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"signal `{name}` must be an array of real numbers ({what}): {e}") from None
    if t.dtype == torch.bool or t.is_complex() or t.layout != torch.strided:
        raise ValueError(f"signal `{name}` must hold real numbers ({what}), got dtype {t.dtype}, layout {t.layout}")
    t = t.detach().to(device=device, dtype=torch.float64)
    single = 2 if vector else 1
    if t.ndim == single:
        t = t.unsqueeze(0).expand(B, *t.shape)
    ok = t.ndim == single + 1 and tuple(t.shape[:2]) == (B, N) and (not vector or t.shape[2] > 0)
    if not ok:
        want = f"({B}, {N}, e) (or ({N}, e))" if vector else f"{(B, N)} (or ({N},))"
        raise ValueError(f"signal `{name}` must have shape {want}, got {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"signal `{name}` contains {int((~torch.isfinite(t)).sum())} non-finite value(s)")
    return t


def check_flag(value: Any, name: str) -> bool:
    """``value`` as a bool; ValueError for anything but True/False (a string such as "no" would be truthy)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_int(value: Any, name: str, minimum: int) -> int:
    """``value`` as an int >= ``minimum``; ValueError for bools, floats, strings and smaller values."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def restore_kind(t: torch.Tensor, was_numpy: bool, batched: bool) -> Any:
    """Undo the batching added by :func:`as_features` and convert back to numpy if needed."""
    if not batched:
        t = t[0]
    return t.cpu().numpy() if was_numpy else t


def unit_scale_factors(t: torch.Tensor) -> torch.Tensor:
    """The (B,) fp64 factors :func:`unit_scale` multiplies each sample of (B, N, d) ``t`` by: 1 / the power of two
    nearest its largest |entry|, at most 2^1023 (1 for an all-zero sample). One pass over ``t``."""
    if t.ndim != 3:
        raise ValueError(f"unit_scale needs a (B, N, d) batch, got shape {tuple(t.shape)}")
    lo, hi = torch.aminmax(t.reshape(t.shape[0], -1), dim=1)  # one pass, no |t| copy
    peak = torch.maximum(-lo, hi).double()
    # the exponent stops at 1023: a peak above 2^1023.5 would round to 2^1024 = inf and zero every entry
    exponent = torch.round(torch.log2(peak.clamp_min(1e-300))).clamp_max(1023.0)
    return torch.where(peak > 0, torch.exp2(-exponent), 1.0)


def unit_scale(t: torch.Tensor) -> torch.Tensor:
    """A new fp64 tensor: each sample of (B, N, d) ``t`` divided by the power of two nearest its largest
    |entry|, at most 2^1023 (so that entries are O(1)). Scale-invariant quantities (leverage, cosine distances, residual
    ratios, rankings by norm) then neither overflow (x² > fp64 max from ~1e155) nor underflow (~1e-160);
    a power of two divides exactly, so inputs of ordinary scale give bit-identical results. All-zero
    samples are left as they are."""
    inv = unit_scale_factors(t)[:, None, None]
    # a copy even for fp64 input (the caller's tensor is never scaled in place); the factor is a power of two, so the
    # product is exact
    return t.to(torch.float64, copy=True).mul_(inv)
