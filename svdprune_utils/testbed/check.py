"""``testbed-check``: does accuracy under pruning measure the selection on a model? (issue 16's properties)

A testbed model for token pruning must answer from the image tokens a method keeps, and from nothing else.
The check measures five properties on ShapesVQA questions (any split, any seed), every pruned prompt going
through the patch's own apply path (:func:`~svdprune_utils.hf.patch.patch_llava`; greedy first token):

=============  ============================================================  =====================================
property       what is run                                                   passes when
=============  ============================================================  =====================================
``full``       all image tokens                                              overall >= ``FULL_MIN`` and every
                                                                             question type >= ``TYPE_MIN``
``drop_one``   ``svd`` keeping N - 1 tokens (one dropped, positions          within ``DROP_ONE_TOL`` of ``full``
               compacted)
``oracle``     the answer region + a seeded random fill to each of           within ``ORACLE_TOL`` of ``full`` on
               ``ORACLE_BUDGETS`` (a stored selection, ``kept=``; the fill   the same questions at every budget,
               is nested: a larger budget keeps a superset), compacted;      and monotone: no budget more than
               on the questions whose region fits the smallest budget        ``MONOTONE_SLACK`` below a smaller one
``random``     ``RANDOM_BUDGET`` tokens drawn uniformly per question (seeded     within ``RANDOM_TOL`` of chance on the
               by seed and index), compacted                                 local question types (global types,
                                                                             answerable from any tokens by design,
                                                                             are reported apart)
``fastv``      ``fastv`` keeping one image token after decoder layer         within ``FASTV_TOL`` of chance
               ``FASTV_LAYER`` (original positions, its official rule)
=============  ============================================================  =====================================

Chance is the mean over the questions of 1 / (number of answers of the question's type)
(:func:`~svdprune_utils.testbed.shapes.chance_accuracy`: answers are uniform by construction).

The default 400 questions per seed give 40 per type of ten: the per-type threshold needs them, since with 18 per
type (180 questions) one question moves a type's accuracy by 0.056 and the threshold measures the draw.
"""
from __future__ import annotations

import json
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..analysis.evaluate import model_inputs
from ..hf.patch import patch_llava, unpatch_llava
from ..hf.prune import tokens_per_image
from . import shapes as S

FULL_MIN, TYPE_MIN = 0.96, 0.90
DROP_ONE_TOL = 0.02
ORACLE_BUDGETS = (16, 32, 64, 128, 192)
ORACLE_TOL = 0.03
MONOTONE_SLACK = 0.01  # one question in a hundred: a larger budget may not lose more than this
RANDOM_BUDGET, RANDOM_TOL = 16, 0.10
FASTV_LAYER, FASTV_TOL = 2, 0.15


def oracle_kept(mask: np.ndarray, budget: int, rng_seed: Sequence[int]) -> np.ndarray:
    """Ascending token indices: every patch of the answer region ``mask`` (24×24 or flat bool) plus the first
    ``budget - |region|`` patches of a random permutation of the others, drawn from
    ``np.random.default_rng(rng_seed)`` — the same permutation at every budget, so a larger budget keeps a
    superset. Raises ValueError when the region does not fit the budget or the budget exceeds the tokens."""
    m = np.asarray(mask, dtype=bool).reshape(-1)
    region = np.flatnonzero(m)
    if not 0 < budget <= m.size:
        raise ValueError(f"budget must be in 1..{m.size}, got {budget}")
    if region.size > budget:
        raise ValueError(f"the answer region ({region.size} tokens) does not fit a budget of {budget}")
    rest = np.flatnonzero(~m)
    fill = rest[np.random.default_rng(list(rng_seed)).permutation(rest.size)[:budget - region.size]]
    return np.sort(np.concatenate([region, fill]))


@torch.inference_mode()
def _answers(model, processor, items, prompt, batch_size, patch=None, kept_of=None) -> list[str]:
    """Greedy first-token answers for ``items``; ``patch``: patch_llava kwargs (None: unpatched); ``kept_of``:
    items -> (B, K) stored selection per batch (passed as ``kept=``)."""
    out = []
    for s in range(0, len(items), batch_size):
        batch = items[s:s + batch_size]
        x = model_inputs(model, processor, batch, prompt)
        if patch is not None:
            kw = dict(patch)
            if kept_of is not None:
                kw["kept"] = kept_of(batch)
            patch_llava(model, **kw)
        try:
            gen = model.generate(**x, max_new_tokens=1, do_sample=False)
        finally:
            if patch is not None:
                unpatch_llava(model)
        out += [t.strip() for t in processor.batch_decode(gen[:, x["input_ids"].shape[1]:], skip_special_tokens=True)]
    return out


