"""FasterVLM: [CLS]-attention pruning before the projector (Zhang et al., arXiv 2412.01818).

"[CLS] Attention is All You Need for Training-Free Visual Token Pruning"; code Theia-4869/FasterVLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.state import PruneState, Selection
from .base import Pruner, resolve_keep
from .indices import mask_indices, pad_rows, topk_selection

NEXT_LAYOUTS = ("official", "unpad")


class TileScorePruner(Pruner):
    """Base of the vision-site pruners that score every patch of every encoded tile ([CLS] attention):
    a subclass has a ``next_layout`` field (one of ``NEXT_LAYOUTS``) and writes :meth:`tile_scores`;
    :func:`per_tile_selection` keeps the top ``keep``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.next_layout not in NEXT_LAYOUTS:
            raise ValueError(f"next_layout must be one of {NEXT_LAYOUTS}, got {self.next_layout!r}")

    def tile_scores(self, state: PruneState) -> torch.Tensor:  # pragma: no cover - abstract
        """Importance of every patch of every encoded tile, (T, P)."""
        raise NotImplementedError

    def select(self, state: PruneState) -> Selection:
        return per_tile_selection(state, self.tile_scores(state), self.keep, self.next_layout)


@dataclass
class FasterVLM(TileScorePruner):
    """Keep the ``keep`` patches with the highest [CLS] attention of the vision tower's penultimate layer.

    LLaVA-1.5: head-mean [CLS]->patch attention of encoder layer -2 (the layer whose output LLaVA
    feeds its projector), top ``keep``, raster order kept, before the LLM (positions become
    contiguous).

    LLaVA-NeXT (``next_layout="official"``): FasterVLM's ``encode_images`` runs the top-k on every
    tile separately (the base view and each crop keep ``visual_token_num`` patches by their own
    [CLS] attention), and its ``prepare_inputs_labels_for_multimodal`` hard-codes the ``'spatial'``
    merge: no unpadding and no image-newline tokens; the LLM reads the base view's kept patches in
    raster order, then the crops' kept patches in raster order of the whole crop grid. Here the
    budget ``keep`` (a count or ratio of the sample's visual tokens, newline tokens included in the
    count a ratio refers to) is split evenly: each tile keeps ``keep // n_tiles`` patches (at least one), so
    ``n_tiles * (keep // n_tiles)`` tokens reach the LLM and no newline token does. The engine
    realises that sequence by writing the kept patch features, in that order, into the image's
    first slots (``Selection.values``; positions are re-packed), so patches in the crops' padding,
    which HF's unpadded layout has no token for, are kept when they score.
    ``next_layout="unpad"`` is the ``'spatial_unpad'`` branch the same file holds but never runs:
    the per-tile top-k is kept where HF's unpadded layout has the patch, in sequence order, and every
    newline token is kept on top of the budget; a pure index selection (soft mode works).

    Departures: the [CLS] row is rebuilt from the layer's q/k projections instead of running the
    tower with ``output_attentions=True``, so SDPA stays on; a budget covering every visual token of
    every sample keeps the backbone's own sequence (no re-layout on LLaVA-NeXT).
    """

    site: str = "vision"
    needs = ("vision_cls",)  # refused on a family whose tower lacks it (docs/families.md)
    vision_layer: int = -2
    next_layout: str = "official"

    def tile_scores(self, state: PruneState) -> torch.Tensor:
        """Importance of every patch of every encoded tile, (T, P)."""
        return state.tile_cls_attention(self.vision_layer)


