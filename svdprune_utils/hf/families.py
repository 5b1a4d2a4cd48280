"""What the pruning patch needs to know about each model family: how one call's images become runs of
placeholders, which of those tokens a method may select, the features and signals it scores them by, and the
position ids the kept tokens get.

=====================  =====================================================================================
family                 layout of one image in the prompt
=====================  =====================================================================================
``llava``              LLaVA-1.5 (``LlavaForConditionalGeneration``): N = 576 placeholders (CLIP-L/336), one
                       per tower patch, raster order. Handled by :mod:`.prune` directly.
``llava_next``         LLaVA-NeXT anyres (``LlavaNextForConditionalGeneration``): ``get_image_features``
                       packs each image as its base tile's 576 patches, then the tile grid (unpadded to the
                       image's aspect) in raster order with an ``image_newline`` token after every row;
                       the placeholder count per image is that packed length. The map from packed positions
                       to (tile, patch) is transformers' own ``pack_image_features`` applied to an index
                       tensor, so it follows the model's packing exactly.
``qwen2_5_vl``         Qwen2.5-VL / Qwen2-VL (dynamic resolution): an image of patch grid (t, h, w) gives
                       t·h·w/4 placeholders (the 2×2 patch merger), raster order of the merged grid; its
                       position ids are 3-D (t, h, w) rotary positions computed from that grid
                       (``get_rope_index``).
=====================  =====================================================================================

Budget and newline rules (LLaVA-NeXT): the budget counts patch tokens; ``newline`` tokens are never scored.
``scope="image"`` (default) keeps K = min(budget, patch tokens) tokens per image over the base tile and all
grid tiles together; ``scope="tile"`` keeps min(budget, the tile's tokens) per tile (base tile included), so
an image keeps up to budget × tiles. ``newlines="drop"`` (default) removes every newline token, so exactly the
kept patch tokens reach the LLM; ``newlines="keep"`` keeps the newline that ends each grid row in which a patch
token was kept (the row structure of what is left). A budget >= an image's patch tokens keeps the image whole,
newlines included (the unpatched input).

Positions (Qwen2.5-VL): the kept tokens keep the (t, h, w) rotary positions the full prompt gave them and the
text keeps its own (``positions="original"``, the only value): the patch computes the full prompt's 3-D
position ids with the model's ``get_rope_index`` and passes the kept columns as ``position_ids`` — never
positions recomputed for a grid that no longer exists (``get_rope_index`` on a pruned prompt would do that,
and raises). Generation numbers each new token from the last prompt column, as unpatched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["FAMILIES", "Images", "family_of", "family_name"]


@dataclass
class Images:
    """One call's images as a family lays them out (images in row-major order).

    counts: placeholders per image; candidates: per image, the offsets (into its run of placeholders) of the
    tokens a method may select (LLaVA-NeXT: every placeholder but the newlines); tiles: per image, the tile of
    each candidate (0: the base tile; LLaVA-NeXT only, else None); rows: per image, the grid row of each
    candidate (LLaVA-NeXT, -1 for the base tile) and the offset of the newline ending each grid row; grids: per
    image the (H, W) grid the candidates fill in raster order, or None; tower_rows: per image, the row of the
    tower's flattened (tiles × patches) output each candidate comes from (LLaVA-NeXT), else None."""

    counts: list
    candidates: list
    tiles: list
    rows: list
    grids: list
    tower_rows: list


# ------------------------------------------------------------------------------------ family detection
def family_name(model) -> str | None:
    """"llava", "llava_next", "qwen2_5_vl" (Qwen2.5-VL and Qwen2-VL), or None for a model the patch does not know."""
    from transformers import (LlavaForConditionalGeneration, LlavaNextForConditionalGeneration,
                              Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration)

    if isinstance(model, LlavaNextForConditionalGeneration):
        return "llava_next"
    if isinstance(model, LlavaForConditionalGeneration):
        return "llava"
    if isinstance(model, (Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration)):
        return "qwen2_5_vl"
    return None


def family_of(model):
    """The adapter of ``model``'s family (None for LLaVA-1.5, which :mod:`.prune` handles itself)."""
    name = family_name(model)
    return FAMILIES.get(name)


