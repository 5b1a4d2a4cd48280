"""ShapesVQA: a synthetic visual-question-answering benchmark with ground-truth answer regions.

Each sample is a detail-rich 336×336 RGB scene laid on LLaVA-1.5's 24×24 grid of 14-px patches
(576 visual tokens): a textured, cluttered grey background, several small coloured objects
(``SHAPES`` × ``COLORS``, sizes down to about one patch) and one white *card* that carries a small
digit (the fine-detail question).

Layout (``SceneConfig.align``): by default every object is drawn inside one patch cell (9–11 px,
centred on the cell ±1 px) and the card covers 3×3 cells with its digit exactly in the centre patch;
cells are chosen over the whole image by the position distribution, and objects never touch (no two
occupy neighbouring cells). An object is then identifiable from one visual token, which lets the tiny
embedded tower learn shapes within a CPU budget (a 14-px patch that sees an arbitrary piece of a
freely placed object is a much harder target; see data/README.md), and makes each object a single
token that a pruning method either keeps or loses. ``align=False`` places objects freely (sizes
``min_size``…``max_size``, card ``card_size``) for harder scenes. Every question has a single-word answer and an **answer-region
mask**: a (24, 24) bool array, True on every patch that the object(s) needed for the answer touch
(row-major, patch (r, c) covers pixels [14r, 14r+14) × [14c, 14c+14)).

Question types (``QTYPES``), all with uniform answer distributions by construction:

===========  =====================================  ==================  ==========================
qtype        question                               answers             answer region
===========  =====================================  ==================  ==========================
color        what color is the {shape} ?            ``COLORS``          the unique object of shape
shape        what shape is the {color} object ?     ``SHAPES``          the unique object of colour
exist        is there a {color} {shape} ?           yes / no            yes: that object;
                                                                        no: every object (all must
                                                                        be checked)
count        how many {shape}s are there ?          ``COUNTS``          all objects of that shape
quadrant     where is the {color} {shape} ?         ``QUADRANTS``       that object
digit        what digit is on the card ?            ``DIGITS``          the card
===========  =====================================  ==================  ==========================

``NEW_QTYPES``, for a testbed where leverage is not favoured by construction (opt-in with
``qtypes=ALL_QTYPES``; ``_try_sample_new``):

===========  =====================================  ==================  ==========================
twins        how many {color} {shape}s are there ?  ``COUNTS``          the 1-3 identical objects
big          what color is the big object ?         ``COLORS``          its 2×2 patches
relation     is the {c1} {s1} left of the {c2}      yes / no            both objects
             {s2} ?
background   is the background light or dark ?      light / dark        every patch no object
                                                                        touches (a global question:
                                                                        ``GLOBAL_QTYPES``)
===========  =====================================  ==================  ==========================

Determinism: sample ``i`` of ``ShapesVQA(split, seed=s)`` is drawn from
``np.random.default_rng([s, SPLIT_IDS[split], i])`` alone, so any index renders the same scene on any
machine, in any order, without global seeding; splits never share a generator stream. The train split
is rendered on the fly (use a huge ``n``); validation and test are fixed by their seeds.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

IMAGE_SIZE = 336
PATCH = 14
GRID = IMAGE_SIZE // PATCH  # 24

SHAPES = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
COLORS = {  # name -> RGB; saturated and far apart, the background stays grey
    "red": (215, 35, 35),
    "green": (30, 160, 60),
    "blue": (35, 75, 225),
    "yellow": (240, 205, 20),
    "purple": (145, 50, 190),
}
QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")
COUNTS = ("1", "2", "3")
DIGITS = ("1", "2", "3", "4")
QTYPES = ("color", "shape", "exist", "count", "quadrant", "digit")
NEW_QTYPES = ("twins", "big", "relation", "background")
"""Types where leverage is not favoured by construction (opt-in: ``SceneConfig(qtypes=ALL_QTYPES)``; the default
``QTYPES`` keep the scenes the v1 model was trained and evaluated on)."""
ALL_QTYPES = QTYPES + NEW_QTYPES
TONES = ("light", "dark")
TONE_LEVELS = {"light": (170.0, 205.0), "dark": (95.0, 130.0)}  # background grey level of a "background" scene
ANSWERS = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "exist": ("yes", "no"),
    "count": COUNTS,
    "quadrant": QUADRANTS,
    "digit": DIGITS,
    "twins": COUNTS,
    "big": tuple(COLORS),
    "relation": ("yes", "no"),
    "background": TONES,
}
TEMPLATES = {
    "color": "what color is the {shape} ?",
    "shape": "what shape is the {color} object ?",
    "exist": "is there a {color} {shape} ?",
    "count": "how many {plural} are there ?",
    "quadrant": "where is the {color} {shape} ?",
    "digit": "what digit is on the card ?",
    "twins": "how many {color} {plural} are there ?",
    "big": "what color is the big object ?",
    "relation": "is the {color} {shape} left of the {color2} {shape2} ?",
    "background": "is the background light or dark ?",
}
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
GLOBAL_QTYPES: tuple[str, ...] = ("background",)  # answerable from any tokens by design (testbed-check: apart)

# 5×7 bitmap glyphs (drawn at scale 2: 10×14 px), so rendering depends on no font file.
_GLYPHS = {
    "0": ("01110", "10001", "10011", "10101", "11001", "10001", "01110"),
    "1": ("00100", "01100", "00100", "00100", "00100", "00100", "01110"),
    "2": ("01110", "10001", "00001", "00010", "00100", "01000", "11111"),
    "3": ("11110", "00001", "00001", "01110", "00001", "00001", "11110"),
    "4": ("00010", "00110", "01010", "10010", "11111", "00010", "00010"),
    "5": ("11111", "10000", "11110", "00001", "00001", "10001", "01110"),
    "6": ("00110", "01000", "10000", "11110", "10001", "10001", "01110"),
    "7": ("11111", "00001", "00010", "00100", "01000", "01000", "01000"),
    "8": ("01110", "10001", "10001", "01110", "10001", "10001", "01110"),
    "9": ("01110", "10001", "10001", "01111", "00001", "00010", "01100"),
}


@dataclass(frozen=True)
class SceneConfig:
    """Scene difficulty knobs. ``position``: "uniform" (whole image), "center" (Gaussian around the
    centre, sd ``position_sd`` px), "edge" (pushed towards the borders) or a callable
    ``f(rng) -> (x, y)`` returning an object centre in pixels."""

    min_objects: int = 4  # coloured objects, the card not counted
    max_objects: int = 7
    min_size: int = 9  # object bounding-box side in px (14 = one patch)
    max_size: int = 11
    card_size: tuple[int, int] = (26, 32)  # only with align=False (aligned cards are 3×3 cells)
    clutter: float = 1.0  # multiplies the number of background lines and specks
    position: str | Callable = "uniform"
    position_sd: float = 70.0
    qtypes: tuple[str, ...] = QTYPES  # drawn uniformly
    align: bool = True  # one object per patch cell (see the module docstring)
    jitter: int = 1  # aligned objects: max offset (px) of the object centre from the cell centre

    def __post_init__(self):
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError("need 1 <= min_objects <= max_objects")
        if not 1 <= self.min_size <= self.max_size:
            raise ValueError("need 1 <= min_size <= max_size")
        if self.align and self.max_size + 2 * self.jitter > PATCH - 1:  # PIL fills the end pixel too
            raise ValueError(f"align=True draws each object inside one {PATCH}-px cell: need "
                             f"max_size + 2*jitter <= {PATCH - 1}, got {self.max_size} + 2*{self.jitter}")
        bad = set(self.qtypes) - set(ALL_QTYPES)
        if bad or not self.qtypes:
            raise ValueError(f"unknown question types {sorted(bad)}; choose from {ALL_QTYPES}")


EASY = SceneConfig(min_objects=1, max_objects=3, clutter=0.3)
"""An easy curriculum stage: few, larger objects, little clutter."""


def chance_accuracy(config: SceneConfig = SceneConfig()) -> dict[str, float]:
    """Chance accuracy per question type (answers are uniform by construction, so the best
    constant answer and a uniform guess both score 1/#answers), plus ``"overall"`` under the
    config's uniform question-type mix."""
    out = {q: 1.0 / len(ANSWERS[q]) for q in config.qtypes}
    out["overall"] = float(np.mean(list(out.values())))
    return out


def answer_vocab(qtypes: Sequence[str] = QTYPES) -> list[str]:
    """All answer words of ``qtypes``, sorted, without duplicates."""
    return sorted({a for q in qtypes for a in ANSWERS[q]})


def question_vocab(qtypes: Sequence[str] = QTYPES) -> list[str]:
    """All words that can occur in a question of ``qtypes``, sorted."""
    words = set()
    for q in qtypes:
        words.update(w for w in TEMPLATES[q].split() if "{" not in w)
    words.update(SHAPES, COLORS, PLURALS.values())
    return sorted(words)


# ----------------------------------------------------------------------------------------- scene


def _center(rng: np.random.Generator, cfg: SceneConfig, half: float) -> tuple[float, float]:
    lo, hi = half + 1, IMAGE_SIZE - half - 1
    if callable(cfg.position):
        x, y = cfg.position(rng)
    elif cfg.position == "uniform":
        x, y = rng.uniform(lo, hi, size=2)
    elif cfg.position == "center":
        x, y = rng.normal(IMAGE_SIZE / 2, cfg.position_sd, size=2)
    elif cfg.position == "edge":
        x, y = (rng.beta(0.4, 0.4, size=2) * (hi - lo) + lo)
    else:
        raise ValueError(f"unknown position distribution {cfg.position!r}")
    return float(np.clip(x, lo, hi)), float(np.clip(y, lo, hi))


def _place(rng, cfg, size, boxes, quadrant=None, tries=300):
    """Centre of a size×size box not overlapping ``boxes`` (3-px gap); None when it does not fit.
    With ``quadrant`` the box lies inside that quadrant, clear of the midlines. With ``cfg.align``
    ``size`` is the box side in whole cells and the centre is snapped to a cell centre (so the gap
    rule keeps objects out of neighbouring cells)."""
    half = size / 2
    for _ in range(tries):
        x, y = _center(rng, cfg, half)
        if cfg.align:  # snap to the centre of the cell holding (x, y); size counts cells here
            k = size // PATCH
            lo, hi = k // 2, GRID - 1 - k // 2
            x, y = ((np.clip(np.floor(v / PATCH), lo, hi) + 0.5) * PATCH for v in (x, y))
        if quadrant is not None:
            m, g = IMAGE_SIZE / 2, 0 if cfg.align else 2  # aligned boxes are whole cells
            top, left = quadrant.startswith("top"), quadrant.endswith("left")
            if top and y + half + g > m or (not top) and y - half - g < m:
                continue
            if left and x + half + g > m or (not left) and x - half - g < m:
                continue
        b = (x - half, y - half, x + half, y + half)
        if all(b[2] + 3 < o[0] or o[2] + 3 < b[0] or b[3] + 3 < o[1] or o[3] + 3 < b[1] for o in boxes):
            return x, y
    return None


def _background(rng: np.random.Generator, cfg: SceneConfig, tone: str | None = None) -> Image.Image:
    g = rng.uniform(120, 200)
    if tone is not None:  # a "background" scene: the grey level is mapped into its tone's range
        lo, hi = TONE_LEVELS[tone]
        g = lo + (g - 120) / 80 * (hi - lo)
    tint = rng.uniform(-8, 8, size=3)
    t = (np.arange(IMAGE_SIZE, dtype=np.float32) / IMAGE_SIZE - 0.5)
    a, b = rng.uniform(-25, 25, size=2)
    base = (g + a * t[None, :] + b * t[:, None])[..., None] + tint.astype(np.float32)  # gradient
    img = rng.standard_normal((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)  # pixel noise, sd 7
    img *= 7
    img += base
    im = Image.fromarray(np.clip(img, 0, 255, out=img).astype(np.uint8))
    d = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(10, 30) * cfg.clutter)):  # thin grey lines
        p = rng.uniform(0, IMAGE_SIZE, size=4)
        v = int(rng.uniform(70, 250))
        d.line(tuple(p), fill=(v, v, v), width=int(rng.integers(1, 3)))
    for _ in range(int(rng.integers(20, 60) * cfg.clutter)):  # grey specks
        x, y = rng.uniform(0, IMAGE_SIZE, size=2)
        r = rng.uniform(0.5, 2.5)
        v = int(rng.uniform(60, 255))
        d.ellipse((x - r, y - r, x + r, y + r), fill=(v, v, v))
    return im


