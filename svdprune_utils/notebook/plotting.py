"""Plot helpers the notebooks use more than once: kept-token overlays, score heat maps, budget curves.

Every function draws on the ``ax`` it is given (or a new one), returns that axes, and reads nothing
but its arguments. Figures that belong in the README are written with :func:`save_figure`, into
:func:`figures_dir` (``$SVDPRUNE_FIGURES`` if set, else ``figures/`` at the repository root).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..core.metrics import grid_shape

__all__ = ["figures_dir", "save_figure", "kept_mask", "overlay_kept", "score_map", "budget_curve", "model_view", "map_grid",
           "budget_panels"]


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _bare(ax, title: str | None = None):
    """No ticks on a patch-grid image; the title if given. Returns ``ax``."""
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title)
    return ax


def figures_dir() -> Path:
    """Where figures go: ``$SVDPRUNE_FIGURES`` if set, else ``<repo root>/figures`` (the folder next to
    the ``svdprune_utils`` package; for an installed, non-editable copy: ``./figures``)."""
    env = os.environ.get("SVDPRUNE_FIGURES")
    if env:
        return Path(env).expanduser().resolve()
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").exists():
        return root / "figures"
    return Path.cwd() / "figures"


def save_figure(fig, name: str, directory: str | os.PathLike | None = None, dpi: int = 110) -> Path:
    """Save ``fig`` as ``<directory>/<name>`` (``.png`` added when missing); returns the path.

    ``directory`` defaults to :func:`figures_dir`. Metadata are stripped so re-runs give the same bytes.
    """
    out = Path(directory) if directory is not None else figures_dir()
    out.mkdir(parents=True, exist_ok=True)
    path = out / (name if Path(name).suffix else f"{name}.png")
    fig.savefig(path, dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    return path


def kept_mask(kept: Any, grid: tuple[int, int]) -> np.ndarray:
    """Boolean (H, W) mask of the kept raster indices on an H×W patch grid."""
    H, W = int(grid[0]), int(grid[1])
    idx = _np(kept).astype(int).ravel()
    if idx.size and (idx.min() < 0 or idx.max() >= H * W):
        raise ValueError(f"kept indices must lie in [0, {H * W}) for a {H}x{W} grid")
    mask = np.zeros(H * W, dtype=bool)
    mask[idx] = True
    return mask.reshape(H, W)


def overlay_kept(
    image: Any,
    kept: Any,
    grid: tuple[int, int] = (24, 24),
    ax=None,
    dim: float = 0.25,
    edgecolor: str = "#ffd400",
    linewidth: float = 0.8,
    title: str | None = None,
):
    """Show ``image`` with the dropped patches dimmed and the kept ones outlined.

    image: (h, w) or (h, w, 3) array (floats in [0, 1] or uint8), h and w multiples of the grid;
    kept: 1-D raster indices of the kept patches on the ``grid`` = (H, W) patch grid;
    dim: brightness left to dropped patches (0 = black, 1 = unchanged).
    """
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    img = _np(image).astype(np.float64)
    if img.max(initial=0.0) > 1.0:
        img = img / 255.0
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    h, w = img.shape[:2]
    H, W = int(grid[0]), int(grid[1])
    if h % H or w % W:
        raise ValueError(f"image {h}x{w} is not a whole number of patches of a {H}x{W} grid")
    ph, pw = h // H, w // W
    mask = kept_mask(kept, (H, W))
    pix = np.kron(mask, np.ones((ph, pw), dtype=bool))[..., None]
    shown = np.where(pix, img, dim * img)
    ax = ax or plt.gca()
    ax.imshow(np.clip(shown, 0, 1), interpolation="nearest")
    # outline only the boundary of the kept region: one segment per kept/dropped edge
    segs = []
    padded = np.pad(mask, 1)
    for r, c in zip(*np.nonzero(mask)):
        y0, y1, x0, x1 = r * ph - 0.5, (r + 1) * ph - 0.5, c * pw - 0.5, (c + 1) * pw - 0.5
        if not padded[r, c + 1]:
            segs.append([(x0, y0), (x1, y0)])
        if not padded[r + 2, c + 1]:
            segs.append([(x0, y1), (x1, y1)])
        if not padded[r + 1, c]:
            segs.append([(x0, y0), (x0, y1)])
        if not padded[r + 1, c + 2]:
            segs.append([(x1, y0), (x1, y1)])
    ax.add_collection(LineCollection(segs, colors=edgecolor, linewidths=linewidth))
    return _bare(ax, title)


def score_map(
    scores: Any,
    grid: tuple[int, int] | None = None,
    ax=None,
    cmap: str = "magma",
    colorbar: bool = True,
    title: str | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    kept: Any = None,
):
    """Heat map of a per-token score (N,) on its H×W patch grid (default: square).

    ``kept`` (optional raster indices) marks the kept tokens with small dots.
    """
    import matplotlib.pyplot as plt

    s = _np(scores).astype(np.float64).ravel()
    H, W = grid_shape(s.size, grid)
    ax = ax or plt.gca()
    im = ax.imshow(s.reshape(H, W), cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    if kept is not None:
        r, c = np.divmod(_np(kept).astype(int).ravel(), W)
        ax.scatter(c, r, s=6, c="#00e5ff", marker="o", linewidths=0)
    if colorbar:
        ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    return _bare(ax, title)


def budget_curve(
    df,
    x: str = "budget",
    y: str = "value",
    hue: str | None = "method",
    ax=None,
    floor: Mapping[Any, float] | None = None,
    floor_label: str = "Eckart–Young floor",
    logx: bool = True,
    logy: bool = False,
    legend: str | bool = "best",
    **kwargs,
):
    """Line plot of ``y`` against the token budget ``x``, one line per ``hue`` (seaborn ``lineplot``).

    df: a long-format pandas DataFrame; ``floor``: an optional {x: y} reference drawn as a dashed black
    line (e.g. the Eckart–Young residual). Budgets are shown on a log-2 axis by default.
    ``legend``: "best" (inside), "outside" (to the right of the axes) or False (none).
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    ax = ax or plt.gca()
    sns.lineplot(data=df, x=x, y=y, hue=hue, style=hue, markers=True, dashes=False, ax=ax, **kwargs)
    if floor is not None:
        xs = sorted(floor)
        ax.plot(xs, [floor[v] for v in xs], "k--", lw=1.2, label=floor_label)
    if logx:
        ax.set_xscale("log", base=2)
        ticks = sorted(df[x].unique())
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks])
        ax.xaxis.set_minor_locator(plt.NullLocator())
    if logy:
        ax.set_yscale("log")
    if legend == "outside":
        ax.legend(frameon=False, fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    elif legend:
        ax.legend(frameon=False, fontsize="small")
    elif ax.get_legend() is not None:
        ax.get_legend().remove()
    return ax


def model_view(processor: Any, image: Any) -> np.ndarray:
    """The image as the vision tower sees it (resized/cropped by ``processor``), (h, w, 3) in [0, 1].

    Kept-token overlays must be drawn on this view: for a non-square photo the processor's crop
    decides which pixels a patch index refers to.
    """
    ip = getattr(processor, "image_processor", processor)
    pv = _np(ip(images=[image], return_tensors="pt")["pixel_values"][0]).astype(np.float64)
    mean = np.asarray(ip.image_mean, dtype=np.float64)[:, None, None]
    std = np.asarray(ip.image_std, dtype=np.float64)[:, None, None]
    return np.clip(pv * std + mean, 0.0, 1.0).transpose(1, 2, 0)


def map_grid(
    maps: Mapping[str, Any],
    ncols: int = 4,
    panel: float = 2.2,
    cmap: str = "magma",
    vmin: float | None = None,
    vmax: float | None = None,
    cbar_label: str | None = None,
):
    """Small multiples: one heat map per entry of ``maps`` ({title: (H, W) array}), one shared colour
    scale (``vmin``/``vmax``, default: the range over all maps) and one colour bar.

    Returns ``(fig, axes)``; unused panels are hidden. ``panel``: inches per panel.
    """
    import matplotlib.pyplot as plt

    arrays = {k: _np(v).astype(np.float64) for k, v in maps.items()}
    if not arrays or any(a.ndim != 2 for a in arrays.values()):
        raise ValueError("maps must be a non-empty mapping of 2-D arrays")
    lo = min(float(a.min()) for a in arrays.values()) if vmin is None else vmin
    hi = max(float(a.max()) for a in arrays.values()) if vmax is None else vmax
    ncols = max(1, min(int(ncols), len(arrays)))
    nrows = -(-len(arrays) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel * ncols + 0.8, panel * nrows + 0.2), squeeze=False)
    im = None
    for ax, (title, a) in zip(axes.flat, arrays.items()):
        im = ax.imshow(a, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
        _bare(ax).set_title(title, fontsize="small")
    for ax in list(axes.flat)[len(arrays):]:
        ax.set_visible(False)
    cbar = fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.02, pad=0.02)
    if cbar_label:
        cbar.set_label(cbar_label)
    return fig, axes