class _Family:
    name = ""

    def check_videos(self, kw: dict) -> None:
        """Refuse any call that carries videos (with or without images)."""
        for key in ("pixel_values_videos", "video_grid_thw"):
            if kw.get(key) is not None:
                raise NotImplementedError(f"{self.name}: video inputs are not pruned by the patch yet; unpatch the "
                                          "model (unpatch_model) for a call with videos")

    def check_call(self, model, kw: dict) -> None:
        """Refuse a call with images this family's layout cannot describe (none by default)."""


# ------------------------------------------------------------------------------------------- LLaVA-NeXT
class LlavaNext(_Family):
    name = "llava_next"
    positions = ("compact", "original")
    has_cls = True

    @staticmethod
    def patches_per_tile(model) -> int:
        v = model.config.vision_config
        return (v.image_size // v.patch_size) ** 2

    def check_call(self, model, kw: dict) -> None:
        strategy = kw.get("vision_feature_select_strategy") or model.config.vision_feature_select_strategy
        if strategy != "default":
            raise NotImplementedError("LLaVA-NeXT: only vision_feature_select_strategy='default' is supported "
                                      "(transformers' anyres packing assumes the CLS token dropped)")

    def encode(self, model, kw: dict, layer):
        """The tower and projector on the call's images (transformers' own ``get_image_features``)."""
        return model.model.get_image_features(pixel_values=kw["pixel_values"], image_sizes=kw.get("image_sizes"),
                                              vision_feature_layer=layer, vision_feature_select_strategy="default",
                                              return_dict=True)

    def layout(self, model, kw: dict) -> Images:
        """Per image: the packed placeholder run, from ``image_sizes`` and transformers' own packing (no tower)."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        sizes = kw.get("image_sizes")
        if sizes is None:
            raise ValueError("LLaVA-NeXT: the call needs image_sizes (what the processor returns) to lay out the "
                             "anyres tiles")
        sizes = torch.as_tensor(sizes)
        P = self.patches_per_tile(model)
        cfg = model.config
        out = Images([], [], [], [], [], [])
        first = 0
        newline = torch.tensor([-1.0], dtype=torch.float64)
        for size in sizes:
            n_tiles = image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            idx = torch.arange(n_tiles * P, dtype=torch.float64).view(n_tiles, P, 1)
            packed, _ = model.model.pack_image_features([idx], size[None], "default", image_newline=newline)
            m = packed[0][:, 0].round().long()  # tower row (tile * P + patch) of each placeholder, -1: newline
            cand = (m >= 0).nonzero().flatten()
            is_nl = m < 0
            row_of = is_nl.long().cumsum(0) - is_nl.long()  # newlines seen before each placeholder
            base = m[cand] < P
            row = torch.where(base, -1, row_of[cand] - int(is_nl[:P].sum()))
            out.counts.append(int(m.numel()))
            out.candidates.append(cand)
            out.tiles.append(m[cand] // P)
            out.rows.append((row, is_nl.nonzero().flatten()))
            out.grids.append(None)
            out.tower_rows.append(m[cand] + first * P)
            first += n_tiles
        return out

    def features(self, model, kw, out, layout: Images, layer, projected: list, space: str) -> list:
        """The features each image's candidates are scored by: the tower's ``layer`` patch features (every
        tile, CLS dropped, flattened tile-major, read at each candidate's tower row) or the packed projected
        features at the candidates."""
        if space == "projected":
            return [p[c] for p, c in zip(projected, layout.candidates)]
        hs = getattr(out, "hidden_states", None)
        if hs is None:
            raise ValueError("mm_encoder_outputs without hidden_states: the vision features to score are missing; "
                             "pass pixel_values, or feature='projected'")
        sel = torch.cat([hs[i][:, 1:] for i in ([layer] if isinstance(layer, int) else layer)], dim=-1)
        flat = sel.reshape(-1, sel.shape[-1])
        return [flat[r.to(flat.device)] for r in layout.tower_rows]

    def tower_signal(self, value: torch.Tensor, layout: Images) -> list:
        """A per-tower-token signal (tiles, T, ...) with CLS first, read at each image's candidates."""
        flat = value[:, 1:].reshape(-1, *value.shape[2:])
        return [flat[r.to(flat.device)] for r in layout.tower_rows]

    def keep_newlines(self, layout: Images, i: int, kept: torch.Tensor) -> torch.Tensor:
        """Image ``i``'s kept offsets plus the newline ending each grid row that keeps a token, ascending."""
        row, newlines = layout.rows[i]
        pos = {int(c): int(r) for c, r in zip(layout.candidates[i], row)}
        rows = sorted({pos[int(k)] for k in kept if pos[int(k)] >= 0})
        extra = newlines[torch.tensor(rows, dtype=torch.long)] if rows else newlines[:0]
        return torch.cat([kept.to(extra.device), extra]).sort().values

    def full_positions(self, model, kw):
        return None


# ------------------------------------------------------------------------------------------- Qwen2.5-VL
class Qwen25VL(_Family):
    name = "qwen2_5_vl"
    positions = ("original",)
    has_cls = False

    def encode(self, model, kw: dict, layer):
        return model.model.get_image_features(kw["pixel_values"], kw.get("image_grid_thw"), return_dict=True)

    def merge(self, model) -> int:
        return int(model.config.vision_config.spatial_merge_size)

    def layout(self, model, kw: dict) -> Images:
        grid = kw.get("image_grid_thw")
        if grid is None:
            raise ValueError("Qwen2.5-VL: the call needs image_grid_thw (what the processor returns)")
        m = self.merge(model)
        out = Images([], [], [], [], [], [])
        for t, h, w in torch.as_tensor(grid).tolist():
            n = t * h * w // (m * m)
            out.counts.append(n)
            out.candidates.append(torch.arange(n))
            out.tiles.append(None)
            out.rows.append(None)
            out.grids.append((h // m, w // m) if t == 1 else None)
            out.tower_rows.append(None)
        return out

    def features(self, model, kw, out, layout: Images, layer, projected: list, space: str) -> list:
        """"projected": the merger's output (what the LLM receives); "vision": the tower's last block output
        before the merger, the four patches of each merged token concatenated (4 × hidden), in the merged
        grid's raster order (the tower runs on window-permuted tokens: undone with transformers' own
        ``get_vision_window_index``)."""
        if space == "projected":
            return list(projected)
        from transformers.vision_utils import get_vision_window_index

        hs = getattr(out, "last_hidden_state", None)
        if hs is None:
            raise ValueError("mm_encoder_outputs without last_hidden_state: the vision features to score are "
                             "missing; pass pixel_values, or feature='projected'")
        visual = model.model.visual
        unit = self.merge(model) ** 2
        grouped = hs.reshape(hs.shape[0] // unit, unit * hs.shape[-1])
        if hasattr(visual, "window_size"):  # Qwen2.5-VL: windowed tower; Qwen2-VL: tokens in raster order
            grid = torch.as_tensor(kw["image_grid_thw"]).cpu()
            window, _ = get_vision_window_index(grid, self.merge(model), visual.window_size, visual.patch_size)
            grouped = grouped[torch.argsort(window.to(grouped.device))]
        return list(grouped.split(layout.counts))

    def full_positions(self, model, kw):
        """(3, B, S) rotary positions of the full prompt: the caller's ``position_ids`` when given ((3 or 4, B, S):
        the last three rows; (B, S): the same on all three, as the model reads them), else the model's own
        ``get_rope_index``."""
        given = kw.get("position_ids")
        if given is not None:
            if given.ndim == 3 and given.shape[0] in (3, 4):
                return given[-3:]
            if given.ndim == 2:
                return given[None].expand(3, -1, -1)
            raise ValueError(f"Qwen2.5-VL position_ids must be (B, S), (3, B, S) or (4, B, S), got "
                             f"{tuple(given.shape)}")
        ids = kw.get("input_ids")
        if ids is None:
            raise ValueError("Qwen2.5-VL: pruning needs input_ids (the 3-D positions are computed from them)")
        tt = kw.get("mm_token_type_ids")
        if tt is None:
            raise ValueError("Qwen2.5-VL: pruning needs mm_token_type_ids (what the processor returns) to compute "
                             "the 3-D positions")
        pos, _ = model.model.get_rope_index(ids, mm_token_type_ids=tt, image_grid_thw=kw.get("image_grid_thw"),
                                            attention_mask=kw.get("attention_mask"))
        return pos


FAMILIES = {"llava_next": LlavaNext(), "qwen2_5_vl": Qwen25VL()}