def _draw_shape(draws, shape, box, fills):
    x0, y0, x1, y1 = box
    w = x1 - x0
    for d, fill in zip(draws, fills):
        if shape == "circle":
            d.ellipse(box, fill=fill)
        elif shape == "square":
            d.rectangle((x0 + w * 0.08, y0 + w * 0.08, x1 - w * 0.08, y1 - w * 0.08), fill=fill)
        elif shape == "triangle":
            d.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
        elif shape == "cross":
            t = w / 3
            d.rectangle((x0 + t, y0, x1 - t, y1), fill=fill)
            d.rectangle((x0, y0 + t, x1, y1 - t), fill=fill)


def _draw_card(im, idmap, box, digit, idx, rng):
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    v = int(rng.uniform(235, 256))
    ImageDraw.Draw(im).rectangle((x0, y0, x1 - 1, y1 - 1), fill=(v, v, v), outline=(40, 40, 40))
    ImageDraw.Draw(idmap).rectangle((x0, y0, x1 - 1, y1 - 1), fill=idx + 1)
    glyph = np.array([[c == "1" for c in row] for row in _GLYPHS[digit]])
    mask = np.kron(glyph, np.ones((2, 2), bool))  # 14×10
    gy, gx = (y0 + y1 - mask.shape[0]) // 2, (x0 + x1 - mask.shape[1]) // 2
    arr = np.asarray(im).copy()
    ink = int(rng.uniform(0, 40))
    arr[gy:gy + mask.shape[0], gx:gx + mask.shape[1]][mask] = ink
    return Image.fromarray(arr)


