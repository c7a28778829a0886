"""VisionZip: dominant + contextual visual tokens (Yang et al., CVPR 2025, arXiv 2412.04467).

"VisionZip: Longer is Better but Not Necessary in Vision Language Models"; code dvlab-research/VisionZip.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.state import PruneState, Selection
from .base import Pruner, resolve_keep
from .fastervlm import ordered_selection, spatial_order

# The paper's splits for LLaVA-1.5 (Table 8): 192 = 162 + 30, 128 = 108 + 20, 64 = 54 + 10.
DOMINANT_FRACTION = 54 / 64


@dataclass
class VisionZip(Pruner):
    """Keep ``dominant`` tokens by [CLS] attention (the [CLS] token itself among them) and merge the
    rest into ``keep - dominant`` contextual tokens, before the projector.

    Per tile, as ``CLIPVisionTower_VisionZip.forward``: the dominant tokens are the [CLS] token and
    the top ``dominant - 1`` patches by head-summed [CLS] attention of encoder layer -2, taken from
    the hidden states LLaVA feeds its projector (``hidden_states[-2]``) in original order; the
    other patches are L2-normalised by the head-mean keys of encoder layer -2 (the official
    ``layers[-2].metric``), every ``step = max(1, n_rest // contextual)``-th becomes a target (the
    first ``contextual`` of them), every other one is assigned to its most similar target, and a
    contextual token is ``target + mean(assigned)`` (a "+", not a weighted average).
    LLaVA-1.5: the LLM reads [CLS, dominant..., contextual...]. ``dominant=None`` takes the paper's
    ratio (54 of 64) of the budget.

    LLaVA-NeXT, as the official ``prepare_inputs_labels_for_multimodal_visionzip`` and
    ``restore_image_features_sorted``: every tile keeps its own share, the base view as
    [CLS, dominant..., contextual...], then the crops' dominant patches in raster order of the whole
    crop grid (no unpadding), the crops' [CLS] tokens, and the crops' contextual tokens tile by
    tile; no image-newline token. Here each tile's share is ``keep // n_tiles`` (``keep`` counts the
    sample's visual tokens, newline tokens included in the count a ratio refers to), and
    ``dominant`` is per tile.

    The engine writes these tokens, in this order, into each image's first slots
    (``Selection.values``) and re-packs positions, so the LLM reads exactly this sequence.
    Departures: [CLS] rows and keys are rebuilt from the layer's q/k projections, so SDPA stays on.
    """

    site: str = "vision"
    needs = ("vision_cls",)  # refused on a family whose tower lacks it (docs/families.md)
    dominant: int | None = None

    def select(self, state: PruneState) -> Selection:
        k = resolve_keep(self.keep, state.n_visual_original).clamp(max=state.n_visual)
        attn = state.tile_cls_attention(-2, heads="sum")  # (T, P)
        keys = state.tile_keys(-2)[:, 1:].float()  # (T, P, head_dim)
        keys = keys / keys.norm(dim=-1, keepdim=True)
        feats = state.tile_hidden()  # (T, 1 + P, Dv), [CLS] first
        side = state.image_grid[1]
        P = attn.shape[1]
        rows, values = [], []
        for b, imgs in enumerate(state.image_tiles()):
            share = max(1, int(k[b]) // max(1, sum(im.n_tiles for im in imgs)))
            dom = max(1, min(self.dominant if self.dominant is not None else round(share * DOMINANT_FRACTION), share))
            ctx = min(share - dom, P - (dom - 1))
            slots, tiles, tokens, vals = [], [], [], []
            for im in imgs:
                tile_ids = range(im.first_tile, im.first_tile + im.n_tiles)
                parts = [self._tile(attn[t], keys[t], feats[t], dom, ctx) for t in tile_ids]
                ts, tok, is_ctx, merged = self._order(im, parts, side)
                val = feats[ts, tok].float()
                val[is_ctx] = merged
                slots.append(im.start + torch.arange(ts.numel(), device=feats.device))
                tiles.append(ts)
                tokens.append(tok)
                vals.append(val)
            rows.append((torch.cat(slots), torch.cat(tiles), torch.cat(tokens)))
            values.append(torch.cat(vals))
        return ordered_selection(state, rows, values)

    @staticmethod
    def _tile(attn: torch.Tensor, keys: torch.Tensor, feats: torch.Tensor, dom: int, ctx: int) -> dict:
        """One tile: dominant patch ids (raster order), contextual target ids and merged values."""
        P = attn.numel()
        is_dom = torch.zeros(P, dtype=torch.bool, device=attn.device)
        is_dom[attn.topk(dom - 1).indices] = True
        dominant = is_dom.nonzero()[:, 0]
        rest = (~is_dom).nonzero()[:, 0]
        targets = rest[:0]
        merged = feats[:0]
        if ctx > 0:
            step = max(1, rest.numel() // ctx)
            pick = torch.arange(0, rest.numel(), step, device=attn.device)[:ctx]
            targets = rest[pick]
            is_target = torch.zeros(rest.numel(), dtype=torch.bool, device=attn.device)
            is_target[pick] = True
            others = rest[~is_target]
            assign = (keys[others] @ keys[targets].T).argmax(-1)
            summed = torch.zeros(targets.numel(), feats.shape[-1], device=feats.device)
            summed.index_add_(0, assign, feats[1 + others].float())
            count = torch.bincount(assign, minlength=targets.numel()).clamp_min(1)
            merged = feats[1 + targets].float() + summed / count[:, None]
        return {"dominant": dominant, "targets": targets, "merged": merged.float(), "cls": feats[0]}

    @staticmethod
    def _order(im, parts: list[dict], side: int) -> tuple[torch.Tensor, ...]:
        """(tile, token, is_contextual, merged values) of one image's tokens in the official order
        (token 0 = [CLS]; a contextual token is named by its target; ``merged`` holds the values of
        the contextual tokens, in order)."""
        first, dev = im.first_tile, parts[0]["cls"].device
        segments = []  # (tile, token, contextual?)

        def add(tile: torch.Tensor | int, token: torch.Tensor, ctx: bool = False) -> None:
            tile = torch.full_like(token, tile) if isinstance(tile, int) else tile
            segments.append((tile, token, torch.full_like(token, ctx, dtype=torch.bool)))

        base = parts[0]
        add(first, torch.zeros(1, dtype=torch.long, device=dev))  # [CLS]
        add(first, base["dominant"] + 1)
        add(first, base["targets"] + 1, True)
        if len(parts) > 1:  # crops: dominant patches over the whole crop grid, then [CLS]s, then contextuals
            order_tile, order_patch = spatial_order(first, im.n_tiles, im.grid, side, dev)
            crop = order_tile > first
            order_tile, order_patch = order_tile[crop], order_patch[crop]
            chosen = torch.zeros(len(parts) - 1, side * side, dtype=torch.bool, device=dev)
            for i, p in enumerate(parts[1:]):
                chosen[i, p["dominant"]] = True
            sel = chosen[order_tile - first - 1, order_patch]
            add(order_tile[sel], order_patch[sel] + 1)
            crops = torch.arange(first + 1, first + im.n_tiles, device=dev)
            add(crops, torch.zeros_like(crops))  # the crops' [CLS] tokens
            for i, p in enumerate(parts[1:]):
                add(first + 1 + i, p["targets"] + 1, True)
        tile, token, is_ctx = (torch.cat(t) for t in zip(*segments))
        return tile, token, is_ctx, torch.cat([p["merged"] for p in parts])
