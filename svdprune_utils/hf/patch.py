"""Plug-and-play visual-token pruning for Hugging Face ``LlavaForConditionalGeneration``.

    patch_llava(model, method="svd", budget=64)   # any key of SELECTORS or REDUCERS; "fastv", "sparsevlm": in the LLM
    out = model.generate(**processor(images=..., text=..., return_tensors="pt", padding=True))
    model.svdprune.budget = 32                    # knobs are plain attributes, read at every call
    model.svdprune.kept_indices                   # (n_images, K) kept patch indices of the last call
    patch_llava(model, kept=stored_indices)       # replay a stored selection exactly
    p = prune_inputs(model, **inputs)             # the inputs the LLM sees, for hand-written loops
    unpatch_llava(model)                          # back to the original, bit for bit

Tested with transformers 5.24 (LLaVA-1.5 layout: CLIP or SigLIP tower, Llama decoder). Nothing in
transformers is edited: ``model.forward`` and ``model.generate`` become instance attributes (bound methods
of this module, so ``copy.deepcopy`` gives a copy that runs itself), forward pre-hooks on the decoder layers
serve the in-LLM methods (FastV, SparseVLM: :mod:`.fastv`); all of it is listed in ``model.svdprune`` and
removed by :func:`unpatch_llava`.

Pre-LLM methods (every method but "fastv" and "sparsevlm"), for a call that carries images (``pixel_values``, or
``mm_encoder_outputs`` with N tokens per image):

1. compute: the tower runs once (``model.model.get_image_features``); each image's N tokens are scored
   (``feature="vision"``: the ``vision_feature_layer`` patch features as the strategy selects them;
   ``"projected"``: after the projector; by default each method's own, ``selectors.FEATURE_DEFAULTS``), the
   method's other signals are computed from the same call (:mod:`.signals`: the tower's CLS attention and keys,
   cdpruner's instruction relevance) and ``reduce_tokens`` gives K = min(budget, N) output tokens per image:
   kept positions (n_images, K), ascending, and, for a merging method (VisionZip), their merged features;
2. apply (both steps in :mod:`.prune`): :func:`svdprune_utils.hf.inputs.keep_image_tokens` cuts each run of N
   placeholders to K in ``input_ids``/``inputs_embeds``/``attention_mask``/``position_ids``/``labels``
   (rows re-padded on their side) and the K tokens' projected features (the kept ones', or the projector
   applied to the merged ones) go to the model as ``mm_encoder_outputs``.

Positions (``positions``; None: the method's own, ``prune.default_positions``): "compact" (pre-LLM default, as
the official pre-LLM LLaVA implementations: the kept tokens and the text after them get consecutive positions,
which transformers derives from the shortened mask) or "original" (every kept token keeps the position it had in
the full prompt, as FastV's and SparseVLM v2.0's official code do). With "original" the patch passes
``position_ids`` (the full prompt's ``attention_mask.cumsum(-1) - 1`` at the kept columns) to the model;
``generate`` numbers each new token from the last prompt column (its own rule: ``position_ids[:, -1] + 1``),
so the first new token of a row sits at that row's full prompt length, as if nothing had been dropped; a
continued cache is cut from the caller's whole sequence and mask, so it keeps that numbering; a forward call
continuing a cache without ``position_ids`` gets them from the cache's record (``CutRecord.next_position``).
FastV and SparseVLM cut inside the LLM after transformers has numbered the full sequence: they implement
"original" only, and ``positions="compact"`` with either raises ValueError.

``generate`` keeps its whole contract: it returns the caller's prompt (N placeholders per image) followed
by the new tokens; ``max_length``/``min_length`` count the caller's prompt; a streamer first receives the
caller's prompt; the returned cache can be continued with ``generate(sequences, past_key_values=...)``.
``forward`` returns logits (and the loss) over the sequence the LLM processed.
"""

from __future__ import annotations

import copy
import inspect
import numbers
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LlavaForConditionalGeneration
from transformers.cache_utils import Cache