def render_scene(rng: np.random.Generator, objects: list[dict], cfg: SceneConfig, tone: str | None = None):
    """Draw ``objects`` (dicts with shape/color/box or kind="card"/digit/box) on a fresh background (``tone``:
    "light"/"dark" maps its grey level into ``TONE_LEVELS``). An object's colour is its ``COLORS`` entry with a
    random ±15 jitter per channel, or its ``rgb`` when given (identical twins).
    Returns (PIL image, (336, 336) int16 id map: object index or -1 for background)."""
    im = _background(rng, cfg, tone)
    idmap = Image.new("I", (IMAGE_SIZE, IMAGE_SIZE), 0)
    for i, o in enumerate(objects):
        if o["kind"] == "card":
            im = _draw_card(im, idmap, o["box"], o["digit"], i, rng)
            continue
        jit = rng.integers(-15, 16, size=3)
        rgb = o.get("rgb") or tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLORS[o["color"]], jit))
        _draw_shape([ImageDraw.Draw(im), ImageDraw.Draw(idmap)], o["shape"], o["box"], [rgb, i + 1])
    return im, np.asarray(idmap, dtype=np.int32).astype(np.int16) - 1


def patch_coverage(idmap: np.ndarray, n_objects: int) -> np.ndarray:
    """(n_objects, 24, 24) fraction of each patch's pixels covered by each object."""
    ids = idmap.reshape(GRID, PATCH, GRID, PATCH).transpose(0, 2, 1, 3).reshape(GRID, GRID, -1)
    cov = np.stack([(ids == k).mean(-1) for k in range(n_objects)]) if n_objects else np.zeros((0, GRID, GRID))
    return cov