def _close(a: float, b: float, tol: float) -> bool:
    """|a - b| <= tol, up to rounding (0.98 is within 0.02 of 1.0)."""
    return bool(abs(a - b) <= tol + 1e-9)


def monotone(accs: Sequence[float], slack: float = MONOTONE_SLACK) -> bool:
    """No accuracy more than ``slack`` below one at a smaller budget (``accs`` in increasing budget order)."""
    return bool(all(accs[j] >= accs[i] - slack - 1e-9 for i in range(len(accs)) for j in range(i + 1, len(accs))))


def full_passes(acc: dict) -> bool:
    """Overall >= FULL_MIN and every question type >= TYPE_MIN (``acc``: :func:`_acc`'s dict)."""
    return bool(acc["overall"] >= FULL_MIN - 1e-9 and all(acc[q] >= TYPE_MIN - 1e-9 for q in acc if q in S.ALL_QTYPES))


def _acc(pred, items, which=None) -> dict:
    """{"overall": acc, "n": count, <qtype>: acc, ...} over the items selected by bool list ``which``."""
    which = [True] * len(items) if which is None else which
    ok = [p == it["answer"] for p, it, w in zip(pred, items, which) if w]
    qt = [it["qtype"] for it, w in zip(items, which) if w]
    res = {"overall": float(np.mean(ok)) if ok else float("nan"), "n": len(ok)}
    for q in dict.fromkeys(qt):
        res[q] = float(np.mean([o for o, t in zip(ok, qt) if t == q]))
    return res


def _chance(items) -> float:
    return float(np.mean([1.0 / len(S.ANSWERS[it["qtype"]]) for it in items])) if items else float("nan")


def readable_qtypes(processor) -> tuple:
    """``shapes.ALL_QTYPES`` when the processor's tokenizer knows every word of the new types' questions and
    answers, else the original ``shapes.QTYPES`` (the v1 model, data/tiny-llava-shapes-v1)."""
    tok = getattr(processor, "tokenizer", processor)
    words = set(S.question_vocab(S.ALL_QTYPES) + S.answer_vocab(S.ALL_QTYPES))
    unk = tok.unk_token_id
    known = all(tok.convert_tokens_to_ids(w) not in (None, unk) for w in words)
    return S.ALL_QTYPES if known else S.QTYPES


def check_seed(model, processor, seed: int = 0, n: int = 400, split: str = "test", *, prompt: str | None = None,
               batch_size: int = 32, progress: bool = True, qtypes=None) -> dict:
    """The five properties on ``n`` balanced ShapesVQA questions of ``split`` drawn with ``seed`` (see the module
    docstring), of the types ``qtypes`` (None: every type the model's vocabulary reads, :func:`readable_qtypes`);
    returns a dict of measurements and ``passed`` flags per property, and under ``questions`` every
    question's answer and prediction per property (``oracle_<budget>``: None where its region does not fit)."""
    from .tiny import PROMPT

    prompt = prompt or PROMPT
    N = tokens_per_image(model)
    items = [it for it in S.ShapesVQA(split, n=n, seed=seed, qtypes=qtypes or readable_qtypes(processor))]
    bar = tqdm(total=4 + len(ORACLE_BUDGETS), desc=f"testbed-check seed {seed}", disable=not progress)

    def run(**kw):
        pred = _answers(model, processor, items, prompt, batch_size, **kw)
        bar.update()
        return pred

    preds = {}
    full_pred = run()
    full = _acc(full_pred, items)
    res = {"seed": seed, "split": split, "n": len(items), "tokens": N, "full": full}
    res["full"]["passed"] = full_passes(full)

    drop_pred = run(patch=dict(method="svd", budget=N - 1, positions="compact"))
    drop = _acc(drop_pred, items)
    drop["passed"] = _close(drop["overall"], full["overall"], DROP_ONE_TOL)
    res["drop_one"] = drop

    fits = [int(np.asarray(it["mask"]).sum()) <= min(ORACLE_BUDGETS) for it in items]
    sub = [it for it, f in zip(items, fits) if f]
    sub_full = _acc([p for p, f in zip(full_pred, fits) if f], sub)
    oracle = {"n": len(sub), "excluded": len(items) - len(sub), "full": sub_full["overall"], "budgets": {}}
    for b in ORACLE_BUDGETS:
        def kept_of(batch, b=b):
            return torch.as_tensor(np.stack([oracle_kept(it["mask"], b, [seed, it["index"]]) for it in batch]))
        pred = _answers(model, processor, sub, prompt, batch_size,
                        patch=dict(method="svd", budget=b, positions="compact"), kept_of=kept_of)
        bar.update()
        oracle["budgets"][b] = _acc(pred, sub)
        preds[f"oracle_{b}"] = [None if not f else pred[sum(fits[:i])] for i, f in enumerate(fits)]
    accs = [oracle["budgets"][b]["overall"] for b in ORACLE_BUDGETS]
    oracle["within"] = all(_close(a, sub_full["overall"], ORACLE_TOL) for a in accs)
    oracle["monotone"] = monotone(accs)
    oracle["passed"] = oracle["within"] and oracle["monotone"]
    res["oracle"] = oracle

    def random_of(batch):  # a fresh uniform subset per question, seeded by (seed, index)
        return torch.as_tensor(np.stack([oracle_kept(np.zeros(N, bool), RANDOM_BUDGET, [seed, it["index"], 1])
                                         for it in batch]))
    rand_pred = run(patch=dict(method="random", budget=RANDOM_BUDGET, positions="compact"), kept_of=random_of)
    local = [it["qtype"] not in S.GLOBAL_QTYPES for it in items]
    rnd = _acc(rand_pred, items, local)
    rnd["chance"] = _chance([it for it, w in zip(items, local) if w])
    rnd["passed"] = _close(rnd["overall"], rnd["chance"], RANDOM_TOL)
    if not all(local):
        glob = [not w for w in local]
        rnd["global"] = _acc(rand_pred, items, glob)
        rnd["global"]["chance"] = _chance([it for it, g in zip(items, glob) if g])
    res["random"] = rnd

    fv_pred = run(patch=dict(method="fastv", budget=1, fastv_layer=FASTV_LAYER))
    fv = _acc(fv_pred, items)
    fv["chance"] = _chance(items)
    fv["passed"] = _close(fv["overall"], fv["chance"], FASTV_TOL)
    res["fastv"] = fv
    bar.close()
    preds.update(full=full_pred, drop_one=drop_pred, random=rand_pred, fastv=fv_pred)
    res["questions"] = [{"index": it["index"], "qtype": it["qtype"], "answer": it["answer"],
                         **{k: v[i] for k, v in preds.items()}} for i, it in enumerate(items)]
    res["passed"] = all(res[k]["passed"] for k in ("full", "drop_one", "oracle", "random", "fastv"))
    return res