from ..core.reduction import REDUCERS, check_signals
from ..core.selection import SELECTORS
from ..core.validate import check_budget
from .families import family_name, family_of
from .fastv import FastVCall, fastv_pre_hook
from .inputs import POSITIONS
from .signals import CLS_HEADS, USER_RELEVANCE
from .prune import (
    CACHE_CUT,
    CACHE_FASTV,
    IN_LLM,
    Pruned,
    cache_of,
    image_token_mask,
    known_methods,
    prune_call,
    tokens_per_image,
)

__all__ = ["PruneState", "Pruned", "patch_llava", "patch_model", "unpatch_llava", "unpatch_model", "prune_inputs",
           "tokens_per_image", "image_token_mask"]

_FEATURES = ("vision", "projected")


@dataclass
class PruneState:
    """Everything a patch holds (``model.svdprune``). Public fields may be changed between calls.

    method: a key of ``SELECTORS`` or ``REDUCERS`` ("fastv" prunes at LLM layer ``fastv_layer``, all others
    before the LLM), or "sparsevlm" (inside the LLM at several layers); budget: K tokens kept per image (>= N keeps
    all; for sparsevlm the average image tokens per decoder layer, its official budget: :mod:`.sparsevlm`);
    feature: "vision" or "projected" (what pre-LLM selectors score; None: the method's default,
    ``selectors.default_feature``); selector_kwargs: extra signals for ``reduce_tokens`` (``rank``,
    ``center``, ``seed``, ...); kept: None, or a stored (n_images, K) selection replayed instead of
    selecting; kept_indices: LongTensor (n_images, K) of kept patch indices (raster order, 0..N-1) of the
    last call that saw images, images in batch order (for VisionZip: each output token's position, a
    contextual token at its target patch; for SparseVLM, those that reach its last stage). positions:
    "compact", "original" or None (the method's own: ``prune.default_positions``); "fastv" and "sparsevlm"
    implement "original" only. scope ("image" or "tile") and newlines ("drop" or "keep"): LLaVA-NeXT's budget
    and newline rules (:mod:`.families`); other families take the defaults only. For LLaVA-NeXT and Qwen2.5-VL,
    whose images differ in length, ``kept_indices`` (and ``kept``) is a list with one 1-D LongTensor per image:
    kept offsets into that image's run of placeholders.
    """

    method: str
    budget: int
    feature: str | None = None
    fastv_layer: int = 2
    positions: str | None = None
    selector_kwargs: dict = field(default_factory=dict)
    kept: torch.Tensor | None = None
    kept_indices: torch.Tensor | None = None
    _originals: dict = field(default_factory=dict, repr=False)  # name -> (had_own, value) on the model
    _handles: list = field(default_factory=list, repr=False)
    _in_generate: bool = field(default=False, repr=False)
    _call: FastVCall | None = field(default=None, repr=False)
    _fastv_prompt: tuple | None = field(default=None, repr=False)  # (stages, P) of a no-cache generate
    _n: int = field(default=0, repr=False)  # tokens per image of the current FastV call
    _last_index: torch.Tensor | None = field(default=None, repr=False)  # (B, L) caller columns of the last cut
    _signals_checked: tuple | None = field(default=None, repr=False)  # the (method, selector_kwargs) last checked
    scope: str = "image"
    newlines: str = "drop"


def _lm_layers(model):
    return model.model.language_model.layers


def _check(model, state: PruneState) -> None:
    """Validate the knobs (at patch time and at every call, since they are plain attributes)."""
    fam = family_of(model)
    if fam is not None:
        return _check_family(model, state, fam)
    if (state.scope, state.newlines) != ("image", "drop"):
        raise ValueError("scope and newlines are LLaVA-NeXT's knobs (anyres tiles and newline tokens); a "
                         f"{type(model).__name__} takes scope='image', newlines='drop' only")
    _check_common(model, state)
    if state.method == "sparsevlm" and state.budget < tokens_per_image(model):
        from .sparsevlm import schedule

        schedule(state.budget, len(_lm_layers(model)), tokens_per_image(model))  # raises for an unreachable budget
    if state.kept is not None:
        k = state.kept
        if not isinstance(k, torch.Tensor) or k.ndim != 2 or k.is_floating_point() or k.dtype == torch.bool:
            raise ValueError("kept must be an integer LongTensor (n_images, K), e.g. model.svdprune.kept_indices")
        n = tokens_per_image(model)
        if k.numel() == 0 or int(k.min()) < 0 or int(k.max()) >= n or bool((k.diff(dim=1) <= 0).any()):
            raise ValueError(f"kept must hold strictly ascending patch indices in [0, {n}) per image (row)")
        state.budget = int(k.shape[1])