# -------------------------------------------------------------------------------------- questions


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def make_sample(rng: np.random.Generator, cfg: SceneConfig = SceneConfig(), qtype: str | None = None) -> dict:
    """One sample, drawn from ``rng`` alone.

    Returns a dict: ``image`` (PIL RGB 336×336), ``question`` (str), ``answer`` (str), ``qtype``,
    ``mask`` ((24, 24) bool answer region), ``objects`` (list of dicts: kind "object" with
    shape/color, or "card" with digit; ``box`` (x0, y0, x1, y1) px; ``target`` bool),
    ``coverage`` ((n_objects, 24, 24) float32 patch coverage per object) and ``idmap``
    ((336, 336) int16 object index per pixel, -1 background).
    """
    for _ in range(100):
        s = _try_sample(rng, cfg, qtype)
        if s is not None:
            return s
    raise RuntimeError("could not place the objects; loosen the SceneConfig")


def _try_sample(rng, cfg, qtype):
    qtype = qtype or _pick(rng, cfg.qtypes)
    if qtype in NEW_QTYPES:
        return _try_sample_new(rng, cfg, qtype)
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    pairs = [(s, c) for s in SHAPES for c in COLORS]
    shape, color = _pick(rng, SHAPES), _pick(rng, tuple(COLORS))
    targets: list[tuple[str, str]] = []  # (shape, color) of the objects the question is about
    allowed = pairs  # what the other objects may be
    quadrant = None
    if qtype == "color":
        targets, allowed = [(shape, color)], [p for p in pairs if p[0] != shape]
        answer, q = color, TEMPLATES[qtype].format(shape=shape)
    elif qtype == "shape":
        targets, allowed = [(shape, color)], [p for p in pairs if p[1] != color]
        answer, q = shape, TEMPLATES[qtype].format(color=color)
    elif qtype == "exist":
        answer = _pick(rng, ("yes", "no"))
        targets = [(shape, color)] if answer == "yes" else []
        allowed = [p for p in pairs if p != (shape, color)]
        q = TEMPLATES[qtype].format(color=color, shape=shape)
    elif qtype == "count":
        k = int(_pick(rng, COUNTS))
        targets = [(shape, _pick(rng, tuple(COLORS))) for _ in range(k)]
        allowed = [p for p in pairs if p[0] != shape]
        answer, q = str(k), TEMPLATES[qtype].format(plural=PLURALS[shape])
    elif qtype == "quadrant":
        quadrant = _pick(rng, QUADRANTS)
        targets, allowed = [(shape, color)], [p for p in pairs if p != (shape, color)]
        answer, q = quadrant, TEMPLATES[qtype].format(color=color, shape=shape)
    elif qtype == "digit":
        answer, q = _pick(rng, DIGITS), TEMPLATES[qtype]
    else:
        raise ValueError(f"unknown qtype {qtype!r}")
    n = max(n, len(targets))
    specs = [(p, True) for p in targets] + [(_pick(rng, allowed), False) for _ in range(n - len(targets))]

    objects, boxes = [], []  # boxes: the space taken (whole cells when aligned)
    digit = answer if qtype == "digit" else _pick(rng, DIGITS)

    def box_at(xy, side):
        return (xy[0] - side / 2, xy[1] - side / 2, xy[0] + side / 2, xy[1] + side / 2)

    if cfg.align:
        xy = _place(rng, cfg, 3 * PATCH, boxes)
        size = 3 * PATCH - 2
    else:
        size = int(rng.integers(cfg.card_size[0], cfg.card_size[1] + 1))
        xy = _place(rng, cfg, size, boxes)
    if xy is None:
        return None
    objects.append(dict(kind="card", digit=digit, box=box_at(xy, size), target=qtype == "digit"))
    boxes.append(box_at(xy, 3 * PATCH if cfg.align else size))
    for (s, c), is_target in specs:
        size = int(rng.integers(cfg.min_size, cfg.max_size + 1))
        xy = _place(rng, cfg, PATCH if cfg.align else size, boxes, quadrant=quadrant if is_target else None)
        if xy is None:
            return None
        boxes.append(box_at(xy, PATCH if cfg.align else size))
        if cfg.align:
            xy = xy + rng.integers(-cfg.jitter, cfg.jitter + 1, size=2)
        objects.append(dict(kind="object", shape=s, color=c, box=box_at(xy, size), target=is_target))
    order = rng.permutation(len(objects))  # draw order (and indices) independent of the role
    objects = [objects[i] for i in order]

    image, idmap = render_scene(rng, objects, cfg)
    cov = patch_coverage(idmap, len(objects)).astype(np.float32)
    mask = question_region(objects, cov, q)
    if qtype == "quadrant":  # the answer is read off the drawn pixels of the (one) target
        if _quadrant_of(idmap, next(i for i, o in enumerate(objects) if o["target"])) != answer:
            return None
    return dict(image=image, question=q, answer=answer, qtype=qtype, mask=mask, objects=objects,
                coverage=cov, idmap=idmap)


