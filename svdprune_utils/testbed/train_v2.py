"""Recipe v2 of the embedded tiny LLaVA (issue 16): a model on which accuracy under pruning measures the selection.

What changes from the v1 recipe (:mod:`.tiny`, data/tiny-llava-shapes-v1), and why:

- **Six decoder layers**, the grounded lookups at layers 2 and 3 (``RecipeV2.grounding_layers``): FastV's default
  cut (K = 2) then comes before the image is read, as in LLaVA-1.5 (2 of 32 layers), instead of after it.
- **Trained on pruned prompts**: each row stands for the prompt the patch builds at a budget B drawn
  log-uniformly from 16…575 (or the full 576, ``RecipeV2.full_fraction``): the tokens kept at B are a random
  subset that contains the answer region (never a selector's choice), their positions are the ones the patch's
  apply step gives them (:func:`~svdprune_utils.hf.inputs.keep_image_tokens`, ``positions="compact"``), and the
  text after the image moves up by 576 - B. For speed only ``RecipeV2.image_tokens`` (32) of the B tokens are
  present: the answer region, every object and card patch, random background; each present background token
  carries log(w) in the attention, w = background tokens at B / background tokens present, so that every softmax
  sees the background share of the B-token prompt (:func:`row_inputs`; the v1 recipe did this for B = 576 only).
- **All ten question types** (``shapes.ALL_QTYPES``), rows balanced over (type, answer).
- Stage-1 targets for the new types: the 2×2 "big" flag, the column of every object patch (relation), and each
  patch's mean grey level (background).
- **Fine-tuning phases** after stage 2 (``RecipeV2.finetune``, stages 3 and 4 of the shipped model): the
  early-layer image attention penalised (``early_image_attention``), then duplicates counted at all 576 tokens.
- **Resumable**: ``train_state.pt`` every ``RecipeV2.checkpoint_every`` steps (model, heads, optimiser, schedule,
  random states, log); an interrupted run started again with the same arguments continues where it stopped.
"""
from __future__ import annotations

import copy
import csv
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..hf.inputs import keep_image_tokens
from . import shapes as S
from . import tiny as T


@dataclass
class RecipeV2:
    """The v2 recipe's knobs (written to ``recipe.json``)."""

    sizes: T.TinySizes = field(default_factory=lambda: T.TinySizes(text_layers=6))
    # stage 1 starts from the tower of the v1 recipe's stage 1 (tiny.train_tiny: colour, shape, digit, quadrant;
    # 10k scenes, deterministic) and fine-tunes it with the v2 targets; from scratch with all targets the digit
    # was still at chance (0.31) and shape at 0.74 after 12k scenes (data/README.md)
    stage1_init: str = "v1"  # "v1" or "scratch"
    stage1_samples: int = 6_000
    stage1_batch_size: int = 16
    stage1_lr: float = 1e-3
    stage2_images: int = 12_000
    stage2_questions: int = 10
    stage2_steps: int = 12_000
    batch_size: int = 32
    stage2_lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grounding: float = 1.0
    grounding_layers: tuple[int, int] = (2, 3)  # (word -> the patches it names, last key word -> answer region)
    image_tokens: int = 32  # tokens present per row (the others of the budget are represented, see row_inputs)
    min_budget: int = 16
    full_fraction: float = 0.3  # rows at all 576 tokens
    background_weight_from: float = 0.5  # fraction of stage 2 before which present tokens are not reweighted
    log_every: int = 50
    eval_every: int = 1_000
    eval_n: int = 200
    checkpoint_every: int = 250
    # weight of the mean attention mass that text queries after the image give image tokens in the layers before
    # the first grounded one (0, 1): it keeps the image read after FastV's cut (0 = off)
    early_image_attention: float = 0.0
    # relative frequency of a question type's rows (types not named: 1); then (type, answer) uniform within the type
    qtype_weight: dict = field(default_factory=dict)
    # fine-tuning phases after stage 2 (stages 3, 4, ...), each a dict of stage-2 fields it overrides (STAGE2_FIELDS):
    # it starts from the previous stage's weights with a fresh optimiser and schedule, its own pool
    finetune: tuple = field(default_factory=lambda: copy.deepcopy(FINETUNE))


STAGE2_FIELDS = ("stage2_images", "stage2_questions", "stage2_steps", "batch_size", "stage2_lr", "warmup_steps",
                 "weight_decay", "grounding", "grounding_layers", "image_tokens", "min_budget", "full_fraction",
                 "background_weight_from", "eval_every", "early_image_attention", "qtype_weight")