def _check_family(model, state: PruneState, fam) -> None:
    """The knobs of a LLaVA-NeXT or Qwen2.5-VL patch (images of different lengths)."""
    name = type(model).__name__
    if state.positions is not None and state.positions not in fam.positions:
        raise ValueError(f"{name} supports positions in {fam.positions} (Qwen: the kept tokens keep their 3-D "
                         f"rotary positions), got {state.positions!r}")
    if state.scope not in ("image", "tile") or state.newlines not in ("drop", "keep"):
        raise ValueError(f"scope must be 'image' or 'tile' and newlines 'drop' or 'keep', got {state.scope!r}, "
                         f"{state.newlines!r}")
    if fam.name != "llava_next" and (state.scope, state.newlines) != ("image", "drop"):
        raise ValueError(f"scope and newlines are LLaVA-NeXT's knobs (anyres tiles, newline tokens); {name} takes "
                         "scope='image', newlines='drop' only")
    given = sorted(k for k in USER_RELEVANCE if k in state.selector_kwargs)
    if given:
        raise ValueError(f"{given}: per-token signals cannot be given for {name} (its images differ in length); "
                         "cdpruner computes its instruction relevance from the call")
    _check_common(model, state)
    if state.method in CLS_HEADS and state.kept is None and not fam.has_cls:
        raise ValueError(f"{state.method} needs the vision tower's CLS attention; {name}'s tower has no CLS token: "
                         "use a method that does not read it (svd, divprune, cdpruner, ...)")
    if state.kept is not None:
        k = state.kept
        rows = list(k) if isinstance(k, (list, tuple)) or (isinstance(k, torch.Tensor) and k.ndim == 2) else None
        if rows is None or not rows:
            raise ValueError("kept must be a list of 1-D integer index tensors, one per image (e.g. "
                             "model.svdprune.kept_indices)")
        for i, r in enumerate(rows):
            r = torch.as_tensor(r)
            if r.ndim != 1 or r.numel() == 0 or r.is_floating_point() or r.dtype == torch.bool \
                    or int(r.min()) < 0 or bool((r.diff() <= 0).any()):
                raise ValueError(f"kept[{i}] must hold strictly ascending non-negative offsets into image {i}'s "
                                 "placeholders")