def _try_sample_new(rng, cfg, qtype):
    """A sample of one of ``NEW_QTYPES`` (the six original types keep ``_try_sample``'s random stream):

    - twins: k = 1-3 *identical* objects (same shape, colour, size and RGB) among others that are not that pair;
      region: the k twins. Identical tokens share (split) their leverage.
    - big: one object over 2×2 cells (22-25 px, centred on the corner the four cells share); region: its 4 patches.
    - relation: two distinct colour-shape pairs in different columns; "is A left of B ?" is answered by their drawn
      pixels; region: both objects.
    - background: "light" or "dark" grey (``TONE_LEVELS``); region: every patch no object or card touches.
    """
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    pairs = [(sh, c) for sh in SHAPES for c in COLORS]
    shape, color = _pick(rng, SHAPES), _pick(rng, tuple(COLORS))
    specs, allowed, tone, big = [], pairs, None, None  # specs: (shape, color, is_target)
    if qtype == "twins":
        k = int(_pick(rng, COUNTS))
        specs = [(shape, color, True)] * k
        allowed = [p for p in pairs if p != (shape, color)]
        answer = str(k)
    elif qtype == "big":
        big = (shape, color)
        answer = color
    elif qtype == "relation":
        other = _pick(rng, [p for p in pairs if p != (shape, color)])
        specs = [(shape, color, True), (other[0], other[1], True)]
        allowed = [p for p in pairs if p not in ((shape, color), other)]
        answer = None  # read off the drawn pixels below
    elif qtype == "background":
        tone = answer = _pick(rng, TONES)
    else:
        raise ValueError(f"unknown qtype {qtype!r}")
    n = max(n, len(specs))
    specs += [(*_pick(rng, allowed), False) for _ in range(n - len(specs))]
    twin_size = int(rng.integers(cfg.min_size, cfg.max_size + 1))
    twin_rgb = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLORS[color], rng.integers(-15, 16, size=3)))

    def box_at(xy, side):
        return (xy[0] - side / 2, xy[1] - side / 2, xy[0] + side / 2, xy[1] + side / 2)

    objects, boxes = [], []
    side = 3 * PATCH if cfg.align else int(rng.integers(cfg.card_size[0], cfg.card_size[1] + 1))
    xy = _place(rng, cfg, side, boxes)
    if xy is None:
        return None
    objects.append(dict(kind="card", digit=_pick(rng, DIGITS), box=box_at(xy, side - 2 if cfg.align else side),
                        target=False))
    boxes.append(box_at(xy, side))
    if big is not None:  # 2×2 cells: a centre on a cell corner (aligned) or twice the largest object
        if cfg.align:
            for _ in range(300):
                r, c = rng.integers(1, GRID, size=2)
                b = box_at((c * PATCH, r * PATCH), 2 * PATCH)
                if all(b[2] + 3 < o[0] or o[2] + 3 < b[0] or b[3] + 3 < o[1] or o[3] + 3 < b[1] for o in boxes):
                    xy = (float(c * PATCH), float(r * PATCH))
                    break
            else:
                return None
        else:
            xy = _place(rng, cfg, 2 * cfg.max_size + 2, boxes)
            if xy is None:
                return None
        size = int(rng.integers(2 * PATCH - 6, 2 * PATCH - 2)) if cfg.align else 2 * cfg.max_size + 2
        boxes.append(box_at(xy, 2 * PATCH if cfg.align else size))
        objects.append(dict(kind="object", shape=big[0], color=big[1], box=box_at(xy, size), target=True, cells=2))
    for sh, c, is_target in specs:
        twin = qtype == "twins" and is_target
        size = twin_size if twin else int(rng.integers(cfg.min_size, cfg.max_size + 1))
        xy = _place(rng, cfg, PATCH if cfg.align else size, boxes)
        if xy is None:
            return None
        boxes.append(box_at(xy, PATCH if cfg.align else size))
        if cfg.align:
            xy = xy + rng.integers(-cfg.jitter, cfg.jitter + 1, size=2)
        o = dict(kind="object", shape=sh, color=c, box=box_at(xy, size), target=is_target)
        if twin:
            o["rgb"] = twin_rgb
        objects.append(o)
    if qtype == "relation":  # name the pair so that the answer is yes or no with equal probability
        a, b = (o for o in objects if o["target"])
        if abs((a["box"][0] + a["box"][2]) - (b["box"][0] + b["box"][2])) < PATCH:
            return None  # same column: "left of" would be ambiguous
        answer = _pick(rng, ("yes", "no"))
        left, right = sorted((a, b), key=lambda o: o["box"][0] + o["box"][2])
        first, second = (left, right) if answer == "yes" else (right, left)
    order = rng.permutation(len(objects))
    objects = [objects[i] for i in order]
    image, idmap = render_scene(rng, objects, cfg, tone)
    cov = patch_coverage(idmap, len(objects)).astype(np.float32)
    if qtype == "relation":
        ia, ib = (next(i for i, o in enumerate(objects) if o is x) for x in (first, second))
        xa, xb = (np.nonzero(idmap == i)[1] for i in (ia, ib))
        if not (xa.max() < xb.min() or xb.max() < xa.min()):
            return None  # drawn pixels overlap in x
        if (xa.max() < xb.min()) != (answer == "yes"):
            return None
        q = TEMPLATES[qtype].format(color=first["color"], shape=first["shape"], color2=second["color"],
                                    shape2=second["shape"])
    elif qtype == "twins":
        q = TEMPLATES[qtype].format(color=color, plural=PLURALS[shape])
    else:
        q = TEMPLATES[qtype]
    mask = question_region(objects, cov, q)
    return dict(image=image, question=q, answer=answer, qtype=qtype, mask=mask, objects=objects,
                coverage=cov, idmap=idmap)


