"""Token reduction beyond selection: methods whose output tokens may be *merges* of input tokens (VisionZip).

A :class:`Reduction` describes K output tokens per sample: which input token gives each one its place in the
image (``kept``), its features when they are not simply an input token's (``features``), and which input tokens
it came from (``sources``). A pure selection is the special case ``Reduction.from_kept(kept, N)``.
:func:`reduce_tokens` is the one entry point for every method: merging methods (:data:`REDUCERS`) run their
own rule, selectors (:data:`~svdprune_utils.core.selection.SELECTORS`) go through ``select_tokens``.

The output features live in the space of the input ``features`` (for VisionZip: the vision tower's feature
layer, before the projector — the projector is applied to the K merged tokens afterwards).
"""

from __future__ import annotations

import inspect
import numbers
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .selection import SELECTORS, select_tokens, top_k
from .validate import as_features, as_signal, check_budget

__all__ = ["Reduction", "REDUCERS", "check_signals", "reduce_tokens", "reduce_visionzip", "visionzip_split"]


@dataclass(frozen=True)
class Reduction:
    """K output tokens per sample, described against the N input tokens.

    Attributes:
        kept: LongTensor (B, K): for each output token the input index that places it in the image — the
            token itself for a selected token, the target token for a merged (contextual) one.
        features: (B, K, d) the output features, or None when every output token is the input token at
            ``kept`` unchanged (a pure selection).
        sources: BoolTensor (B, K, N): ``sources[b, k, i]`` is True when input token i went into output token k.
    """

    kept: torch.Tensor
    features: torch.Tensor | None
    sources: torch.Tensor

    def __post_init__(self):
        if not isinstance(self.kept, torch.Tensor) or self.kept.ndim != 2 or self.kept.dtype != torch.long:
            raise ValueError(f"Reduction.kept must be a LongTensor (B, K), got {_describe(self.kept)}")
        B, K = self.kept.shape
        s = self.sources
        if not isinstance(s, torch.Tensor) or s.dtype != torch.bool or s.ndim != 3 or tuple(s.shape[:2]) != (B, K):
            raise ValueError(f"Reduction.sources must be a BoolTensor ({B}, {K}, N), got {_describe(s)}")
        f = self.features
        if f is not None and (not isinstance(f, torch.Tensor) or f.ndim != 3 or tuple(f.shape[:2]) != (B, K)):
            raise ValueError(f"Reduction.features must be None or a tensor ({B}, {K}, d), got {_describe(f)}")

    @classmethod
    def from_kept(cls, kept: torch.Tensor, n: int) -> Reduction:
        """The Reduction of a pure selection: ``kept`` (B, K) (or (K,), read as B = 1) indices into ``n`` tokens;
        features None, one-hot sources."""
        kept = torch.as_tensor(kept)
        if kept.ndim == 1:
            kept = kept.unsqueeze(0)
        if kept.ndim != 2 or kept.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise ValueError(f"kept must be an integer tensor (B, K) or (K,), got {_describe(kept)}")
        if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= n):
            raise ValueError(f"kept indices must lie in [0, {n}), got [{int(kept.min())}, {int(kept.max())}]")
        kept = kept.long()
        return cls(kept=kept, features=None, sources=F.one_hot(kept, n).bool())

    @property
    def n_inputs(self) -> int:
        """N, the number of input tokens per sample."""
        return self.sources.shape[2]

    def in_raster_order(self) -> Reduction:
        """The same K output tokens reordered so that ``kept`` ascends in every row, ``features`` and
        ``sources`` permuted alike: the order in which an image's tokens fill its kept placeholders. (VisionZip
        lists its dominant tokens, then its contextual ones; their positions are distinct patches.)"""
        order = torch.sort(self.kept, dim=1, stable=True).indices
        feats = None
        if self.features is not None:
            feats = torch.gather(self.features, 1, order.unsqueeze(-1).expand(-1, -1, self.features.shape[-1]))
        sources = torch.gather(self.sources, 1, order.unsqueeze(-1).expand(-1, -1, self.sources.shape[-1]))
        return Reduction(kept=torch.gather(self.kept, 1, order), features=feats, sources=sources)

    def tokens(self, features: torch.Tensor) -> torch.Tensor:
        """The (B, K, d) output features, given the (B, N, d) input ``features`` this reduction was computed
        from: ``self.features`` when set, else the inputs gathered at ``kept``."""
        if self.features is not None:
            return self.features
        return torch.gather(features, 1, self.kept.unsqueeze(-1).expand(-1, -1, features.shape[-1]))