def _check_common(model, state: PruneState) -> None:
    if state.method not in known_methods():
        raise ValueError(f"unknown method {state.method!r}; registered: {sorted(SELECTORS)}, "
                         f"merging: {sorted(REDUCERS)}, inside the LLM: {sorted(IN_LLM)}")
    ratio = isinstance(state.budget, numbers.Real) and not isinstance(state.budget, numbers.Integral)
    if family_of(model) is not None and ratio:  # a ratio of each image's tokens
        if not 0.0 < float(state.budget) <= 1.0:
            raise ValueError(f"a float budget is a ratio of each image's tokens in (0, 1], got {state.budget}")
        state.budget = float(state.budget)
    else:
        state.budget = check_budget(state.budget)
    if state.feature is not None and state.feature not in _FEATURES:
        raise ValueError(f"feature must be one of {_FEATURES} (or None: the method's default), got {state.feature!r}")
    if state.positions is not None and state.positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS} or None (the method's own), got {state.positions!r}")
    if state.method in IN_LLM and state.positions == "compact":
        raise ValueError(f"{state.method} implements positions='original' only (it cuts inside the LLM, after the "
                         "full sequence is numbered; its official code keeps the kept tokens' position ids): use "
                         "positions='original' or None")
    n_layers = len(_lm_layers(model))
    if state.method == "fastv" and (isinstance(state.fastv_layer, bool) or not isinstance(state.fastv_layer, int)):
        raise ValueError(f"fastv_layer must be an int in [1, {n_layers - 1}], got {state.fastv_layer!r}")
    if state.method == "fastv" and not 1 <= state.fastv_layer < n_layers:
        raise ValueError(f"fastv_layer must be in [1, {n_layers - 1}], got {state.fastv_layer}")
    if state.method in IN_LLM and state.selector_kwargs:
        raise ValueError(f"{state.method} takes no selector signals (it reads the LLM's attention); got "
                         f"{sorted(state.selector_kwargs)}")
    if state.method not in IN_LLM:  # a typo fails here, not only at a call that prunes
        key = (state.method, tuple((k, type(v), v if isinstance(v, (bool, int, float, str, type(None))) else id(v))
                                   for k, v in sorted(state.selector_kwargs.items())))
        if key != state._signals_checked:  # once per setting, not at every decode step
            check_signals(state.method, state.selector_kwargs)
            state._signals_checked = key
    if state.kept is not None:
        if state.method == "sparsevlm":
            raise ValueError("kept replays one cut, and sparsevlm cuts at several layers: patch with method='fastv' "
                             "(one cut inside the LLM) or a pre-LLM selector to replay a kept set")
        if state.method in REDUCERS:
            raise ValueError(f"kept replays a selection, and {state.method} merges tokens (kept cannot describe "
                             "its merged features): patch with a selector (e.g. method='random', kept=...) to "
                             "keep those positions unmerged")


def _bind(fn, args, kwargs) -> dict:
    """Positional + keyword arguments of ``fn`` as one flat keyword dict."""
    sig = inspect.signature(fn)
    bound = sig.bind_partial(*args, **kwargs).arguments
    var_kw = [p.name for p in sig.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
    extra = bound.pop(var_kw[0], {}) if var_kw else {}
    return {**bound, **extra}


def prune_inputs(model, **inputs) -> Pruned:
    """The inputs the language model sees under the patch (``model.svdprune``'s method and budget), for a
    hand-written loop: ``p = prune_inputs(model, **inputs)``, then ``model(**p.inputs, use_cache=True)``
    and decode steps that grow ``p.inputs["attention_mask"]`` by one column each. Works for pre-LLM
    methods (FastV prunes inside the LLM: give its forward the caller's inputs). ``p.kept``: the selection.
    With ``positions="original"``, ``p.inputs["position_ids"]`` holds the kept tokens' original positions ((B, L);
    Qwen: (3, B, L)). A hand-written loop either passes only the new token and the grown mask — the patched forward
    numbers it from the record the prompt left on the cache — or its own
    ``position_ids=p.inputs["position_ids"][..., -1:] + 1 + step`` at decode step ``step`` (0, 1, ...) on
    left-padded rows, as ``generate`` does (the model would otherwise count the cache's pruned length)."""
    state = model.__dict__.get("svdprune")
    if state is None:
        raise ValueError("prune_inputs needs a model patched with patch_llava (it reads model.svdprune)")
    _check(model, state)
    if state.method in IN_LLM:
        raise ValueError(f"{state.method} prunes inside the language model: call the patched model on the caller's "
                         "inputs")
    out = prune_call(model, state, dict(inputs))
    return Pruned(inputs=dict(inputs), kept=state.kept_indices, index=None) if out is None else out


# ------------------------------------------------------------------------------------ wrappers
class _PromptStreamer:
    """A streamer that receives the caller's prompt first (generate puts the pruned prompt)."""

    def __init__(self, inner, prompt: torch.Tensor):
        self.inner, self.prompt, self.first = inner, prompt, True

    def put(self, value):
        if self.first:
            self.first, value = False, self.prompt.cpu()
        self.inner.put(value)

    def end(self):
        self.inner.end()


def _lengths(model, kw: dict, delta: int, full_len: int) -> None:
    """max_length / min_length count the caller's prompt (``full_len`` tokens): move them by the ``delta``
    tokens pruned; a max_length the caller's prompt already reaches fails as it does unpatched."""
    gc = kw.get("generation_config")

    def effective(name):
        for src in (kw, vars(gc) if gc is not None else {}, vars(model.generation_config)):
            if src.get(name) is not None:
                return src[name]
        return None

    for limit, new in (("max_length", "max_new_tokens"), ("min_length", "min_new_tokens")):
        value = effective(limit)
        if value is not None and effective(new) is None and (limit == "max_length" or value > 0):
            if limit == "max_length" and full_len >= value:
                raise ValueError(f"Input length of input_ids is {full_len}, but `max_length` is set to {value}. "
                                 "Increase `max_length` or, better, set `max_new_tokens`.")
            kw[limit] = max(int(value) - delta, 0)


def _restore_prompt(out, prompt: torch.Tensor, pruned_len: int):
    """Put the caller's prompt back in front of the generated tokens (tensor or GenerateOutput)."""
    seq = out if isinstance(out, torch.Tensor) else out.sequences
    reps = seq.shape[0] // prompt.shape[0]
    full = torch.cat([prompt.to(seq.device).repeat_interleave(reps, 0), seq[:, pruned_len:]], dim=1)
    if isinstance(out, torch.Tensor):
        return full
    out.sequences = full
    return out


def _infer_mask(model, kw: dict) -> None:
    """``generate`` without an ``attention_mask``: transformers infers one from the pad tokens of ``input_ids``
    (``GenerationMixin._prepare_attention_mask_for_generation``: pad positions masked when the pad id occurs and is
    not an eos id) before its first forward. The patch cuts the prompt before that, and a cut row would lose the
    information (its pads re-padded as real tokens), so the mask is inferred here first, by transformers' own
    functions on the call's generation config and pad/eos overrides, and passed on."""
    ids = kw.get("input_ids")
    if kw.get("attention_mask") is not None or not isinstance(ids, torch.Tensor) or ids.ndim != 2:
        return
    gc = copy.deepcopy(kw.get("generation_config") or model.generation_config)
    gc.update(**{k: kw[k] for k in ("pad_token_id", "eos_token_id", "bos_token_id") if kw.get(k) is not None})
    model._prepare_special_tokens(gc, False, device=ids.device, batch_size=ids.shape[0])
    kw["attention_mask"] = model._prepare_attention_mask_for_generation(ids, gc, {})


def _generate(self, *args, **kwargs):
    state = self.svdprune
    orig = self.generate.orig
    _check(self, state)
    kw = _bind(orig, args, kwargs)
    if kw.get("inputs") is not None:
        kw["input_ids" if kw.get("inputs_embeds") is None else "inputs"] = kw.pop("inputs")
    gc = kw.get("generation_config") or self.generation_config
    cache = cache_of(kw)
    if state.method in IN_LLM:
        n_full = tokens_per_image(self, kw.get("vision_feature_select_strategy")) if family_of(self) is None \
            else float("inf")  # images of different lengths: counted per call inside the forward
        prunes = state.budget < n_full or state.kept is not None or getattr(cache, CACHE_FASTV, None) is not None
        if prunes and (kw.get("prompt_lookup_num_tokens") or getattr(gc, "prompt_lookup_num_tokens", None)
                       or kw.get("assistant_model") is not None):
            raise NotImplementedError(f"{state.method} does not support assisted / prompt-lookup decoding (the "
                                      "draft tokens would need the pruned cache cropped layer by layer)")
        if prunes and (kw.get("prefill_chunk_size") or getattr(gc, "prefill_chunk_size", None)):
            raise NotImplementedError(f"{state.method} does not support chunked prefill (prefill_chunk_size)")
        state._in_generate, state._fastv_prompt = True, None
        try:
            return orig(**kw)
        finally:
            state._in_generate, state._fastv_prompt = False, None
    _infer_mask(self, kw)
    past = cache.get_seq_length() if isinstance(cache, Cache) else 0
    pruned = prune_call(self, state, kw, past)
    if pruned is None:
        return _inside_generate(state, orig, kw)
    new = pruned.inputs
    key = "input_ids" if kw.get("input_ids") is not None else "inputs_embeds"
    delta = kw[key].shape[1] - new[key].shape[1]
    _lengths(self, new, delta, kw[key].shape[1])
    if new.get("streamer") is not None and key == "input_ids":
        new["streamer"] = _PromptStreamer(new["streamer"], kw["input_ids"])
    out = _inside_generate(state, orig, new)
    pruned.mark(cache, getattr(out, "cache", None))
    return out if key != "input_ids" else _restore_prompt(out, kw["input_ids"], new["input_ids"].shape[1])


def _inside_generate(state, orig, kw: dict):
    """The original generate on inputs the patch has cut (or had nothing to cut in): the forwards it makes pass
    them on (for LLaVA-NeXT and Qwen, whose pre-encoded image inputs inside generate lack the layout)."""
    state._in_generate = True
    try:
        return orig(**kw)
    finally:
        state._in_generate = False


def _continued_positions(cache, past: int, kw: dict) -> dict:
    """A forward call continuing a cache that an "original"-positions prompt filled, without ``position_ids``
    (a hand-written decode loop): number its tokens on from the prompt's original numbering, as ``generate``
    would (``next_position + tokens cached after the prompt + arange``), not from the cache's pruned length."""
    rec = getattr(cache, CACHE_CUT, None)
    seq = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
    if rec is None or rec.positions != "original" or seq is None:
        return kw
    nxt = rec.next_position.to(seq.device)
    nxt = nxt.repeat_interleave(max(seq.shape[0] // nxt.shape[0], 1))  # beams / num_return_sequences
    pos = nxt[:, None] + (past - rec.length) + torch.arange(seq.shape[1], device=seq.device)
    return {**kw, "position_ids": pos}


def _forward(self, *args, **kwargs):
    state = self.svdprune
    orig = self.forward.orig
    _check(self, state)
    kw = _bind(orig, args, kwargs)
    if state.method in IN_LLM:
        from .fastv import fastv_forward

        return fastv_forward(self, state, orig, kw)
    cache = cache_of(kw)
    past = cache.get_seq_length() if isinstance(cache, Cache) else 0
    pruned = prune_call(self, state, kw, past)
    if pruned is None and past and kw.get("position_ids") is None:
        kw = _continued_positions(cache, past, kw)
    out = orig(**(kw if pruned is None else pruned.inputs))
    if pruned is not None:  # a pruned prompt: mark the cache it fills
        pruned.mark(cache, getattr(out, "cache", None))
    return out


# ---------------------------------------------------------------------------------- public API
def patch_llava(model, method: str = "svd", budget: int = 64, feature: str | None = None, *, fastv_layer: int = 2,
                kept: torch.Tensor | None = None, positions: str | None = None, **selector_kwargs: Any):
    """Prune the visual tokens of a ``LlavaForConditionalGeneration`` in place; returns ``model``.

    method: a key of ``SELECTORS``, or of ``REDUCERS`` ("visionzip": D dominant + C merged contextual tokens,
    ``reduce_visionzip``); "fastv" prunes inside the LLM at ``fastv_layer`` (K, default 2), "sparsevlm" inside the
    LLM at the layers of its schedule (:func:`.sparsevlm.schedule`), every other method before the LLM, with the
    signals the patch computes from the call (:mod:`.signals`). budget: tokens kept per image (>= N: identical to
    unpatched); for "sparsevlm" the average image tokens per decoder layer (its official meaning: 64 keeps 66, 34
    and 20 tokens after layers 2, 6 and 15 of a 32-layer LLaVA; a budget it cannot reach raises ValueError).
    feature: "vision" (vision_feature_layer patch features) or "projected", what pre-LLM methods score;
    None (default): the method's own default (``selectors.FEATURE_DEFAULTS``: "projected" for divprune, as
    its authors' code scores the LLM's input; "vision" for the others).
    kept: a stored selection (n_images, K) (e.g. an earlier ``model.svdprune.kept_indices``) used instead of
    selecting: the next calls keep exactly these tokens (budget = K; "fastv" cuts them at its layer; "sparsevlm",
    which cuts several times, refuses it).
    positions: the kept tokens' position ids: "compact" (consecutive after the cut, as the official pre-LLM LLaVA
    implementations), "original" (their positions in the full prompt, as FastV's and SparseVLM v2.0's official
    code; generation goes on numbering from the full prompt length), or None (default): the method's own
    ("compact" for pre-LLM methods, "original" for fastv and sparsevlm, which implement "original" only).
    selector_kwargs: extra signals for ``reduce_tokens`` (e.g. ``rank=``, ``center=``, ``seed=``;
    ``important_ratio=`` for vispruner; ``dominant=`` for visionzip; for cdpruner the official relevance instead
    of the patch's LLM-embedding variant (:func:`.signals.instruction_relevance`): ``relevance=`` (n_images, N)
    raw mean cosine of each image token to the instruction, or ``image_embeds=`` (n_images, N, e) with
    ``text_embeds=`` (M, e) or (n_images, M, e) — tensors of ONE call's images, so set
    ``model.svdprune.selector_kwargs`` anew before each call). ``attention`` and ``keys`` are computed by the
    patch and refused here.
    Patching a patched model replaces the first patch. Raises TypeError for a non-LLaVA model and
    ValueError for a bad method, budget, feature, fastv_layer, kept or positions; selector_kwargs are checked
    when patched too (:func:`~svdprune_utils.core.reduction.check_signals`: TypeError for a name no method
    takes, ValueError for a bad svd rank/solver or vispruner ratio), not only at a call that prunes.
    """
    if not isinstance(model, LlavaForConditionalGeneration) or family_name(model) != "llava":
        name = type(model).__name__
        hint = (" — use patch_model for this family (README, supported models)" if family_name(model) else "")
        raise TypeError(f"patch_llava needs a LlavaForConditionalGeneration (the LLaVA-1.5 layout), got {name}{hint}")
    return _install(model, method, budget, feature, fastv_layer, kept, positions, "image", "drop", selector_kwargs)


def patch_model(model, method: str = "svd", budget: int = 64, feature: str | None = None, *, fastv_layer: int = 2,
                kept=None, positions: str | None = None, scope: str = "image", newlines: str = "drop",
                **selector_kwargs: Any):
    """:func:`patch_llava` for every supported family; returns ``model``.

    ``LlavaForConditionalGeneration`` (LLaVA-1.5 layout): exactly :func:`patch_llava`.
    ``LlavaNextForConditionalGeneration`` (anyres): budget = patch tokens kept per image over its base tile and
    grid tiles (``scope="image"``) or per tile (``scope="tile"``); newline tokens dropped (``newlines="drop"``)
    or kept at the end of each grid row that keeps a token (``"keep"``); ``feature="vision"`` scores the tower's
    ``vision_feature_layer`` patch features of every tile, ``"projected"`` the packed LLM inputs.
    ``Qwen2_5_VLForConditionalGeneration`` / ``Qwen2VLForConditionalGeneration``: budget = merged tokens kept per
    image.
    For both, a float budget in (0, 1] is a ratio: each image (or tile) keeps ceil(ratio × its tokens). Qwen: the
    kept tokens keep their 3-D rotary positions (``positions="original"``, the only value);
    ``feature="vision"`` scores the tower's last block output (the four patches of each merged token
    concatenated), ``"projected"`` the merger's output. The tower has no CLS token: cls_attention, vispruner
    and visionzip raise ValueError when patched.
    For both: FastV cuts inside the LLM as on LLaVA-1.5 (each image keeps the ``budget`` placeholders, LLaVA-NeXT's
    newlines included, most attended by its row's last token at layer K−1; a batch whose rows would keep different
    numbers of tokens raises NotImplementedError: run them one by one); SparseVLM runs its LLaVA-1.5 rules unchanged
    (schedule for the image's placeholder count, gravity from the layer's own rotary cos/sin) when every image of
    the call has the same number of placeholders (else NotImplementedError) — not an official variant for these
    families; ``kept`` and ``model.svdprune.kept_indices`` are lists with one 1-D LongTensor of offsets per image
    (with ``kept`` given, each image keeps its own list, whatever ``budget`` says);
    videos are refused.
    Rules and layouts: :mod:`svdprune_utils.hf.families`.
    """
    if family_name(model) is None:
        raise TypeError(f"patch_model supports LlavaForConditionalGeneration, LlavaNextForConditionalGeneration, "
                        f"Qwen2_5_VLForConditionalGeneration and Qwen2VLForConditionalGeneration, got "
                        f"{type(model).__name__}")
    return _install(model, method, budget, feature, fastv_layer, kept, positions, scope, newlines, selector_kwargs)


def _install(model, method, budget, feature, fastv_layer, kept, positions, scope, newlines, selector_kwargs):
    if kept is not None:
        one_tensor = family_of(model) is None or isinstance(kept, torch.Tensor)
        try:
            kept = torch.as_tensor(kept).clone() if one_tensor else [torch.as_tensor(k).clone() for k in kept]
        except (TypeError, ValueError, RuntimeError):
            want = ("an integer LongTensor (n_images, K)" if family_of(model) is None else
                    "a list of 1-D integer index tensors, one per image")
            raise ValueError(f"kept must be {want} (e.g. model.svdprune.kept_indices), got "
                             f"{type(kept).__name__}") from None
    state = PruneState(method=method, budget=budget, feature=feature, fastv_layer=fastv_layer, positions=positions,
                       selector_kwargs=dict(selector_kwargs), kept=kept, scope=scope, newlines=newlines)
    _check(model, state)
    for name in ("attention", "keys"):
        if name in selector_kwargs:
            raise ValueError(f"`{name}` is computed by the patch (cls_attention, vispruner, visionzip, fastv); "
                             "do not pass it")
    if family_of(model) is None:
        tokens_per_image(model)  # refuses towers it cannot count
    unpatch_llava(model)
    try:
        for name, fn in (("generate", _generate), ("forward", _forward)):
            state._originals[name] = (name in model.__dict__, model.__dict__.get(name))
            setattr(model, name, _Patched(model, fn, name, model.__dict__.get(name)))
        for i, layer in enumerate(_lm_layers(model)):
            state._handles.append(layer.register_forward_pre_hook(_LayerHook(state, i), with_kwargs=True))
    finally:
        model.svdprune = state  # set even on failure so that unpatch_llava can undo a partial patch
    return model


class _Patched:
    """``model.forward`` / ``model.generate`` under the patch: calls ``fn(model, ...)``; keeps the original's
    signature (generate inspects it). A plain object (no closure), so ``copy.deepcopy`` of the model gives
    one whose methods run the copy, and pickling rebuilds it around the unpickled model."""

    def __init__(self, model, fn, name: str, own=None):
        self.model, self.fn, self.name, self.own = model, fn, name, own  # own: the instance attribute replaced
        self.orig = own if own is not None else getattr(type(model), name).__get__(model)
        self.__name__, self.__doc__ = name, getattr(self.orig, "__doc__", None)

    @property
    def __signature__(self):
        return inspect.signature(self.orig)

    def __call__(self, *args, **kwargs):
        return self.fn(self.model, *args, **kwargs)

    def __reduce__(self):
        return _Patched, (self.model, self.fn, self.name, self.own)


class _LayerHook:
    """FastV's forward pre-hook on decoder layer ``i`` (a plain object holding the patch state, so that a
    deep copy of the model gets hooks that act on the copy's state)."""

    def __init__(self, state: PruneState, i: int):
        self.state, self.i = state, i

    def __call__(self, module, args, kwargs):
        return fastv_pre_hook(self.state, self.i, module, args, kwargs)


def unpatch_llava(model):
    """Remove the patch (hooks and bound methods) and ``model.svdprune``; a no-op if unpatched."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"unpatch needs the patched model (a torch.nn.Module), got {type(model).__name__}")
    state = model.__dict__.get("svdprune")
    if state is None:
        return model
    for h in state._handles:
        h.remove()
    for name, (had_own, value) in state._originals.items():
        if had_own:
            setattr(model, name, value)
        else:
            model.__dict__.pop(name, None)
    del model.svdprune
    return model


unpatch_model = unpatch_llava  # the same removal for every family