def _quadrant_of(idmap: np.ndarray, k: int) -> str | None:
    """The quadrant holding every drawn pixel of object ``k`` ("top-left", ...), None when it straddles a midline."""
    ys, xs = np.nonzero(idmap == k)
    m = IMAGE_SIZE / 2
    v = "top" if ys.max() < m else "bottom" if ys.min() >= m else None
    h = "left" if xs.max() < m else "right" if xs.min() >= m else None
    return f"{v}-{h}" if v and h else None


def scene_questions(objects: list[dict], idmap: np.ndarray) -> dict[str, list[tuple[str, str]]]:
    """Every question with a well-defined answer on a scene, by type: ``{qtype: [(question,
    answer), ...]}`` from the ``objects`` of a sample (the rules of ``make_sample``: a colour/shape
    question needs a unique object of that shape/colour, a quadrant question a unique colour-shape
    pair, a count question 1-3 objects of the shape; every colour-shape pair gets an existence
    question, answered yes or no; quadrants are read off the drawn pixels in ``idmap``, as in
    ``make_sample``). Used to train on several question turns per image."""
    objs = [o for o in objects if o["kind"] == "object"]
    out: dict[str, list[tuple[str, str]]] = {q: [] for q in QTYPES}
    for shape in SHAPES:
        of = [o for o in objs if o["shape"] == shape]
        if len(of) == 1:
            out["color"].append((TEMPLATES["color"].format(shape=shape), of[0]["color"]))
        if str(len(of)) in COUNTS:
            out["count"].append((TEMPLATES["count"].format(plural=PLURALS[shape]), str(len(of))))
    for color in COLORS:
        of = [o for o in objs if o["color"] == color]
        if len(of) == 1:
            out["shape"].append((TEMPLATES["shape"].format(color=color), of[0]["shape"]))
    for shape in SHAPES:
        for color in COLORS:
            of = [o for o in objs if o["shape"] == shape and o["color"] == color]
            out["exist"].append((TEMPLATES["exist"].format(color=color, shape=shape), "yes" if of else "no"))
            quad = _quadrant_of(idmap, next(k for k, o in enumerate(objects) if o is of[0])) if len(of) == 1 else None
            if quad:
                out["quadrant"].append((TEMPLATES["quadrant"].format(color=color, shape=shape), quad))
    out["digit"] = [(TEMPLATES["digit"], o["digit"]) for o in objects if o["kind"] == "card"]
    # the new types, where the scene defines them: twins (1-3 objects of a pair; identical when the scene drew
    # them so), big (a 2x2-cell object), relation (two unique pairs whose drawn pixels do not overlap in x)
    out["twins"], out["big"], out["relation"], out["background"] = [], [], [], []
    for shape in SHAPES:
        for color in COLORS:
            of = [o for o in objs if o["shape"] == shape and o["color"] == color and o.get("cells", 1) == 1]
            if str(len(of)) in COUNTS and len(of) == len([o for o in objs if (o["shape"], o["color"]) ==
                                                          (shape, color)]):
                out["twins"].append((TEMPLATES["twins"].format(color=color, plural=PLURALS[shape]), str(len(of))))
    out["big"] = [(TEMPLATES["big"], o["color"]) for o in objs if o.get("cells", 1) > 1]
    unique = [k for k, o in enumerate(objects) if o["kind"] == "object" and o.get("cells", 1) == 1 and
              sum((p["shape"], p["color"]) == (o["shape"], o["color"]) for p in objs) == 1]
    xs = {k: np.nonzero(idmap == k)[1] for k in unique}
    for a in unique:
        for b in unique:
            if a != b and (xs[a].max() < xs[b].min() or xs[b].max() < xs[a].min()):
                oa, ob = objects[a], objects[b]
                q = TEMPLATES["relation"].format(color=oa["color"], shape=oa["shape"], color2=ob["color"],
                                                 shape2=ob["shape"])
                out["relation"].append((q, "yes" if xs[a].max() < xs[b].min() else "no"))
    return out