# The shipped model's phases after stage 2 (data/README.md): (3) the image read after FastV's cut, the early-layer
# image attention penalised; (4) counting duplicates at all 576 tokens, where seed 0's twins were one question short
FINETUNE = (
    dict(stage2_steps=3_000, stage2_images=6_000, stage2_lr=3e-4, warmup_steps=50, background_weight_from=0.0,
         early_image_attention=1.0, eval_every=1_000),
    dict(stage2_steps=1_500, stage2_images=6_000, stage2_lr=1e-4, warmup_steps=50, background_weight_from=0.0,
         early_image_attention=1.0, eval_every=500, full_fraction=0.5, qtype_weight={"twins": 3.0, "count": 2.0}),
)


def phase_recipes(recipe: RecipeV2) -> list[RecipeV2]:
    """The recipes of stage 2 and of each fine-tuning phase (``recipe.finetune``), in order."""
    from dataclasses import replace

    out = [replace(recipe, finetune=())]
    for k, over in enumerate(recipe.finetune):
        bad = sorted(set(over) - set(STAGE2_FIELDS))
        if bad:
            raise ValueError(f"finetune phase {k + 1}: {bad} are not stage-2 fields (allowed: {STAGE2_FIELDS})")
        out.append(replace(recipe, finetune=(), **over))
    for r in out:
        unknown = sorted(set(r.qtype_weight) - set(S.ALL_QTYPES))
        if unknown or any(not (w >= 0) for w in r.qtype_weight.values()) or \
                not any(r.qtype_weight.get(q, 1.0) > 0 for q in S.ALL_QTYPES):
            raise ValueError(f"qtype_weight {r.qtype_weight}: weights >= 0 (not all 0) of {S.ALL_QTYPES}")
    return out


# ------------------------------------------------------------------------------------------- stage 1


N_DENSE = 7  # colour, shape, digit, centre (as tiny._Encoded), big flag, column (-100 off objects), grey level x 1000


