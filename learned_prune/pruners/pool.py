"""``pool``: 2-D average pooling of the patch grid down to the budget (a spatial baseline)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..engine.state import PruneState, Selection
from .base import Pruner, resolve_keep


def pooled_grid(rows: int, cols: int, keep: int) -> tuple[int, int]:
    """The (h, w) output grid with the most cells h*w <= keep (ties: the most square one)."""
    best = (1, 1)
    for h in range(1, rows + 1):
        w = min(cols, keep // h)
        if w < 1:
            break
        if h * w > best[0] * best[1] or (h * w == best[0] * best[1] and abs(h - w) < abs(best[0] - best[1])):
            best = (h, w)
    return best


def budget_grid(state: PruneState, keep: Any, method: str) -> tuple[int, int, int, int]:
    """(rows, cols) of the image's patch grid and the (h, w) output grid of a vision-site method that
    shrinks whole grids to ``keep`` cells (``pool``, ``downsample``); checks the site and the token layout."""
    if state.site != "vision":
        raise ValueError(f"{method} acts at the 'vision' site")
    rows, cols = state.image_grid
    P = rows * cols
    n0 = state.n_visual_original
    if bool((n0 % P != 0).any()) and not state.any_resolution:
        raise ValueError(f"{method} expects whole {rows}x{cols} grids of visual tokens, got {n0.tolist()}")
    k = int(resolve_keep(keep, n0).min())
    return (rows, cols, *pooled_grid(rows, cols, min(k, P)))


def centre_slots(rows: int, cols: int, h: int, w: int) -> torch.Tensor:
    """For each cell of an h x w grid over a rows x cols patch grid (raster order), the flat index of the patch
    at the cell's centre, (h*w,)."""
    r = ((torch.arange(h) + 0.5) * rows / h).floor().long().clamp(max=rows - 1)
    c = ((torch.arange(w) + 0.5) * cols / w).floor().long().clamp(max=cols - 1)
    return (r[:, None] * cols + c[None, :]).flatten()


@dataclass
class PoolPruner(Pruner):
    """Adaptive 2-D average pooling of each image's patch grid to at most ``keep`` cells.

    Pools pre-projector vision features (as LLaVA-style spatial pooling does) and projects the
    pooled cells; each cell is written into the slot of the patch nearest its centre, so the
    LLM sees the cells in raster order. The grid is the largest h*w <= keep. On LLaVA-NeXT the
    global (base) view is pooled and the high-resolution tiles are dropped.
    """

    site: str = "vision"
    needs = ("vision_grid",)  # refused on a family whose tower lacks it (docs/families.md)

    def select(self, state: PruneState) -> Selection:
        rows, cols, h, w = budget_grid(state, self.keep, "pool")
        P = rows * cols
        feats = state.vision_features()[:, :P]  # the first image's (base-view) grid
        B, _, D = feats.shape
        grid = feats.reshape(B, rows, cols, D).permute(0, 3, 1, 2)
        pooled = F.adaptive_avg_pool2d(grid.float(), (h, w)).to(feats.dtype)  # (B, D, h, w)
        values = pooled.flatten(2).transpose(1, 2)  # (B, h*w, D)
        slots = centre_slots(rows, cols, h, w).to(feats.device)  # slot of each cell: the patch at its centre
        indices = slots[None].expand(B, -1)
        return Selection(indices=indices, values=values, values_space="vision")