def question_region(objects: list[dict], coverage: np.ndarray, question: str) -> np.ndarray:
    """(24, 24) bool answer region of ``question`` (one of ``TEMPLATES``) on a scene: the patches of
    the objects the question is about — the named object (colour, shape, quadrant, existence "yes"),
    every object of the named shape (count), every coloured object when the named pair is absent
    (existence "no"), the card (digit); the twins (twins), the 2×2-cell object (big), both named objects
    (relation), every patch no object touches (background). For a sample's own question this is its ``mask``."""
    w = question.split()
    objs = [k for k, o in enumerate(objects) if o["kind"] == "object"]
    has = lambda k, **kv: all(objects[k][a] == b for a, b in kv.items())  # noqa: E731
    if question == TEMPLATES["digit"]:
        idx = [k for k, o in enumerate(objects) if o["kind"] == "card"]
    elif question == TEMPLATES["big"]:
        idx = [k for k in objs if objects[k].get("cells", 1) > 1]
    elif w[:2] == ["what", "color"]:
        idx = [k for k in objs if has(k, shape=w[4])]
    elif w[:2] == ["what", "shape"]:
        idx = [k for k in objs if has(k, color=w[4])]
    elif w[:2] == ["is", "there"]:
        idx = [k for k in objs if has(k, color=w[3], shape=w[4])] or objs
    elif w[:2] == ["how", "many"] and len(w) == 7:  # twins: "how many red circles are there ?"
        single = {p: s for s, p in PLURALS.items()}
        idx = [k for k in objs if has(k, color=w[2], shape=single.get(w[3]))]
    elif w[:2] == ["how", "many"]:
        single = {p: s for s, p in PLURALS.items()}
        idx = [k for k in objs if has(k, shape=single.get(w[2]))]
    elif w[:2] == ["where", "is"]:
        idx = [k for k in objs if has(k, color=w[3], shape=w[4])]
    elif question == TEMPLATES["background"]:
        return ~(coverage > 0).any(0) if len(coverage) else np.ones((GRID, GRID), bool)
    elif w[:2] == ["is", "the"] and w[5:7] == ["of", "the"]:  # relation
        idx = [k for k in objs if has(k, color=w[2], shape=w[3]) or has(k, color=w[7], shape=w[8])]
    else:
        raise ValueError(f"not a ShapesVQA question: {question!r}")
    return (coverage[idx] > 0).any(0) if idx else np.zeros((GRID, GRID), bool)