def testbed_check(model, processor, seeds: Sequence[int] = (0,), n: int = 400, split: str = "test", **kw) -> list:
    """:func:`check_seed` for every seed (a list of its dicts)."""
    return [check_seed(model, processor, seed, n, split, **kw) for seed in seeds]


def _types(d: dict) -> str:
    return ", ".join(f"{q} {v:.2f}" for q, v in d.items() if q in S.ALL_QTYPES)


def report(results: Sequence[dict]) -> str:
    """A plain-text table of :func:`testbed_check`'s results: one block per seed, PASS/FAIL per property."""
    ok = {True: "PASS", False: "FAIL"}
    lines = []
    for r in results:
        f, d, o, ra, fv = (r[k] for k in ("full", "drop_one", "oracle", "random", "fastv"))
        w = 30
        lines += [
            f"seed {r['seed']} ({r['split']}, {r['n']} questions, {r['tokens']} image tokens)",
            f"  {'full (' + str(r['tokens']) + ' tokens)':<{w}}{f['overall']:.3f}  {ok[f['passed']]}  "
            f"(>= {FULL_MIN}, every type >= {TYPE_MIN}: {_types(f)})",
            f"  {'drop one (' + str(r['tokens'] - 1) + ' kept, svd)':<{w}}{d['overall']:.3f}  {ok[d['passed']]}  "
            f"(within {DROP_ONE_TOL} of full)",
            f"  {'oracle ' + '/'.join(map(str, ORACLE_BUDGETS)):<{w}}"
            + "/".join(f"{o['budgets'][b]['overall']:.3f}" for b in ORACLE_BUDGETS)
            + f"  {ok[o['passed']]}  (full {o['full']:.3f} on the {o['n']} questions whose region fits "
              f"{min(ORACLE_BUDGETS)} tokens; within {ORACLE_TOL}: {'yes' if o['within'] else 'no'}, "
              f"monotone: {'yes' if o['monotone'] else 'no'})",
            f"  {'random ' + str(RANDOM_BUDGET):<{w}}{ra['overall']:.3f}  {ok[ra['passed']]}  "
            f"(chance {ra['chance']:.3f} on the local types, within {RANDOM_TOL})"
            + (f"; global types {ra['global']['overall']:.3f} (chance {ra['global']['chance']:.3f})"
               if "global" in ra else ""),
            f"  {'fastv 1 token after layer ' + str(FASTV_LAYER):<{w}}{fv['overall']:.3f}  {ok[fv['passed']]}  "
            f"(chance {fv['chance']:.3f}, within {FASTV_TOL})",
        ]
    lines.append("all properties hold" if all(r["passed"] for r in results) else "some properties fail")
    return "\n".join(lines)


def to_json(results: Sequence[dict]) -> str:
    return json.dumps(list(results), indent=1, default=float)
