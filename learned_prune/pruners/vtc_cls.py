"""VTC-CLS: [CLS] attention summed over several vision layers (Wang et al., arXiv 2412.05819).

"[CLS] Token Tells Everything Needed for Training-free Efficient MLLMs"; code THU-MIG/VTC-CLS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.state import PruneState
from .base import Pruner


@dataclass
class VTCCLS(Pruner):
    """Keep the ``keep`` patches with the largest [CLS] attention summed over vision layers
    ``start_layer`` .. penultimate, head-mean, kept in spatial order, before the projector.

    Defaults as the official CLI (``--layer 16`` of CLIP-L's 24 layers): ``start_layer=None`` takes
    the same fraction (2/3) of the tower's depth, at most the penultimate layer, so on a tower of 4
    layers or fewer the sum is the penultimate layer alone and the score equals FasterVLM's.
    Departure: each layer's [CLS] row is computed from its q/k projections instead of
    ``output_attentions=True``, so SDPA stays on.
    """

    site: str = "vision"
    start_layer: int | None = None

    def score(self, state: PruneState) -> torch.Tensor:
        n = len(state.engine.adapter.vision_layers())
        start = round(n * 16 / 24) if self.start_layer is None else self.start_layer % n
        start = min(start, n - 2)
        return sum(state.cls_attention(layer) for layer in range(start, n - 1))
