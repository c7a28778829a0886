"""VTC-CLS: [CLS] attention summed over several vision layers (Wang et al., arXiv 2412.05819).

"[CLS] Token Tells Everything Needed for Training-free Efficient MLLMs"; code THU-MIG/VTC-CLS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.state import PruneState
from .fastervlm import TileScorePruner
from .stages import scale_layer

CLI_START, CLIP_L_DEPTH = 16, 24  # the official CLI's --layer 16 of CLIP-L's 24 layers


@dataclass
class VTCCLS(TileScorePruner):
    """Keep the ``keep`` patches with the largest [CLS] attention summed over vision layers
    ``start_layer`` .. penultimate, head-mean, kept in spatial order, before the projector.

    LLaVA-1.5: the official ``cls_token_only`` sums ``attentions[start_layer:-1]`` (head mean of
    each layer's [CLS] row) and ``encode_images`` keeps the top ``token_num`` in spatial order.
    Defaults as the official CLI (``--layer 16`` of CLIP-L's 24 layers): ``start_layer=None`` takes
    the same fraction (2/3) of the tower's depth, at most the penultimate layer, so on a tower of 4
    layers or fewer the sum is the penultimate layer alone and the score equals FasterVLM's.

    Departures: each layer's [CLS] row is computed from its q/k projections instead of
    ``output_attentions=True``, so SDPA stays on. The official code has no LLaVA-NeXT path (its
    scorer squeezes a batch of one image and its ``encode_images`` assumes 576 patches), so on
    LLaVA-NeXT this uses FasterVLM's per-tile selection and its ``next_layout`` options (see
    :class:`~learned_prune.pruners.fastervlm.FasterVLM`) with the summed score.
    """

    site: str = "vision"
    needs = ("vision_cls",)  # refused on a family whose tower lacks it (docs/families.md)
    start_layer: int | None = None
    next_layout: str = "official"

    def tile_scores(self, state: PruneState) -> torch.Tensor:
        """The summed [CLS] attention of every patch of every encoded tile, (T, P)."""
        n = state.vision_depth
        start = scale_layer(CLI_START, n, CLIP_L_DEPTH) if self.start_layer is None else self.start_layer % n
        start = min(start, n - 2)
        return sum(state.tile_cls_attention(layer) for layer in range(start, n - 1))