def dense_targets(s: dict) -> np.ndarray:
    """(7, 576) int64 per-patch targets of a ShapesVQA sample: tiny's four (colour, shape, digit, object centre)
    of the object covering >= 10 % of the patch, then 1 on the patches of a 2×2-cell object, the column (0-23) of
    the object's centre on object patches (-100 elsewhere), and the patch's mean grey level x 1000 (0-1000)."""
    cov, objs = s["coverage"], s["objects"]
    best, val = cov.argmax(0), cov.max(0) >= 0.1
    colors, shapes_ = list(S.COLORS), list(S.SHAPES)
    col = np.full((S.GRID, S.GRID), len(colors) + 1)
    shp = np.full((S.GRID, S.GRID), len(shapes_) + 1)
    dig = np.full((S.GRID, S.GRID), len(S.DIGITS))
    ctr = np.zeros((S.GRID, S.GRID), dtype=np.int64)
    big = np.zeros((S.GRID, S.GRID), dtype=np.int64)
    xcol = np.full((S.GRID, S.GRID), -100)
    for k, o in enumerate(objs):
        m = val & (best == k)
        x0, y0, x1, y1 = o["box"]
        cx = min(int((x0 + x1) / 2 // S.PATCH), S.GRID - 1)
        ctr[min(int((y0 + y1) / 2 // S.PATCH), S.GRID - 1), cx] = 1
        if o["kind"] == "card":
            col[m], shp[m], dig[m] = len(colors), len(shapes_), S.DIGITS.index(o["digit"])
        else:
            col[m], shp[m], xcol[m] = colors.index(o["color"]), shapes_.index(o["shape"]), cx
            big[m] = int(o.get("cells", 1) > 1)
    grey = np.asarray(s["image"], dtype=np.float64).mean(-1).reshape(S.GRID, S.PATCH, S.GRID, S.PATCH).mean((1, 3))
    lum = np.round(grey / 255 * 1000).astype(np.int64)
    return np.stack([col, shp, dig, ctr, big, xcol, lum]).reshape(N_DENSE, -1)


class _Scenes(torch.utils.data.Dataset):
    """ShapesVQA train scenes of every type (``shapes.ALL_QTYPES``) → (pixel values, dense targets, present pairs,
    [(question, answer), ...] (its own, then extra turns of every type), answer regions (Q, 576))."""

    def __init__(self, n, seed, questions=1, start=0):
        self.ds = S.ShapesVQA("train", n=n, seed=seed, balanced=False, qtypes=S.ALL_QTYPES)
        self.questions, self.start = questions, start

    def __len__(self):
        return len(self.ds) - self.start

    def __getitem__(self, i):
        i += self.start
        s = self.ds[i]
        present = np.zeros(len(S.COLORS) * len(S.SHAPES), dtype=np.float32)
        for o in s["objects"]:
            if o["kind"] == "object":
                present[S.SHAPES.index(o["shape"]) * len(S.COLORS) + list(S.COLORS).index(o["color"])] = 1
        qas = [(s["question"], s["answer"])]
        if self.questions > 1:
            rng = np.random.default_rng([self.ds.seed, S.SPLIT_IDS["train"], i, 1])
            qas += S.extra_turns(s, rng, self.questions - 1, S.ALL_QTYPES[:-1])  # no tone outside its own scenes
        regions = np.stack([S.question_region(s["objects"], s["coverage"], q).reshape(-1) for q, _ in qas])
        return (T.pixel_values([s["image"]])[0], torch.as_tensor(dense_targets(s)), torch.as_tensor(present), qas,
                torch.as_tensor(regions))


def _loader(n, seed, batch_size, questions=1, start=0):
    return torch.utils.data.DataLoader(_Scenes(n, seed, questions, start), batch_size=batch_size,
                                       collate_fn=T._collate, num_workers=0)


class Stage1Heads(nn.Module):
    """Linear read-outs of the tower's layer -2 patch features: colour, shape, digit, centre, quadrant (tiny's),
    big flag, column, grey level; and the CLS multi-label head over the colour-shape pairs present."""

    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.splits = [len(S.COLORS) + 2, len(S.SHAPES) + 2, len(S.DIGITS) + 1, 2, 4, 2, 1, 1]
        self.dense = nn.Linear(d, sum(self.splits))
        self.cls = nn.Linear(d, len(S.COLORS) * len(S.SHAPES))


def stage1_loss(model, heads, pv, dense, present):
    out = model.model.vision_tower(pixel_values=pv, output_hidden_states=True)
    h = out.hidden_states[model.config.vision_feature_layer]
    lg = heads.dense(heads.norm(h[:, 1:])).split(heads.splits, dim=-1)
    w = 1.0 + 4.0 * T._covered(dense).float()
    quad = T._quadrant_targets(pv.device).expand(len(pv), -1)
    cls_targets = [dense[:, 0], dense[:, 1], dense[:, 2], dense[:, 3], quad, dense[:, 4]]
    loss = sum((F.cross_entropy(g.transpose(1, 2), t, reduction="none") * w).sum() / w.sum()
               for g, t in zip(lg[:5], cls_targets[:5]))
    wb = 1.0 + 4.0 * T._covered(dense).float() + 20.0 * (dense[:, 4] == 1).float()  # big patches are rarer still
    loss = loss + (F.cross_entropy(lg[5].transpose(1, 2), dense[:, 4], reduction="none") * wb).sum() / wb.sum()
    on = dense[:, 5] >= 0  # column as a regression (col / 23) on object patches: "left of" compares two of them
    loss = loss + 10 * F.mse_loss(lg[6].squeeze(-1)[on], dense[:, 5][on].float() / (S.GRID - 1))
    loss = loss + 10 * F.mse_loss(lg[7].squeeze(-1), dense[:, 6].float() / 1000)
    cls = heads.cls(heads.norm(h[:, 0])), heads.cls(out.pooler_output)
    return loss + sum(F.binary_cross_entropy_with_logits(c, present) for c in cls)


@torch.no_grad()
def stage1_accuracy(model, heads, batch) -> dict[str, float]:
    """Per-patch accuracy on object patches (colour, shape, quadrant; column: the regressed column within 1 of the
    object's), card patches (digit), big-object patches (big), and the grey level's mean absolute error (x 255)
    over all patches."""
    pv, dense = batch[0], batch[1]
    h = T.vision_features(model, pv.to(model.device))[:, 1:]
    lg = heads.dense(heads.norm(h)).split(heads.splits, dim=-1)
    dense = dense.to(h.device)
    obj, card, bigm = dense[:, 1] < len(S.SHAPES), dense[:, 2] < len(S.DIGITS), dense[:, 4] == 1
    quad = T._quadrant_targets(h.device).expand(len(pv), -1)

    def acc(g, t, m):
        return (g.argmax(-1) == t)[m].float().mean().item() if m.any() else float("nan")

    return dict(color=acc(lg[0], dense[:, 0], obj), shape=acc(lg[1], dense[:, 1], obj),
                digit=acc(lg[2], dense[:, 2], card), quadrant=acc(lg[4], quad, obj), big=acc(lg[5], dense[:, 4], bigm),
                column=(((lg[6].squeeze(-1) * (S.GRID - 1)).round() - dense[:, 5]).abs() <= 1)[obj].float().mean()
                .item(),
                grey_mae=(lg[7].squeeze(-1) - dense[:, 6] / 1000).abs().mean().item() * 255)


# ------------------------------------------------------------------------------------------- stage 2


def draw_budget(rng: np.random.Generator, recipe: RecipeV2, n_tokens: int = S.GRID ** 2) -> int:
    """A row's budget: ``n_tokens`` with probability ``full_fraction``, else log-uniform in min_budget…n_tokens-1."""
    if rng.random() < recipe.full_fraction:
        return n_tokens
    return int(min(n_tokens - 1, math.floor(math.exp(rng.uniform(math.log(recipe.min_budget),
                                                                 math.log(n_tokens))))))


def row_subsets(rng: np.random.Generator, region: np.ndarray, covered: np.ndarray, budget: int, present: int):
    """(kept at the budget, present) ascending patch indices of one row: ``present`` (= min(budget, image_tokens))
    tokens = the answer region when it fits, then (budgets >= ``present`` only) the other object/card patches,
    then random ones; ``kept`` = those plus random other patches up to ``budget`` (a random subset containing the
    region: no selector's choice)."""
    n = region.size
    k = min(budget, present)
    noise = rng.random(n)
    fits = region.sum() <= k
    score = noise + 4.0 * (region & fits) + (2.0 * covered if budget >= present else 0.0)
    pres = np.sort(np.argsort(-score, kind="stable")[:k])
    rest = np.setdiff1d(np.arange(n), pres)
    extra = rest[rng.permutation(rest.size)[:budget - k]]
    return np.sort(np.concatenate([pres, extra])), pres


def row_inputs(ids, mask, labels, kept, present, covered, image_token_id, pad_token_id, weight: bool):
    """One training row standing for the prompt pruned to ``kept`` (the patch's apply step, compact positions)
    with only the ``present`` image tokens in it. ``ids``/``mask``/``labels``: (L,) of the full prompt (576
    placeholders). Returns (ids, position_ids, labels, bias, image_index) of the shortened row, ``bias`` = log(w)
    on present background tokens (w = background tokens kept / present, when ``weight``), 0 elsewhere;
    ``image_index``: the patch index of each present image token (in order)."""
    x = {"input_ids": ids[None], "attention_mask": mask[None], "labels": labels[None],
         "position_ids": (mask.cumsum(-1) - 1).clamp_min(0)[None]}
    out = keep_image_tokens(x, torch.as_tensor(kept)[None], image_mask=(ids == image_token_id)[None],
                            tokens_per_image=int((ids == image_token_id).sum()), positions="compact",
                            pad_token_id=pad_token_id, padding_side="left")
    ids_k, pos_k, lab_k = out["input_ids"][0], out["position_ids"][0], out["labels"][0]
    is_img = ids_k == image_token_id
    keep = ~is_img
    keep[is_img] = torch.as_tensor(np.isin(kept, present))
    bias = torch.zeros(len(ids_k))
    if weight:
        bg_kept = int((~covered[kept]).sum())
        bg_present = int((~covered[present]).sum())
        if bg_present and bg_kept > bg_present:
            img_pos = is_img.nonzero().squeeze(1)[np.isin(kept, present)]
            bias[img_pos[torch.as_tensor(~covered[present])]] = math.log(bg_kept / bg_present)
    return ids_k[keep], pos_k[keep], lab_k[keep], bias[keep], torch.as_tensor(present)


def batch_inputs(rows, pad_token_id):
    """Left-pads ``row_inputs`` results: ids, position_ids, labels (R, L), the 4-D additive mask (R, 1, L, L)
    (causal, padding masked, each row's bias on its keys) and ``valid`` (R, L), False at padding."""
    R, L = len(rows), max(len(r[0]) for r in rows)
    ids = torch.full((R, L), pad_token_id)
    pos = torch.zeros((R, L), dtype=torch.long)
    lab = torch.full((R, L), -100)
    bias = torch.zeros((R, L))
    valid = torch.zeros((R, L), dtype=torch.bool)
    for r, (i, p, lb, b, _) in enumerate(rows):
        n = len(i)
        ids[r, L - n:], pos[r, L - n:], lab[r, L - n:], bias[r, L - n:], valid[r, L - n:] = i, p, lb, b, True
    allowed = torch.ones(L, L, dtype=torch.bool).tril()[None] & valid[:, None, :]
    allowed |= torch.eye(L, dtype=torch.bool)[None]  # padded queries attend to themselves (no NaN rows)
    m = torch.where(allowed, 0.0, torch.finfo(torch.float32).min) + bias[:, None, :] * allowed
    return ids, pos, lab, m[:, None], valid


GROUND_WORDS = (*S.COLORS, *S.SHAPES, *S.PLURALS.values(), "card", "big", "background")


def grounding_loss(attentions, layers, ids, image_index, dense, regions, answers, image_token_id):
    """Grounding on head 0 of ``layers`` = (a, b), as :func:`.tiny._grounding_loss` at layers 0 and 1 of the
    v1 model, with the new types' words: layer a, from every colour / shape / "card" / "big" /
    "background" word, the mass on the present patches it names; layer b, from the question's last key word
    the mass on the answer region (count and twins: n/(n+1) on the objects, 1/(n+1) on ``<s>``; relation:
    from each named shape word onto its own object)."""
    v = T.vocab()
    inv = {i: w for w, i in v.items()}
    colors, plural = list(S.COLORS), set(S.PLURALS.values())
    la, lb = layers
    log = lambda x: torch.log(x + 1e-4)  # noqa: E731
    terms = []
    for r in range(len(ids)):
        row = ids[r].tolist()
        img = (ids[r] == image_token_id).nonzero().squeeze(1)
        d = dense[r][:, image_index[r]]
        obj = d[1] < len(S.SHAPES) + 1
        asst = row.index(v["ASSISTANT:"])
        keys = [(p, inv[t]) for p, t in enumerate(row[:asst]) if inv[t] in GROUND_WORDS]
        for p, w in keys:
            if w in plural:
                continue
            reg = (d[0] == colors.index(w) if w in S.COLORS else d[1] == S.SHAPES.index(w) if w in S.SHAPES else
                   d[2] < len(S.DIGITS) if w == "card" else d[4] == 1 if w == "big" else ~obj)
            if reg.any():
                terms.append(-log(attentions[la][r, 0, p, img[reg]].sum()))
        reg = regions[r][image_index[r]]
        if not keys or not reg.any():
            continue
        words = [w for _, w in keys]
        relation = len(words) == 4 and words[0] in S.COLORS and words[2] in S.COLORS and \
            inv.get(row[keys[1][0] + 1]) == "left"
        if relation:
            for (pc, c), (ps, sh) in ((keys[0], keys[1]), (keys[2], keys[3])):  # relation: each object alone
                own = reg & (d[0] == colors.index(c)) & (d[1] == S.SHAPES.index(sh))
                if own.any():
                    terms.append(-log(attentions[lb][r, 0, ps, img[own]].sum()))
            continue
        att = attentions[lb][r, 0, keys[-1][0]]
        if keys[-1][1] in plural:
            n = int(answers[r])
            terms.append(-(n * log(att[img[reg]].sum()) + log(att[row.index(v["<s>"])])) / (n + 1))
        else:
            terms.append(-log(att[img[reg]].sum()))
    if not terms:
        return attentions[0].sum() * 0.0
    return torch.stack(terms).mean()


def balanced_index(pool_qas) -> dict:
    """{(qtype, answer): [(scene, question index), ...]} over a pool's questions (qtype from the question's words)."""
    out: dict = {}
    for i, qas in enumerate(pool_qas):
        for j, (q, a) in enumerate(qas):
            out.setdefault((qtype_of(q), a), []).append((i, j))
    return out


def qtype_of(question: str) -> str:
    """The ShapesVQA type of a question (by its template)."""
    w = question.split()
    for qt, t in S.TEMPLATES.items():
        tw = t.split()
        if len(tw) == len(w) and all("{" in a or a == b for a, b in zip(tw, w)):
            return qt
    raise ValueError(f"not a ShapesVQA question: {question!r}")


def stage2_batch(pool, index, rng, recipe: RecipeV2, weight: bool):
    """One stage-2 batch: a question type (uniform, or by ``recipe.qtype_weight``), an answer uniform among those
    the pool holds for it, then a scene with such a question;
    each row at its own budget (``draw_budget``). Returns the model inputs and the grounding inputs."""
    keys = sorted(index)
    types = sorted({k[0] for k in keys})
    rows, feats, dense, regions, answers = [], [], [], [], []
    v = T.vocab()
    p = None
    if recipe.qtype_weight:
        p = np.array([recipe.qtype_weight.get(t, 1.0) for t in types], dtype=np.float64)
        p = p / p.sum()
    for _ in range(recipe.batch_size):
        qt = types[int(rng.integers(len(types)))] if p is None else types[int(rng.choice(len(types), p=p))]
        ans = [k for k in keys if k[0] == qt]
        key = ans[int(rng.integers(len(ans)))]
        scene, j = index[key][int(rng.integers(len(index[key])))]
        q, a = pool["qas"][scene][j]
        ids, mask, labels = T._rows([(q, a)], key_words=True)
        region = pool["regions"][scene][j].numpy()
        d = pool["dense"][scene].long()
        covered = (d[1] < len(S.SHAPES) + 1).numpy()
        budget = draw_budget(rng, recipe)
        kept, present = row_subsets(rng, region, covered, budget, recipe.image_tokens)
        rows.append(row_inputs(ids[0], mask[0], labels[0], kept, present, covered, v["<image>"], v["<pad>"], weight))
        feats.append(pool["feats"][scene][torch.as_tensor(present)])
        dense.append(d)
        regions.append(torch.as_tensor(region))
        answers.append(a)
    ids, pos, lab, m, _ = batch_inputs(rows, v["<pad>"])
    return dict(ids=ids, pos=pos, labels=lab, mask=m, feats=feats, dense=dense, regions=regions, answers=answers,
                image_index=[r[4] for r in rows])


def stage2_loss(model, b, recipe: RecipeV2):
    proj = model.model.multi_modal_projector
    emb = model.get_input_embeddings()(b["ids"])
    img = b["ids"] == model.config.image_token_id
    tokens = proj(torch.cat(b["feats"]).float())  # rows in order, each row's image tokens in order
    emb = emb.masked_scatter(img[..., None].expand_as(emb), tokens.to(emb.dtype))
    out = model(inputs_embeds=emb, attention_mask=b["mask"], position_ids=b["pos"], labels=b["labels"],
                output_attentions=recipe.grounding > 0)
    if recipe.grounding <= 0:
        return out.loss
    g = grounding_loss(out.attentions, recipe.grounding_layers, b["ids"], b["image_index"], b["dense"],
                       b["regions"], b["answers"], model.config.image_token_id)
    loss = out.loss + recipe.grounding * g
    if recipe.early_image_attention > 0:
        loss = loss + recipe.early_image_attention * early_image_attention(out.attentions, b["ids"], img,
                                                                           recipe.grounding_layers[0])
    return loss


def early_image_attention(attentions, ids, img, first_layer: int) -> torch.Tensor:
    """Mean over layers < ``first_layer``, heads and the text queries after the image of the attention mass on
    image tokens (``img``: (R, L) bool)."""
    after = img.long().cumsum(1).bool() & ~img & (ids != T.vocab()["<pad>"])  # text after the first image token
    terms = [(a * img[:, None, None, :]).sum(-1)[after[:, None, :].expand(-1, a.shape[1], -1)].mean()
             for a in attentions[:first_layer]]
    return torch.stack(terms).mean()


@torch.no_grad()
def feature_pool(model, n_images, questions, seed, progress=True) -> dict:
    """As :func:`.tiny.feature_pool`, over scenes of every type, with the v2 dense targets."""
    from tqdm import tqdm

    feats, dense, qas, regions = [], [], [], []
    for pv, d, _, q, reg in tqdm(_loader(n_images, seed, 32, questions), desc="stage-2 pool",
                                 total=math.ceil(n_images / 32), disable=not progress, leave=False):
        feats.append(T.vision_features(model, pv.to(model.device))[:, 1:].to("cpu", torch.float16))
        dense.append(d.to(torch.int16))
        qas += q
        regions += reg
    return dict(feats=torch.cat(feats), dense=torch.cat(dense), qas=qas, regions=regions)


# ------------------------------------------------------------------------------------------- training


def _save_state(path, **state):
    tmp = Path(str(path) + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def train_v2(out_dir, seed: int = 0, recipe: RecipeV2 = RecipeV2(), progress: bool = True,
             time_budget: float | None = None, stage1_from: str | Path | None = None,
             init_from: str | Path | None = None) -> dict:
    """Train (or resume) the v2 tiny LLaVA into ``out_dir``: model, processor, ``train_log.csv``, ``recipe.json``.
    Resumes from ``out_dir/train_state.pt`` when present (same seed and recipe required). ``time_budget``
    (seconds of this call) stops early after a checkpoint, to be resumed later. With ``stage1_init="v1"`` the
    tower starts from the v1 recipe's stage 1: run here (``tiny.train_tiny`` with no stage-2 steps, into
    ``out_dir/v1_stage1``), or loaded from ``stage1_from`` (a model directory whose tower is that stage's output,
    e.g. the v1 model ``data/tiny-llava-shapes-v1``: its stage 1 is deterministic). ``init_from``: a v2 model whose
    weights (all of them) start stage 2, stage 1 skipped (with ``RecipeV2(finetune=())`` and a short stage 2, a
    fine-tuning run). After stage 2, each ``recipe.finetune`` phase (stage 3, 4, ...). Returns the last validation
    row, or ``{"stopped": ..., "stage", "step"}`` when ``time_budget`` ran out."""
    from tqdm import tqdm
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path = out_dir / "train_state.pt"
    t_start = time.time()
    model = T.build_model(recipe.sizes, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        heads = Stage1Heads(recipe.sizes.vision_hidden)
    rec = asdict(recipe)
    st = torch.load(state_path, weights_only=False) if state_path.exists() else None
    if st is not None:
        if json.dumps(st["recipe"], default=str) != json.dumps(rec, default=str) or st["seed"] != seed:
            raise ValueError(f"{state_path} was written with another recipe or seed; use another out_dir")
        model.load_state_dict(st["model"])
        heads.load_state_dict(st["heads"])
    if st is None and init_from is not None:  # all weights of a v2 model start stage 2
        from transformers import LlavaForConditionalGeneration

        model.load_state_dict(LlavaForConditionalGeneration.from_pretrained(str(init_from)).state_dict())
        st = dict(stage=2, step=0, log=[], seconds=0.0)
    elif st is None and recipe.stage1_init == "v1":
        from transformers import LlavaForConditionalGeneration

        if stage1_from is None:
            stage1_from = out_dir / "v1_stage1"
            if not (stage1_from / "config.json").exists():
                T.train_tiny(stage1_from, seed=seed, device="cpu", progress=progress, stage2_steps=0,
                             stage2_images=32)
        src = LlavaForConditionalGeneration.from_pretrained(str(stage1_from)).model.vision_tower
        model.model.vision_tower.load_state_dict(src.state_dict())
    elif recipe.stage1_init not in ("v1", "scratch"):
        raise ValueError(f"stage1_init must be 'v1' or 'scratch', got {recipe.stage1_init!r}")
    log = st["log"] if st else []
    elapsed0 = st["seconds"] if st else 0.0
    val = S.ShapesVQA("val", n=recipe.eval_n, seed=seed, qtypes=S.ALL_QTYPES)
    val = [val[i] for i in range(len(val))]

    def seconds():
        return round(elapsed0 + time.time() - t_start, 1)

    def write_log():
        keys = list(dict.fromkeys(k for r in log for k in r))
        with open(out_dir / "train_log.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(log)

    def make_opt(params, lr, total, r):
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=r.weight_decay, betas=(0.9, 0.98))
        sched = (get_constant_schedule_with_warmup(opt, r.warmup_steps) if total is None else
                 get_cosine_schedule_with_warmup(opt, r.warmup_steps, total))
        return opt, sched

    def step_(opt, sched, params, loss):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()

    out_of_time = lambda: time_budget is not None and time.time() - t_start > time_budget  # noqa: E731
    tower = model.model.vision_tower
    # ---- stage 1
    stage, step = (st["stage"], st["step"]) if st else (1, 0)
    if stage == 1:
        params = list(tower.parameters()) + list(heads.parameters())
        opt, sched = make_opt(params, recipe.stage1_lr, None, recipe)
        if st:
            opt.load_state_dict(st["opt"])
            sched.load_state_dict(st["sched"])
        model.train()
        total = math.ceil(recipe.stage1_samples / recipe.stage1_batch_size)
        bar = tqdm(total=total, initial=step, unit="step", desc="stage 1 (tower)", disable=not progress)
        ema = st.get("ema") if st else None
        for pv, dense, present, _, _ in _loader(recipe.stage1_samples, seed * 1000 + 10, recipe.stage1_batch_size,
                                                start=step * recipe.stage1_batch_size):
            loss = stage1_loss(model, heads, pv, dense, present)
            step_(opt, sched, params, loss)
            step += 1
            ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{ema:.3f}")
            if step % recipe.log_every == 0:
                log.append(dict(stage=1, step=step, seconds=seconds(), loss=round(ema, 4)))
            if step % recipe.checkpoint_every == 0 and step < total:
                _save_state(state_path, recipe=rec, seed=seed, stage=1, step=step, model=model.state_dict(),
                            heads=heads.state_dict(), opt=opt.state_dict(), sched=sched.state_dict(), log=log,
                            ema=ema, seconds=seconds())
                write_log()
                if out_of_time():
                    bar.close()
                    return {"stopped": "time budget", "stage": 1, "step": step}
        bar.close()
        probe = T._collate([_Scenes(64, seed * 1000 + 99)[i] for i in range(64)])
        model.eval()
        log.append(dict(stage=1, step=step, seconds=seconds(), loss=round(ema, 4),
                        **{f"patch_{k}": round(v, 4) for k, v in stage1_accuracy(model, heads, probe).items()}))
        stage, step, st = 2, 0, None
        _save_state(state_path, recipe=rec, seed=seed, stage=2, step=0, model=model.state_dict(),
                    heads=heads.state_dict(), log=log, seconds=seconds())
        write_log()
    # ---- stage 2, then each fine-tuning phase (stage 3, 4, ...): the same loop, a fresh optimiser and pool each
    phases = phase_recipes(recipe)
    tower.requires_grad_(False)
    params = [p for n_, p in model.named_parameters() if not n_.startswith("model.vision_tower")]
    while stage - 2 < len(phases):
        r = phases[stage - 2]
        model.eval()
        model.set_attn_implementation("sdpa")
        pool = feature_pool(model, r.stage2_images, r.stage2_questions, seed * 1000 + 20, progress)
        index = balanced_index(pool["qas"])
        opt, sched = make_opt(params, r.stage2_lr, r.stage2_steps, r)
        # every phase draws its rows from the same seeded stream, as a separate fine-tuning run (init_from) would
        rng = np.random.default_rng([seed, 2])
        ema = None
        if st is not None and st.get("opt") is not None:
            opt.load_state_dict(st["opt"])
            sched.load_state_dict(st["sched"])
            rng.bit_generator.state = st["rng"]
            ema = st.get("ema")
        model.set_attn_implementation("eager")
        model.train()
        desc = "stage 2 (LLaVA)" if stage == 2 else f"stage {stage} (fine-tune {stage - 2}/{len(phases) - 1})"
        bar = tqdm(total=r.stage2_steps, initial=step, unit="step", desc=desc, disable=not progress)
        while step < r.stage2_steps:
            weight = step >= r.background_weight_from * r.stage2_steps
            b = stage2_batch(pool, index, rng, r, weight)
            loss = stage2_loss(model, b, r)
            step_(opt, sched, params, loss)
            step += 1
            ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
            bar.update(1)
            row = None
            if step % recipe.log_every == 0:
                row = dict(stage=stage, step=step, seconds=seconds(), loss=round(ema, 4))
            if step % r.eval_every == 0 or step == r.stage2_steps:
                model.eval()
                model.set_attn_implementation("sdpa")
                row = dict(stage=stage, step=step, seconds=seconds(), loss=round(ema, 4),
                           **{f"val_{k}": round(v, 4) for k, v in T.accuracy(model, val).items()})
                model.set_attn_implementation("eager")
                model.train()
                bar.set_postfix(loss=f"{ema:.3f}", val=row["val_overall"])
            if row:
                log.append(row)
            if step % recipe.checkpoint_every == 0 and step < r.stage2_steps:
                _save_state(state_path, recipe=rec, seed=seed, stage=stage, step=step, model=model.state_dict(),
                            heads=heads.state_dict(), opt=opt.state_dict(), sched=sched.state_dict(),
                            rng=rng.bit_generator.state, log=log, ema=ema, seconds=seconds())
                write_log()
                if out_of_time():
                    bar.close()
                    return {"stopped": "time budget", "stage": stage, "step": step}
        bar.close()
        stage, step, st = stage + 1, 0, None
        model.set_attn_implementation("sdpa")
        if stage - 2 < len(phases):  # the next phase starts from here on a resume
            _save_state(state_path, recipe=rec, seed=seed, stage=stage, step=0, model=model.state_dict(),
                        heads=heads.state_dict(), log=log, seconds=seconds())
            write_log()
            if out_of_time():
                return {"stopped": "time budget", "stage": stage, "step": 0}
    tower.requires_grad_(True)
    model.eval()
    model.save_pretrained(out_dir)
    T.build_processor().save_pretrained(out_dir)
    write_log()
    info = dict(recipe=rec, seed=seed, device="cpu", seconds=seconds(), torch=torch.__version__, final_val=log[-1])
    (out_dir / "recipe.json").write_text(json.dumps(info, indent=1, default=str))
    state_path.unlink(missing_ok=True)
    return log[-1]