def _describe(x: Any) -> str:
    return f"{type(x).__name__} {getattr(x, 'dtype', '')} {tuple(getattr(x, 'shape', ()))}".strip()


# ------------------------------------------------------------------------------------------- VisionZip
def visionzip_split(budget: int, dominant: int | None = None) -> tuple[int, int]:
    """(dominant, contextual) for K = ``budget`` output tokens.

    Default: VisionZip's only published budget is 64 = 54 dominant + 10 contextual (dvlab-research/VisionZip
    README: ``visionzip(model, dominant=54, contextual=10)``). The 128 = 108 + 20 and 192 = 162 + 30 splits are
    the paper/community convention, not repository code; all three are round-half-up(K · 54 / 64), which is
    the rule used for every K (clamped to [1, K]). An explicit ``dominant`` in [0, K] overrides it."""
    K = check_budget(budget)
    if dominant is None:
        D = min(K, max(1, (27 * K + 16) // 32))  # floor(K * 54/64 + 1/2) in integers
    else:
        if isinstance(dominant, bool) or not isinstance(dominant, numbers.Integral) or not 0 <= dominant <= K:
            raise ValueError(f"dominant must be an integer in [0, budget={K}], got {dominant!r}")
        D = int(dominant)
    return D, K - D


def reduce_visionzip(features: Any, budget: int, *, attention: Any = None, keys: Any = None,
                     dominant: int | None = None) -> Reduction:
    """VisionZip (Yang et al., CVPR 2025): D dominant tokens by CLS attention, plus C contextual tokens that
    merge the rest by key similarity (K = D + C; split by :func:`visionzip_split`, 64 -> 54 + 10).

    Args:
        features: (N, d) or (B, N, d) the feature-layer hidden states of the N *patches* (LLaVA: layer −2; the
            CLS token is not part of this interface, see below).
        budget: K output tokens; K >= N returns every token unchanged (``Reduction.from_kept``).
        attention: (B, N) or (N,) CLS→patch attention of the same layer, heads summed or averaged (same ranking).
        keys: (B, N, dk) or (N, dk) that layer's attention keys (``k_proj`` output), averaged over heads.
        dominant: D, overriding the default split.

    Returns:
        A :class:`Reduction` (always batched: B = 1 for 2-D input): the D dominant patches in ascending index
        order, then the C contextual tokens in target order; features in the input dtype (computed in fp64).

    Follows dvlab-research/VisionZip, ``visionzip/clip_encoder.py``, ``CLIPVisionTower_VisionZip.forward``:

    - dominant: top-D patches by CLS attention, kept in raster order (``masked_select``);
    - the remainder (the other N − D patches, raster order) is split into C targets — every
      max(1, (N − D) // C)-th remaining token from the first, the first C of them — and the others;
    - each other token goes to the target of highest cosine similarity of L2-normalised keys (argmax, first
      target on ties); a contextual token = target's features + the mean of its assigned tokens' features
      (the target alone when none was assigned). Every remainder token thus belongs to exactly one contextual
      token's ``sources``, targets included.

    Difference from the official code, on purpose: there the CLS token is always kept and counted in the
    dominant budget (``visionzip(dominant=D)`` keeps CLS + D − 1 patches and sends CLS to the LLM). With
    llava-hf's "default" feature strategy the LLM receives patches only, so here the CLS slot goes to one more
    dominant patch: D patches, no CLS. Also: attention ties go to the lower index (``topk`` leaves them
    unspecified); an all-zero key normalises to zero instead of dividing by zero.
    """
    X, _, _ = as_features(features)
    K = check_budget(budget)
    B, N, d = X.shape
    D, C = visionzip_split(K, dominant)
    # the signals are checked whatever the budget (K >= N keeps every token, but a missing one is still an error)
    att = as_signal(attention, "attention", B, N, X.device) if D else None
    keys = as_signal(keys, "keys", B, N, X.device, vector=True) if C else None
    if K >= N:
        return Reduction.from_kept(torch.arange(N, device=X.device).expand(B, N).clone(), N)
    dom = top_k(att, D) if D else X.new_zeros(B, 0, dtype=torch.long)
    kn = F.normalize(keys, dim=-1) if C else None
    kept, feats, sources = [], [], torch.zeros(B, K, N, dtype=torch.bool, device=X.device)
    sources[:, :D] = F.one_hot(dom, N).bool()
    for b in range(B):
        if not C:
            kept.append(dom[b])
            feats.append(X[b, dom[b]])
            continue
        rest = torch.ones(N, dtype=torch.bool, device=X.device)
        rest[dom[b]] = False
        rem = torch.nonzero(rest).squeeze(1)  # (N - D,) ascending
        step = max(1, rem.numel() // C)
        is_target = torch.zeros(rem.numel(), dtype=torch.bool, device=X.device)
        is_target[torch.arange(0, rem.numel(), step, device=X.device)[:C]] = True
        targets, others = rem[is_target], rem[~is_target]
        assign = (kn[b, others] @ kn[b, targets].T).argmax(dim=1)  # (n_others,) first maximum on ties
        x = X[b].double()
        summed = torch.zeros(C, d, dtype=torch.float64, device=X.device).index_add_(0, assign, x[others])
        counts = torch.bincount(assign, minlength=C).clamp(min=1).unsqueeze(1)
        contextual = x[targets] + summed / counts
        kept.append(torch.cat([dom[b], targets]))
        feats.append(torch.cat([X[b, dom[b]], contextual.to(X.dtype)]))
        sources[b, D + torch.arange(C, device=X.device), targets] = True
        sources[b, D + assign, others] = True
    return Reduction(kept=torch.stack(kept), features=torch.stack(feats), sources=sources)


REDUCERS: dict[str, Callable[..., Reduction]] = {"visionzip": reduce_visionzip}


# ------------------------------------------------------------------------------------------ public API
def _params(fn: Callable) -> set[str]:
    return {p for p in inspect.signature(fn).parameters if p not in ("features", "budget")}


def _check_names(signals: dict) -> None:
    known = set().union(*(_params(f) for f in (*SELECTORS.values(), *REDUCERS.values())))
    unknown = set(signals) - known
    if unknown:
        raise TypeError(f"unknown signal(s) {sorted(unknown)}; methods accept {sorted(known)}")


def check_signals(method: str, signals: dict) -> None:
    """Refuse, before any features exist, what :func:`reduce_tokens` would refuse in ``signals`` at a call that
    prunes (a patch checks its selector arguments when installed, not only when some image exceeds the budget):
    names no method takes (TypeError), svd's ``rank`` / ``center`` / ``solver`` / ``seed`` (its scorer run on a
    3×2 matrix, so the rule is :func:`~svdprune_utils.core.leverage.leverage_scores`' own) and vispruner's
    ``important_ratio`` (ValueError). Values the other methods read are checked at the call."""
    from .peer_selectors import _check_ratio
    from .selection import _score_svd

    _check_names(signals)
    if method == "svd":
        svd = {k: signals[k] for k in ("rank", "center", "solver", "seed") if k in signals}
        if svd:
            _score_svd(torch.eye(3, 2, dtype=torch.float64)[None], budget=1, **svd)
    if method == "vispruner" and "important_ratio" in signals:
        _check_ratio(signals["important_ratio"])


def reduce_tokens(features: Any, budget: int, method: str = "svd", **signals) -> Reduction:
    """The K output tokens of any method, as a :class:`Reduction` (always batched; B = 1 for 2-D input).

    Args:
        features: (N, d) or (B, N, d) torch tensor or numpy array (never modified).
        budget: K >= 1 output tokens per sample; K >= N returns every token unchanged (the method's signals are
            still checked).
        method: a key of :data:`REDUCERS` (merging: "visionzip") or of ``SELECTORS`` (pure selection, wrapped
            with :meth:`Reduction.from_kept`).
        **signals: the method's inputs (``attention``, ``keys``, ``relevance``, ...). Signals the method does not
            take are ignored; names no selector or reducer takes raise TypeError.
    """
    if method not in REDUCERS and method not in SELECTORS:
        raise ValueError(f"unknown method {method!r}; selectors: {sorted(SELECTORS)}; merging: {sorted(REDUCERS)}")
    _check_names(signals)
    fn = REDUCERS.get(method) or SELECTORS[method]
    accepted = {k: v for k, v in signals.items() if k in _params(fn)}
    if method in REDUCERS:
        return fn(features, budget, **accepted)
    X, _, _ = as_features(features)
    return Reduction.from_kept(select_tokens(X, budget, method, **accepted), X.shape[1])
