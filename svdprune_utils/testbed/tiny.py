"""The embedded tiny LLaVA: config, offline tokenizer/processor, training recipe and loading.

The model is a real ``LlavaForConditionalGeneration`` (CLIP vision tower with a CLS token →
2-layer MLP projector → Llama decoder with RoPE), saved with ``save_pretrained`` so that
``LlavaForConditionalGeneration.from_pretrained(path)`` and ``AutoProcessor.from_pretrained(path)``
load it offline — the code path of ``llava-hf/llava-1.5-7b-hf``.

Recipe (``train_tiny``), after FACTS.md "Training the embedded tiny LLaVA":

1. *Vision pre-training* (our stand-in for CLIP pre-training): the tower alone, with dense per-patch
   targets read at ``vision_feature_layer`` (-2; colour, shape, card digit and object-centre of the
   object covering the patch, and the patch's quadrant) and a multi-label CLS head (which
   colour–shape pairs are present) on the CLS token at layer -2 and on the pooled last layer.
2. *LLaVA-style alignment*: tower frozen, projector + language model trained on one-question ShapesVQA
   prompts with the answer (and end-of-sequence) tokens as targets. The tower's features of a pool of
   ``Recipe.stage2_images`` scenes are computed once (``feature_pool``); each step takes
   ``Recipe.batch_size`` distinct scenes of the pool with one of their ``Recipe.stage2_questions``
   questions each (its own and ``shapes.extra_turns``). Also: the answer as a target at the question's
   last key word (``_key_word_labels``), a grounding loss on two attention heads (``_grounding_loss``:
   question words → the patches they name; the count query → the objects and ``<s>``), cosine lr after
   warmup, and training-time token dropping (``Recipe.image_tokens``: every object patch + random
   background patches, at their full-sequence positions), for the last 40 % of the steps with each kept
   background token standing for the dropped ones in the attention (``_background_mask``), so that the
   model answers on all 576 tokens as it does on the 32 it is trained on.

The from-scratch decoder needs the grounding loss: without it, it learns the one lookup that does not
depend on the question's words (the card's digit) and stays on the answer prior for all others
(data/README.md has the measurements). A pretrained LLM brings that skill; this one learns it here.

``data/tiny-llava-shapes-v1`` is this recipe's output (seed 0, 46 min on 2 CPU cores; the embedded model until
the v2 recipe, :mod:`.train_v2`, replaced it): test accuracy 0.998 at 576 tokens, 0.29 with 16 random tokens
(chance 0.30); data/README.md has the curve, the runs that led to the recipe and the license. Its stage 1 is the
start of the v2 recipe's.
"""
from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from ..hf.inputs import LLAVA_PROMPT, keep_image_tokens
from . import shapes as S