def per_tile_selection(state: PruneState, scores: torch.Tensor, keep: int | float, layout: str) -> Selection:
    """Top-k of per-patch ``scores`` (T, P): one top-k per sample on LLaVA-1.5, one per tile on
    LLaVA-NeXT (see :class:`FasterVLM` for the two LLaVA-NeXT layouts)."""
    k = resolve_keep(keep, state.n_visual_original).clamp(max=state.n_visual)
    patch = state.patch_index
    if not state.any_resolution:
        per_token = scores.reshape(-1)[patch.clamp_min(0)]
        return Selection(indices=topk_selection(per_token, state.visual_valid, k))
    if bool((k >= state.n_visual).all()):  # keep-all: the backbone's own sequence
        return Selection(indices=mask_indices(state.visual_valid))
    if layout == "official" and state.mode == "soft":
        raise ValueError("the official LLaVA-NeXT layout re-lays the kept patches (Selection.values), which soft mode "
                         "cannot do; use next_layout='unpad' for a pure index selection")
    P = scores.shape[1]
    side = state.image_grid[1]
    tiles = state.image_tiles()
    per_tile = [max(1, min(P, int(k[b]) // max(1, sum(im.n_tiles for im in imgs))))  # each tile's share
                for b, imgs in enumerate(tiles)]
    if layout == "unpad":
        chosen = torch.zeros_like(scores, dtype=torch.bool)
        for b, imgs in enumerate(tiles):
            for im in imgs:
                t = slice(im.first_tile, im.first_tile + im.n_tiles)
                chosen[t].scatter_(1, scores[t].topk(per_tile[b], dim=1).indices, True)
        keep_mask = state.visual_valid & ((patch < 0) | chosen.view(-1)[patch.clamp_min(0)])
        return Selection(indices=mask_indices(keep_mask))
    rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (slots, tile, token) per sample
    for b, imgs in enumerate(tiles):
        slots, tile_ids, tokens = [], [], []
        for im in imgs:
            kt = min(per_tile[b], im.count // im.n_tiles)
            t = slice(im.first_tile, im.first_tile + im.n_tiles)
            chosen = torch.zeros_like(scores[t], dtype=torch.bool)
            chosen.scatter_(1, scores[t].topk(kt, dim=1).indices, True)
            tile, pid = spatial_order(im.first_tile, im.n_tiles, im.grid, side, scores.device)
            sel = chosen[tile - im.first_tile, pid]
            tile_ids.append(tile[sel])
            tokens.append(pid[sel] + 1)  # token 0 of a tile is its [CLS]
            slots.append(im.start + torch.arange(int(sel.sum()), device=scores.device))
        rows.append((torch.cat(slots), torch.cat(tile_ids), torch.cat(tokens)))
    return ordered_selection(state, rows)


def spatial_order(
    first: int, n_tiles: int, grid: tuple[int, int] | None, side: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tile, patch) of every patch of one image in LLaVA's ``'spatial'`` order: the base tile in
    raster order, then the crop tiles as one (rows * side, cols * side) grid in raster order."""
    ar = torch.arange(side * side, device=device)
    tile, patch = [torch.full_like(ar, first)], [ar]
    if n_tiles > 1:
        rows, cols = grid
        axes = (torch.arange(n, device=device) for n in (rows, side, cols, side))
        gi, r, gj, c = torch.meshgrid(*axes, indexing="ij")
        tile.append((first + 1 + gi * cols + gj).reshape(-1))
        patch.append((r * side + c).reshape(-1))
    return torch.cat(tile), torch.cat(patch)


def ordered_selection(state: PruneState, rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                      values: list[torch.Tensor] | None = None) -> Selection:
    """A Selection writing tower tokens into given visual slots, in the given order.

    ``rows[b] = (slots, tile, token)``: the slots (indices among sample b's visual tokens, increasing)
    and, for each, the (tile, token) of the vision feature written there (token 0 = [CLS]).
    ``values[b]`` replaces the gathered features (merged tokens). Records ``info["tile"]`` and
    ``info["token"]`` (B, k), -1 on padding.
    """
    feats = state.tile_hidden()
    slots, tile, token = (pad_rows([r[i] for r in rows], width=1) for i in range(3))
    vals = [feats[t, tok] if values is None else values[b].to(feats.dtype) for b, (_, t, tok) in enumerate(rows)]
    return Selection(indices=slots, values=pad_rows(vals, fill=0, width=1), values_space="vision",
                     info={"tile": tile, "token": token})