def budget_panels(
    summary,
    hue: str = "config",
    metrics: Mapping[str, str] | None = None,
    floor: str = "floor",
    hue_order: list | None = None,
    panel: tuple[float, float] = (3.6, 3.0),
    suptitle: str | None = None,
):
    """A row of budget curves, one panel per metric, from a table with one row per (``hue``, budget)
    (e.g. :func:`svdprune_utils.analysis.ablation.evaluate_cached`'s summary).

    metrics: {column: axis label}; default accuracy, answer-region recall and projection residual
    (columns missing or all-NaN are skipped). The residual panel also draws the Eckart–Young floor,
    read from the ``floor`` column (the same for every hue at a budget). One legend, right of the row.
    Returns ``(fig, axes)``.
    """
    import matplotlib.pyplot as plt

    metrics = metrics or {"accuracy": "accuracy", "region_recall": "answer-region recall",
                          "residual": "projection residual"}
    shown = {c: lab for c, lab in metrics.items() if c in summary and summary[c].notna().any()}
    if not shown:
        raise ValueError(f"none of the columns {list(metrics)} holds numbers")
    fig, axes = plt.subplots(1, len(shown), figsize=(panel[0] * len(shown) + 1.6, panel[1]), squeeze=False)
    axes = axes[0]
    for i, (ax, (col, label)) in enumerate(zip(axes, shown.items())):
        fl = None
        if col == "residual" and floor in summary:
            fl = summary.groupby("budget")[floor].mean().to_dict()
        last = i == len(shown) - 1
        budget_curve(summary, y=col, hue=hue, hue_order=hue_order, ax=ax, floor=fl,
                     legend="outside" if last else False)
        ax.set_ylabel(label)
        ax.set_xlabel("visual tokens kept")
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig, axes