def extra_turns(sample: dict, rng: np.random.Generator, n: int,
                qtypes: Sequence[str] = QTYPES) -> list[tuple[str, str]]:
    """Up to ``n`` more (question, answer) turns about ``sample``'s scene, drawn from ``rng``: rounds
    over the question types ``qtypes`` in random order, one new question of each type per round (existence:
    yes or no with equal probability when both are left), never repeating a question (nor the
    sample's own)."""
    qs = scene_questions(sample["objects"], sample["idmap"])
    asked, turns = {sample["question"]}, []
    while len(turns) < n:
        added = False
        for qt in rng.permutation(list(qtypes)):
            cand = [qa for qa in qs[qt] if qa[0] not in asked]
            if qt == "exist" and cand:
                by = {a: [qa for qa in cand if qa[1] == a] for a in ("yes", "no")}
                cand = by[_pick(rng, [a for a in ("yes", "no") if by[a]])]
            if cand and len(turns) < n:
                turns.append(cand[int(rng.integers(len(cand)))])
                asked.add(turns[-1][0])
                added = True
        if not added:
            break
    return turns


# ---------------------------------------------------------------------------------------- dataset


class ShapesVQA(torch.utils.data.Dataset):
    """ShapesVQA split of ``n`` samples; item ``i`` is ``make_sample(default_rng([seed, split, i]))``.

    ``split`` is "train" (use a large n: rendered on the fly), "val" or "test"; the same
    ``seed`` gives disjoint streams for different splits. ``balanced=True`` cycles the question
    types (item i has type ``qtypes[i % len(qtypes)]``) so every slice is balanced; otherwise the
    type is drawn at random. Items are dicts (see ``make_sample``); use ``collate`` with a
    DataLoader.
    """

    def __init__(self, split: str = "test", n: int = 1200, seed: int = 0,
                 config: SceneConfig = SceneConfig(), balanced: bool = True, **overrides):
        if split not in SPLIT_IDS:
            raise ValueError(f"split must be one of {list(SPLIT_IDS)}")
        self.split, self.n, self.seed, self.balanced = split, int(n), int(seed), balanced
        self.config = replace(config, **overrides) if overrides else config

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if not -self.n <= i < self.n:
            raise IndexError(i)
        i = i % self.n
        rng = np.random.default_rng([self.seed, SPLIT_IDS[self.split], i])
        qtypes = self.config.qtypes
        qtype = qtypes[i % len(qtypes)] if self.balanced else None
        s = make_sample(rng, self.config, qtype)
        s["index"] = i
        return s

    def chance(self) -> dict[str, float]:
        return chance_accuracy(self.config)


def collate(batch: Sequence[dict]) -> dict:
    """DataLoader collate: lists for everything, ``mask`` stacked to a (B, 24, 24) bool tensor."""
    out = {k: [b[k] for b in batch] for k in batch[0]}
    out["mask"] = torch.as_tensor(np.stack(out["mask"]))
    return out