NAME = "tiny-llava-shapes"
DEFAULT_PATH = Path(__file__).resolve().parents[2] / "data" / NAME  # the embedded model (v2 recipe, train_v2.py)
V1_PATH = Path(__file__).resolve().parents[2] / "data" / f"{NAME}-v1"  # this module's recipe, kept for provenance
TRAIN_PATH = Path(__file__).resolve().parents[2] / "out" / NAME  # train_tiny's default: never the shipped model
PROMPT = LLAVA_PROMPT
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def auto_device(device: str = "auto") -> torch.device:
    """CUDA when present (for "auto"), else CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


# ------------------------------------------------------------------------- tokenizer / processor


def vocab() -> dict[str, int]:
    """Word-level vocabulary: specials, prompt words, question words, answers of ``shapes.QTYPES``, then the words
    only ``shapes.NEW_QTYPES`` use (appended, so that every original word keeps the id the v1 model reads)."""
    words = SPECIAL + ["USER:", "ASSISTANT:"] + S.question_vocab() + S.answer_vocab()
    words += S.question_vocab(S.ALL_QTYPES) + S.answer_vocab(S.ALL_QTYPES)
    out: dict[str, int] = {}
    for w in words:
        out.setdefault(w, len(out))
    return out


def build_tokenizer():
    """Offline ``PreTrainedTokenizerFast``: WordLevel model, whitespace split, ``<s>`` prepended."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    v = vocab()
    tok = Tokenizer(models.WordLevel(vocab=v, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", v["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left",
        model_max_length=1024)


def build_processor():
    """``LlavaProcessor`` = word-level tokenizer + ``CLIPImageProcessorPil`` (336 px, CLIP mean/std);
    ``<image>`` expands to 576 placeholders (patch 14, +1 for CLS, "default" strategy drops it)."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    ip = CLIPImageProcessorPil(size={"shortest_edge": S.IMAGE_SIZE},
                               crop_size={"height": S.IMAGE_SIZE, "width": S.IMAGE_SIZE},
                               image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    return LlavaProcessor(image_processor=ip, tokenizer=build_tokenizer(), patch_size=S.PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def prompt(question: str) -> str:
    return PROMPT.format(question=question)


# ------------------------------------------------------------------------------------ model config


@dataclass
class TinySizes:
    """Model sizes. ``vision_layers`` counts the whole tower; the LM reads layer -2."""

    vision_hidden: int = 64
    vision_layers: int = 4
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 3  # FastV's default K = 2 then has a layer after it
    text_heads: int = 2  # head dim 64: 8 rotary pairs turn < 0.6 rad over 576 tokens (content matching)


def build_config(sizes: TinySizes = TinySizes()):
    """``LlavaConfig``: CLIP tower (336 px, patch 14, CLS) → MLP projector → Llama (RoPE)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    v = vocab()
    vc = CLIPVisionConfig(hidden_size=sizes.vision_hidden, intermediate_size=4 * sizes.vision_hidden,
                          num_hidden_layers=sizes.vision_layers, num_attention_heads=sizes.vision_heads,
                          image_size=S.IMAGE_SIZE, patch_size=S.PATCH, projection_dim=sizes.vision_hidden,
                          hidden_act="quick_gelu")
    tc = LlamaConfig(vocab_size=len(v), hidden_size=sizes.text_hidden,
                     intermediate_size=4 * sizes.text_hidden, num_hidden_layers=sizes.text_layers,
                     num_attention_heads=sizes.text_heads, num_key_value_heads=sizes.text_heads,
                     max_position_embeddings=1024, rope_theta=10000.0, pad_token_id=v["<pad>"],
                     bos_token_id=v["<s>"], eos_token_id=v["</s>"], tie_word_embeddings=False)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=v["<image>"],
                      image_seq_length=S.GRID ** 2, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu")
    cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = v["<pad>"], v["<s>"], v["</s>"]
    return cfg


def build_model(sizes: TinySizes = TinySizes(), seed: int = 0):
    """A freshly initialised tiny LLaVA; the init draws from a forked, seeded torch RNG."""
    from transformers import LlavaForConditionalGeneration

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(build_config(sizes))
        # Word embeddings at unit scale: with HF's 0.02 init a word's identity is ~0.2 in norm, swamped
        # by what the first layer adds from 576 image tokens (projected features have norm ~20), so
        # later layers cannot tell which object the question names (a pretrained LLM has O(1) embeddings).
        torch.nn.init.normal_(model.get_input_embeddings().weight, std=1.0)
    model.generation_config.pad_token_id = model.config.pad_token_id
    model.generation_config.eos_token_id = model.config.eos_token_id
    return model


def load_tiny(path: str | Path = DEFAULT_PATH, device: str = "cpu"):
    """(model, processor) from ``path`` (default: the embedded ``data/tiny-llava-shapes``), offline, eval mode."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(str(path)).to(auto_device(device)).eval()
    return model, AutoProcessor.from_pretrained(str(path))


# --------------------------------------------------------------------------------- fast encoding


def pixel_values(images) -> torch.Tensor:
    """(B, 3, 336, 336) float32, equal to the processor's output for 336×336 images."""
    x = torch.as_tensor(np.stack([np.asarray(im, dtype=np.float32) for im in images])) / 255.0
    x = (x - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    return x.permute(0, 3, 1, 2).contiguous()


def _prompt_head(v: dict, question: str, n_image: int | None) -> list[int]:
    """Ids of "USER: [<image> x n_image] {question} ASSISTANT:" (no image run when ``n_image`` is None)."""
    return [v["USER:"]] + [v["<image>"]] * (n_image or 0) + [v[w] for w in question.split()] + [v["ASSISTANT:"]]


def _left_pad(rows: list[list[int]], fill: int) -> torch.Tensor:
    """(B, L) long tensor of the id lists ``rows`` right-aligned, ``fill`` on their left (as the processor pads)."""
    return pad_sequence([torch.tensor(r, dtype=torch.long) for r in rows], batch_first=True, padding_value=fill,
                        padding_side="left")


def encode_ids(questions, answers=None, n_image: int = S.GRID ** 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (input_ids, attention_mask) of the prompts (+ " answer </s>" when given), the
    same ids the processor gives; ``n_image`` image placeholders (576 by default)."""
    v = vocab()
    seqs = [[v["<s>"]] + _prompt_head(v, q, n_image) + ([] if answers is None else [v[answers[i]], v["</s>"]])
            for i, q in enumerate(questions)]
    return _left_pad(seqs, v["<pad>"]), _left_pad([[1] * len(r) for r in seqs], 0)


def encode_turns(dialogues, n_image: int = S.GRID ** 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded (input_ids, attention_mask, labels) of multi-turn dialogues about one image
    each: ``dialogues[i]`` is a list of (question, answer); the first turn is the LLaVA prompt
    "USER: <image>\\n{q} ASSISTANT: {a} </s>", later turns "USER: {q} ASSISTANT: {a} </s>" (the
    LLaVA-1.5 conversation format). ``labels`` is -100 except on each answer word and its </s>.
    A one-turn dialogue gives exactly ``encode_ids([q], [a])``."""
    v = vocab()
    seqs, labs = [], []
    for turns in dialogues:
        if not turns:
            raise ValueError("every dialogue needs at least one (question, answer) turn")
        ids, lab = [v["<s>"]], [-100]
        for t, (q, a) in enumerate(turns):
            head = _prompt_head(v, q, n_image if t == 0 else None)
            ids += head + [v[a], v["</s>"]]
            lab += [-100] * len(head) + [v[a], v["</s>"]]
        seqs.append(ids)
        labs.append(lab)
    return _left_pad(seqs, v["<pad>"]), _left_pad([[1] * len(r) for r in seqs], 0), _left_pad(labs, -100)


def vision_features(model, pv: torch.Tensor) -> torch.Tensor:
    """(B, 577, d) = the tower's ``hidden_states[vision_feature_layer]`` (CLS first), computed
    without the layers after it (equal to what ``LlavaModel.get_image_features`` selects)."""
    vt = model.model.vision_tower
    vt = getattr(vt, "vision_model", vt)
    layers = vt.encoder.layers
    n = (len(layers) + 1 + model.config.vision_feature_layer) % (len(layers) + 1)
    h = vt.pre_layrnorm(vt.embeddings(pv))
    for layer in layers[:n]:
        h = layer(h, None)
        h = h[0] if isinstance(h, tuple) else h
    return h


def embed_inputs(model, ids: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
    """``inputs_embeds`` with the projected ``image_tokens`` (B, K, d_text) scattered, in order,
    into the K ``<image>`` placeholders of each row of ``ids``."""
    emb = model.get_input_embeddings()(ids)
    where = (ids == model.config.image_token_id).unsqueeze(-1).expand_as(emb)
    return emb.masked_scatter(where, image_tokens.to(emb.dtype))


@torch.no_grad()
def answer(model, images, questions, budget: int | None = None, seed: int = 0,
           batch_size: int = 32) -> list[str]:
    """Greedy answers (the first generated token, = ``generate(max_new_tokens=1)``).

    ``budget=None`` keeps all 576 image tokens; ``budget=K`` keeps K patch tokens drawn uniformly
    at random (``np.random.default_rng([seed, i])`` for question i, kept in raster order) — the
    "random" baseline; the K kept tokens take contiguous positions."""
    inv = {i: w for w, i in vocab().items()}
    dev = model.device
    out = []
    for b in range(0, len(questions), batch_size):
        qs = questions[b:b + batch_size]
        pv = pixel_values(images[b:b + batch_size]).to(dev)
        feats = model.model.multi_modal_projector(vision_features(model, pv)[:, 1:])
        k = feats.shape[1] if budget is None else budget
        if budget is not None:
            keep = torch.stack([torch.as_tensor(np.sort(np.random.default_rng([seed, b + i]).choice(
                feats.shape[1], budget, replace=False))) for i in range(len(qs))]).to(dev)
            feats = torch.gather(feats, 1, keep[..., None].expand(-1, -1, feats.shape[-1]))
        ids, mask = encode_ids(qs, n_image=k)
        emb = embed_inputs(model, ids.to(dev), feats)
        logits = model(inputs_embeds=emb, attention_mask=mask.to(dev), logits_to_keep=1).logits[:, -1]
        out += [inv[int(i)] for i in logits.argmax(-1)]
    return out


def accuracy(model, samples, budget: int | None = None, seed: int = 0, batch_size: int = 32) -> dict[str, float]:
    """Accuracy overall and per question type of greedy ``answer``s on ``samples`` (a ShapesVQA
    dataset or a list of its items)."""
    samples = [samples[i] for i in range(len(samples))]
    pred = answer(model, [s["image"] for s in samples], [s["question"] for s in samples], budget, seed,
                  batch_size)
    return _per_type([p == s["answer"] for p, s in zip(pred, samples)], [s["qtype"] for s in samples])


def _per_type(correct, qtypes) -> dict[str, float]:
    """Mean of the bools ``correct`` per question type present in ``qtypes`` (in ``QTYPES`` order), and "overall"."""
    ok, qt = np.asarray(correct, dtype=bool), np.asarray(qtypes)
    res = {q: float(ok[qt == q].mean()) for q in S.ALL_QTYPES if (qt == q).any()}
    res["overall"] = float(ok.mean())
    return res


# ------------------------------------------------------------------------------------- training


@dataclass
class Recipe:
    """The training recipe (all knobs of ``train_tiny``); written to ``recipe.json``."""

    sizes: TinySizes = field(default_factory=TinySizes)
    stage1_samples: int = 10_000
    stage1_batch_size: int = 16
    stage1_lr: float = 3e-3
    # stage 2 trains on a pool of rendered scenes whose (frozen) tower features are computed once
    stage2_images: int = 12_000  # scenes in the pool
    stage2_questions: int = 10  # questions per pooled scene: its own + shapes.extra_turns
    stage2_steps: int = 15_000
    batch_size: int = 32  # stage 2 rows per step: distinct scenes of the pool, one random question each
    stage2_lr: float = 1e-3
    stage2_schedule: str = "cosine"  # stage-2 lr after warmup: "cosine" (to 0 at the last step) or "constant"
    grounding: float = 1.0  # weight of the grounding loss on two attention heads (see _grounding_loss); 0 = off
    key_word_labels: bool = True  # the answer is also the target at the question's last key word (_key_word_labels)
    warmup_steps: int = 100
    weight_decay: float = 0.01
    # stage 2 token dropping: every object/card patch plus random background patches up to this many image
    # tokens, at their full-sequence positions (see _thin_image_tokens); None = all 576. 576-token rows with the
    # grounding loss cost 50x more on 2 cores (5.7 s per step); validation runs on all 576
    image_tokens: int | None = 32
    # from this fraction of the stage-2 steps on, thinned rows attend as if all background patches were there
    # (_background_mask); 1.0 = never. Quadrant is learned without it, count and 576-token answers with it
    background_weight_from: float = 0.6
    log_every: int = 50  # steps between loss rows in train_log.csv
    eval_every: int = 1_000  # stage-2 steps between validation rows (stage 1: patch accuracy at the end)
    eval_n: int = 180  # validation questions (balanced over the types)


class _Encoded(torch.utils.data.Dataset):
    """ShapesVQA items → training tensors (runs in DataLoader workers): pixel values, dense per-patch
    targets, the present colour-shape pairs, and ``questions`` (question, answer) pairs about the image
    (the sample's own first, then ``shapes.extra_turns``) with their answer regions (questions, 576)."""

    def __init__(self, ds, questions: int = 1):
        self.ds, self.questions = ds, questions

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        s = self.ds[i]
        cov, objs = s["coverage"], s["objects"]
        best, val = cov.argmax(0), cov.max(0) >= 0.1
        colors, shapes_ = list(S.COLORS), list(S.SHAPES)
        col = np.full((S.GRID, S.GRID), len(colors) + 1)  # background
        shp = np.full((S.GRID, S.GRID), len(shapes_) + 1)
        dig = np.full((S.GRID, S.GRID), len(S.DIGITS))  # "no digit"
        ctr = np.zeros((S.GRID, S.GRID), dtype=np.int64)
        present = np.zeros(len(colors) * len(shapes_), dtype=np.float32)
        for k, o in enumerate(objs):
            m = val & (best == k)
            x0, y0, x1, y1 = o["box"]
            ctr[min(int((y0 + y1) / 2 // S.PATCH), S.GRID - 1), min(int((x0 + x1) / 2 // S.PATCH), S.GRID - 1)] = 1
            if o["kind"] == "card":
                col[m], shp[m], dig[m] = len(colors), len(shapes_), S.DIGITS.index(o["digit"])
            else:
                ci, si = colors.index(o["color"]), shapes_.index(o["shape"])
                col[m], shp[m] = ci, si
                present[si * len(colors) + ci] = 1
        dense = np.stack([col, shp, dig, ctr]).reshape(4, -1)
        pv = pixel_values([s["image"]])[0]
        qas = [(s["question"], s["answer"])]
        if self.questions > 1:
            rng = np.random.default_rng([self.ds.seed, S.SPLIT_IDS[self.ds.split], i, 1])
            qas += S.extra_turns(s, rng, self.questions - 1)
        regions = np.stack([S.question_region(objs, cov, q).reshape(-1) for q, _ in qas])
        return pv, torch.as_tensor(dense), torch.as_tensor(present), qas, torch.as_tensor(regions)


KEY_WORDS = (*S.COLORS, *S.SHAPES, *S.PLURALS.values(), "card")
"""Question words that name what to look for (stage-2 key-word labels and grounding queries)."""


def _key_word_labels(ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``labels`` (one-question prompts) with the answer also as the target of the question's last key word
    (colour, shape, plural or "card"): the output of the grounded lookup at that word is then one layer
    from a loss (see ``_grounding_loss``). Generation never reads that position."""
    v = vocab()
    key = torch.tensor([v[w] for w in KEY_WORDS])
    out = labels.clone()
    for r in range(len(ids)):
        asst = int((ids[r] == v["ASSISTANT:"]).nonzero()[0])
        where = torch.isin(ids[r, :asst], key).nonzero()
        if len(where):
            out[r, int(where[-1]) + 1] = ids[r, asst + 1]  # the label at t+1 is what position t predicts
    return out


def _collate(batch):
    """(pixel values (B, 3, 336, 336), dense (B, 4, 576), present (B, 20), the (question, answer)
    lists, answer regions (list of (Q_i, 576) bool)) of ``_Encoded`` items."""
    pv, dense, present, qas, regions = zip(*batch)
    return torch.stack(pv), torch.stack(dense), torch.stack(present), list(qas), list(regions)


def _rows(qas, key_words: bool = False):
    """input_ids, attention_mask, labels (R, L) of one-question prompts ``qas`` [(question, answer), ...]
    (576 image placeholders each), with ``_key_word_labels`` when ``key_words``."""
    ids, mask, labels = encode_turns([[qa] for qa in qas])
    return ids, mask, _key_word_labels(ids, labels) if key_words else labels


class _Stage1Heads(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.dense = nn.Linear(d, (len(S.COLORS) + 2) + (len(S.SHAPES) + 2) + (len(S.DIGITS) + 1) + 2 + 4)
        self.cls = nn.Linear(d, len(S.COLORS) * len(S.SHAPES))
        self.splits = [len(S.COLORS) + 2, len(S.SHAPES) + 2, len(S.DIGITS) + 1, 2, 4]


def _quadrant_targets(device):
    r = torch.arange(S.GRID, device=device)
    return ((r[:, None] >= S.GRID // 2) * 2 + (r[None, :] >= S.GRID // 2)).reshape(-1)


def _covered(dense: torch.Tensor) -> torch.Tensor:
    """(B, N) bool: patches a coloured object or the card covers (the shape target is not "background")."""
    return dense[:, 1] < len(S.SHAPES) + 1


def _stage1_loss(model, heads, pv, dense, present):
    tower = model.model.vision_tower
    out = tower(pixel_values=pv, output_hidden_states=True)
    h = out.hidden_states[model.config.vision_feature_layer]
    logits = heads.dense(heads.norm(h[:, 1:])).split(heads.splits, dim=-1)
    targets = list(dense.unbind(1)) + [_quadrant_targets(pv.device).expand(len(pv), -1)]
    w = 1.0 + 4.0 * _covered(dense).float()  # object patches are rare; weight them up
    loss = sum(((F.cross_entropy(lg.transpose(1, 2), t, reduction="none") * w).sum() / w.sum())
               for lg, t in zip(logits, targets))
    cls = heads.cls(heads.norm(h[:, 0])), heads.cls(out.pooler_output)
    loss = loss + sum(F.binary_cross_entropy_with_logits(c, present) for c in cls)
    return loss


@torch.no_grad()
def stage1_accuracy(model, heads, batch) -> dict[str, float]:
    """Per-patch accuracy of the stage-1 heads on object patches (colour, shape, quadrant) and on
    card patches (digit), for a collated ``_Encoded`` batch."""
    pv, dense = batch[0], batch[1]
    h = vision_features(model, pv.to(model.device))[:, 1:]
    logits = heads.dense(heads.norm(h)).split(heads.splits, dim=-1)
    dense = dense.to(h.device)
    obj, card = dense[:, 1] < len(S.SHAPES), dense[:, 2] < len(S.DIGITS)
    quad = _quadrant_targets(h.device).expand(len(pv), -1)
    hit = [(lg.argmax(-1) == t) for lg, t in zip(logits, list(dense.unbind(1)) + [quad])]
    return dict(color=hit[0][obj].float().mean().item(), shape=hit[1][obj].float().mean().item(),
                digit=hit[2][card].float().mean().item(), quadrant=hit[4][obj].float().mean().item())


def _keep_image_tokens(ids, mask, kept, image_token_id, labels=None):
    """Rows of left-padded one-image prompts with only the image placeholders of the patches ``kept``
    ((B, K) ascending patch indices; every row keeps K), every token at the position it has in the full
    sequence (so RoPE distances are those of the 576-token prompt): the library's one apply step,
    :func:`svdprune_utils.hf.inputs.keep_image_tokens` with ``positions="original"``. Returns (ids, mask,
    position_ids) or, with ``labels``, (ids, mask, position_ids, labels), each (B, L - 576 + K)."""
    N = int((ids[0] == image_token_id).sum())
    x = {"input_ids": ids, "attention_mask": mask} if labels is None else \
        {"input_ids": ids, "attention_mask": mask, "labels": labels}
    out = keep_image_tokens(x, kept, image_mask=ids == image_token_id, tokens_per_image=N, positions="original",
                            pad_token_id=vocab()["<pad>"], padding_side="left")
    res = (out["input_ids"], out["attention_mask"], out["position_ids"])
    return res if labels is None else (*res, out["labels"])


def _thin_image_tokens(ids, mask, labels, dense, image_token_id, n_keep, generator):
    """Training-time token dropping (stage 2): keep every patch an object or the card covers and
    random background patches up to ``n_keep`` image tokens per row, drop the other placeholders,
    and give every kept token the position it has in the full sequence (``_keep_image_tokens``).
    Returns (ids, mask, labels, position_ids, kept patch indices (B, n_keep))."""
    B, N = dense.shape[0], dense.shape[-1]
    noise = torch.rand(B, N, generator=generator).to(dense.device)
    kept = (noise + 2.0 * _covered(dense).float()).topk(n_keep, dim=1).indices.sort(dim=1).values
    ids, mask, pos, labels = _keep_image_tokens(ids, mask, kept, image_token_id, labels)
    return ids, mask, labels, pos, kept


def _grounding_loss(attentions, ids, dense, regions, kept, image_token_id) -> torch.Tensor:
    """Grounding loss on two attention heads (head 0 of layers 0 and 1), rows = single-question prompts.

    Layer 0: from each colour / shape / "card" word of the question, the attention mass on the patches
    that word names (all red patches for "red", all circles for "circle", the card for "card").
    Layer 1: from the question's last such word, the mass on the question's answer region (the red
    circle of "is there a red circle ?"). For a count question ("how many circles are there ?", answer n)
    the target of that query is a distribution: n/(n+1) on the objects and 1/(n+1) on the ``<s>`` token, so
    the share left on ``<s>`` says how many there are (softmax attention alone averages, it does not count).
    The loss is the mean over these queries of the cross-entropy -log(mass) (-Σ target·log(mass) for
    count). Without it the from-scratch decoder stays on the answer prior for every question whose lookup
    depends on a word (data/README.md); a pretrained LLM brings that skill, ours learns it here."""
    v = vocab()
    inv = {i: w for w, i in v.items()}
    colors, plural = list(S.COLORS), set(S.PLURALS.values())
    log = lambda x: torch.log(x + 1e-4)  # noqa: E731
    terms = []
    for r in range(len(ids)):
        row = ids[r].tolist()
        img = (ids[r] == image_token_id).nonzero().squeeze(1)
        d = dense[r][:, kept[r]]
        asst = row.index(v["ASSISTANT:"])
        keys = [(p, inv[t]) for p, t in enumerate(row[:asst]) if inv[t] in KEY_WORDS]
        for p, w in keys:
            if w in plural:  # the plural is grounded at layer 1 only (below)
                continue
            reg = d[0] == colors.index(w) if w in S.COLORS else \
                d[1] == S.SHAPES.index(w) if w in S.SHAPES else d[2] < len(S.DIGITS)
            if reg.any():
                terms.append(-log(attentions[0][r, 0, p, img[reg]].sum()))
        reg = regions[r][kept[r]]
        if len(attentions) < 2 or not keys or not reg.any():
            continue
        att = attentions[1][r, 0, keys[-1][0]]
        if keys[-1][1] in plural:
            n = int(inv[row[asst + 1]])
            terms.append(-(n * log(att[img[reg]].sum()) + log(att[row.index(v["<s>"])])) / (n + 1))
        else:
            terms.append(-log(att[img[reg]].sum()))
    if not terms:
        return attentions[0].sum() * 0.0
    return torch.stack(terms).mean()


def _background_mask(ids, mask, dense, kept, image_token_id, dtype=torch.float32) -> torch.Tensor:
    """4-D additive attention mask (R, 1, L, L) for thinned rows: causal + padding, and ``log(w)`` added on
    every kept background image token, ``w`` = the image's background patches / the background tokens kept.
    Softmax then sees each kept background token as ``w`` like it, so the attention a query gives the
    background (and the rest) is what it would be with all 576 tokens present: trained on 32 tokens
    without it, the model attends to a background 17x larger at 576 tokens than in training and loses
    count, digit and colour answers it gives on 32 (data/README.md)."""
    R, L = ids.shape
    kept_bg = ~_covered(dense.gather(2, kept[:, None].expand(-1, dense.shape[1], -1)))  # (R, K)
    bg_full = (~_covered(dense)).sum(1)  # (R,)
    w = torch.log(bg_full.clamp_min(1).float() / kept_bg.sum(1).clamp_min(1).float())  # (R,)
    is_bg = torch.zeros(R, L, dtype=torch.bool, device=ids.device)
    is_bg[ids == image_token_id] = kept_bg.reshape(-1)
    allowed = torch.ones(L, L, dtype=torch.bool, device=ids.device).tril()[None] & mask.bool()[:, None, :]
    out = torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)
    out = out + (is_bg.to(dtype) * w[:, None])[:, None, :] * allowed
    return out[:, None]


def _stage2_loss(model, feats, dense, ids, mask, labels, regions, grounding=0.0, n_keep=None, generator=None,
                 background_weight=False):
    """Stage-2 loss of one batch of one-question prompts: the answer tokens' cross-entropy (+ ``grounding``
    x ``_grounding_loss``; needs the eager attention). ``feats`` (R, 576, d) are each row's tower features
    (``vision_features`` without CLS), ``dense`` (R, 4, 576) its image's patch targets, ``regions`` (R, 576)
    its question's answer region; ``n_keep`` image tokens per row (``_thin_image_tokens``), None = all;
    ``background_weight``: thinned rows attend through ``_background_mask``."""
    pos, kept = None, torch.arange(feats.shape[1], device=feats.device).expand(len(ids), -1)
    attn = None
    if n_keep is not None and n_keep < feats.shape[1]:
        ids, mask, labels, pos, kept = _thin_image_tokens(ids, mask, labels, dense, model.config.image_token_id,
                                                          n_keep, generator)
        feats = feats.gather(1, kept[..., None].expand(-1, -1, feats.shape[-1]))
        if background_weight:
            attn = _background_mask(ids, mask, dense, kept, model.config.image_token_id)
    emb = embed_inputs(model, ids, model.model.multi_modal_projector(feats.float()))
    out = model(inputs_embeds=emb, attention_mask=mask if attn is None else attn, position_ids=pos, labels=labels,
                output_attentions=grounding > 0)
    if grounding > 0:
        return out.loss + grounding * _grounding_loss(out.attentions, ids, dense, regions, kept,
                                                      model.config.image_token_id)
    return out.loss


def _loader(n, seed, batch_size, workers, questions=1):
    """Batches of ``_Encoded`` train scenes (full ShapesVQA config) rendered in ``workers`` processes."""
    ds = _Encoded(S.ShapesVQA("train", n=n, seed=seed, balanced=False), questions)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=_collate, num_workers=workers,
                                       persistent_workers=False, prefetch_factor=4 if workers else None)


@torch.no_grad()
def feature_pool(model, n_images: int, questions: int, seed: int, workers: int = 0, batch_size: int = 32,
                 progress: bool = True) -> dict:
    """Stage-2 training pool: ``n_images`` rendered train scenes (stream ``seed``) with their frozen tower
    features computed once. Returns ``feats`` (n, 576, d) float16 (``vision_features`` without CLS),
    ``dense`` (n, 4, 576) patch targets, ``qas`` (per scene: up to ``questions`` (question, answer) pairs,
    its own first, then ``shapes.extra_turns``) and ``regions`` (per scene: (Q, 576) bool answer regions).
    Memory: n x 576 x d x 2 bytes (590 MB for 8000 scenes at d = 64)."""
    from tqdm import tqdm

    dev = model.device
    feats, dense, qas, regions = [], [], [], []
    for pv, d, _, q, reg in tqdm(_loader(n_images, seed, batch_size, workers, questions), desc="stage-2 pool",
                                 total=math.ceil(n_images / batch_size), disable=not progress, leave=False):
        feats.append(vision_features(model, pv.to(dev))[:, 1:].to("cpu", torch.float16))
        dense.append(d.to(torch.int16))
        qas += q
        regions += reg
    return dict(feats=torch.cat(feats), dense=torch.cat(dense), qas=qas, regions=regions)


def _pool_batch(pool, rng: np.random.Generator, batch_size: int, key_words: bool, device):
    """``batch_size`` distinct scenes of ``pool`` drawn by ``rng``, one random question of each: the
    arguments of ``_stage2_loss`` after ``model`` (features, dense, ids, mask, labels, regions)."""
    scenes = rng.choice(len(pool["qas"]), batch_size, replace=False)
    pick = [int(rng.integers(len(pool["qas"][i]))) for i in scenes]
    ids, mask, labels = _rows([pool["qas"][i][q] for i, q in zip(scenes, pick)], key_words)
    regions = torch.stack([pool["regions"][i][q] for i, q in zip(scenes, pick)])
    t = torch.as_tensor(scenes)
    return [x.to(device) for x in (pool["feats"][t], pool["dense"][t].long(), ids, mask, labels, regions)]


def _write_log(path, log):
    keys = list(dict.fromkeys(k for r in log for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(log)


def train_tiny(out_dir: str | Path = TRAIN_PATH, seed: int = 0, device: str = "auto",
               recipe: Recipe = Recipe(), time_budget: float | None = None, workers: int = 0,
               progress: bool = True, stage1_from: str | Path | None = None, **overrides) -> dict:
    """Train the tiny LLaVA from scratch (``recipe``, with ``overrides`` of its fields) and save
    model + processor + ``train_log.csv`` + ``recipe.json`` to ``out_dir``.

    Stage 1 trains the tower on ``stage1_samples`` scenes; stage 2 renders a pool of ``stage2_images``
    scenes, computes their tower features once (``feature_pool``) and runs ``stage2_steps`` steps of
    ``batch_size`` distinct scenes x one question. ``time_budget`` (seconds, optional) ends stage 2's steps
    early once the whole run has taken that long. ``stage1_from`` (a directory this function wrote earlier
    with the same recipe sizes) skips stage 1: its vision tower and its stage-1 log rows are reused (stage 1
    is deterministic for a given seed). Returns the final validation accuracy dict. Deterministic for a
    given (seed, device); ``workers`` (scene-rendering processes) does not change the result.
    """
    from tqdm import tqdm

    recipe = replace(recipe, **overrides) if overrides else recipe
    if not 1 <= recipe.batch_size <= recipe.stage2_images:
        raise ValueError(f"stage 2 draws batch_size={recipe.batch_size} distinct scenes per step from a pool of "
                         f"stage2_images={recipe.stage2_images}: need 1 <= batch_size <= stage2_images")
    if recipe.stage2_schedule not in ("cosine", "constant"):
        raise ValueError(f"stage2_schedule must be 'cosine' or 'constant', got {recipe.stage2_schedule!r}")
    if not 0.0 <= recipe.background_weight_from <= 1.0:
        raise ValueError(f"background_weight_from is a fraction of the stage-2 steps in [0, 1], got "
                         f"{recipe.background_weight_from}")
    if recipe.stage2_questions < 1:
        raise ValueError(f"stage2_questions must be >= 1, got {recipe.stage2_questions}")
    dev = auto_device(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(recipe.sizes, seed).to(dev)
    build_processor().save_pretrained(out_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        heads = _Stage1Heads(recipe.sizes.vision_hidden).to(dev)
    val = S.ShapesVQA("val", n=recipe.eval_n, seed=seed)
    val = [val[i] for i in range(len(val))]
    log, t0 = [], time.time()

    def record(stage, step, seen, loss, evaluate):
        row = dict(stage=stage, step=step, samples=seen, seconds=round(time.time() - t0, 1), loss=round(loss, 4))
        if evaluate and stage == 1:  # per-patch accuracy of the tower on 64 validation images
            probe = _collate([_Encoded(S.ShapesVQA("val", n=64, seed=seed, balanced=False))[i] for i in range(64)])
            model.eval()
            row.update({f"patch_{k}": round(v, 4) for k, v in stage1_accuracy(model, heads, probe).items()})
            model.train()
        elif evaluate:
            model.eval()
            row.update({f"val_{k}": round(v, 4) for k, v in accuracy(model, val).items()})
            if dev.type == "cpu":  # checkpoint: a stopped run still leaves a loadable model
                model.save_pretrained(out_dir)
            model.train()
        log.append(row)
        _write_log(out_dir / "train_log.csv", log)
        return row

    def step_(opt, params, loss):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.schedule.step()

    def optimizer(params, lr, total=None):
        """AdamW with transformers' linear warmup, then constant (``total`` None) or cosine decay to 0 at ``total``."""
        from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

        opt = torch.optim.AdamW(params, lr=lr, weight_decay=recipe.weight_decay, betas=(0.9, 0.98))
        opt.schedule = (get_constant_schedule_with_warmup(opt, recipe.warmup_steps) if total is None else
                        get_cosine_schedule_with_warmup(opt, recipe.warmup_steps, total))
        return opt

    # Stage 1: vision tower alone, dense per-patch + CLS targets.
    tower = model.model.vision_tower
    model.train()
    if stage1_from is not None:  # reuse the tower of an earlier run's stage 1 (same recipe and seed)
        from transformers import LlavaForConditionalGeneration

        tower.load_state_dict(LlavaForConditionalGeneration.from_pretrained(str(stage1_from)).model.vision_tower.state_dict())
        prev = Path(stage1_from) / "train_log.csv"
        if prev.exists():
            with open(prev) as f:
                log.extend(r for r in csv.DictReader(f) if r["stage"] == "1")
    else:
        params = list(tower.parameters()) + list(heads.parameters())
        opt = optimizer(params, recipe.stage1_lr)
        step, seen, ema = 0, 0, None
        bar = tqdm(total=recipe.stage1_samples, unit="scene", desc="stage 1 (tower)", disable=not progress)
        for batch in _loader(recipe.stage1_samples, seed * 1000 + 10, recipe.stage1_batch_size, workers):
            pv, dense, present = (t.to(dev, non_blocking=True) for t in batch[:3])
            loss = _stage1_loss(model, heads, pv, dense, present)
            step_(opt, params, loss)
            step, seen = step + 1, seen + len(pv)
            ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
            bar.update(len(pv))
            bar.set_postfix(loss=f"{ema:.3f}")
            if step % recipe.log_every == 0:
                record(1, step, seen, ema, evaluate=False)
        bar.close()
        record(1, step, seen, ema, evaluate=True)

    # Stage 2: LLaVA alignment on a pool of frozen tower features; projector + language model trained.
    tower.requires_grad_(False)
    model.eval()
    pool = feature_pool(model, recipe.stage2_images, recipe.stage2_questions, seed * 1000 + 20, workers,
                        progress=progress)
    model.train()
    params = [p for n_, p in model.named_parameters() if not n_.startswith("model.vision_tower")]
    opt = optimizer(params, recipe.stage2_lr, recipe.stage2_steps if recipe.stage2_schedule == "cosine" else None)
    rng = np.random.default_rng([seed, 2])  # scenes and questions of each step
    gen = torch.Generator().manual_seed(seed + 2)  # background patches kept while token dropping
    if recipe.grounding > 0:  # the grounding loss reads attention probabilities
        model.set_attn_implementation("eager")
    ema, step = None, 0
    bar = tqdm(total=recipe.stage2_steps, unit="step", desc="stage 2 (LLaVA)", disable=not progress)
    for step in range(1, recipe.stage2_steps + 1):
        batch = _pool_batch(pool, rng, recipe.batch_size, recipe.key_word_labels, dev)
        loss = _stage2_loss(model, *batch, grounding=recipe.grounding, n_keep=recipe.image_tokens, generator=gen,
                            background_weight=step > recipe.background_weight_from * recipe.stage2_steps)
        step_(opt, params, loss)
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.update(1)
        last = step == recipe.stage2_steps or (time_budget is not None and time.time() - t0 > time_budget)
        if step % recipe.log_every == 0 or step % recipe.eval_every == 0 or last:
            row = record(2, step, step * recipe.batch_size, ema, evaluate=step % recipe.eval_every == 0 or last)
            bar.set_postfix(loss=f"{ema:.3f}", val=row.get("val_overall", ""))
        if last:
            break
    bar.close()
    if step == 0:  # stage2_steps = 0: validate the untrained language model
        record(2, 0, 0, float("nan"), evaluate=True)
    tower.requires_grad_(True)
    model.set_attn_implementation("sdpa")

    model.eval().to("cpu")
    model.save_pretrained(out_dir)
    build_processor().save_pretrained(out_dir)
    _write_log(out_dir / "train_log.csv", log)
    info = dict(recipe=asdict(recipe), seed=seed, device=str(dev), workers=workers,
                seconds=round(time.time() - t0, 1), torch=torch.__version__, final_val=log[-1])
    (out_dir / "recipe.json").write_text(json.dumps(info, indent=1, default=str))
    return {k[4:]: v for k, v in log[-1].items() if k.startswith("val_")}


def evaluate_tiny(path: str | Path = V1_PATH, n_test: int = 600, seed: int = 0,
                  budgets=(None, 64, 16), write: bool = True) -> dict:
    """Test-split accuracy of the model at ``path`` (greedy first token, fast path) at full 576
    tokens and with K random tokens per ``budgets``, plus ``slice200``: the first 200 test
    questions through the processor + HF forward (the slice a shipped model is tested on). Writes
    ``eval.json`` next to the weights when ``write``."""
    model, proc = load_tiny(path, "cpu")
    ds = S.ShapesVQA("test", n=n_test, seed=seed)
    items = [ds[i] for i in range(len(ds))]
    out = {"test_n": n_test, "seed": seed, "method": "greedy first token (argmax of the next-token logits)"}
    for b in budgets:
        out["576" if b is None else f"random{b}"] = accuracy(model, items, budget=b, seed=seed)
    pred = []
    with torch.no_grad():
        for b in range(0, min(200, len(items)), 50):
            batch = items[b:b + 50]
            inp = proc(images=[s["image"] for s in batch], text=[prompt(s["question"]) for s in batch],
                       return_tensors="pt", padding=True)
            pred += proc.batch_decode(model(**inp, logits_to_keep=1).logits[:, -1].argmax(-1)[:, None])
    out["slice200"] = _per_type([p == s["answer"] for p, s in zip(pred, items)], [s["qtype"] for s in items[:200]])
    out["chance"] = S.chance_accuracy()
    if write:
        (Path(path) / "eval.json").write_text(json.dumps(out, indent=1))
    return out
