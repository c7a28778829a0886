"""FasterVLM: [CLS]-attention pruning before the projector (Zhang et al., arXiv 2412.01818).

"[CLS] Attention is All You Need for Training-Free Visual Token Pruning"; code Theia-4869/FasterVLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.state import PruneState
from .base import Pruner


@dataclass
class FasterVLM(Pruner):
    """Keep the ``keep`` patches with the highest [CLS] attention of the vision tower's penultimate layer.

    As the official code: head-mean [CLS]->patch attention of encoder layer -2 (the layer whose
    output LLaVA feeds its projector), top-k, raster order kept, before the LLM (positions
    become contiguous). Departure: the [CLS] row is computed from that layer's q/k projections
    instead of running the tower with ``output_attentions=True`` (eager), so SDPA stays on.
    """

    site: str = "vision"
    vision_layer: int = -2

    def score(self, state: PruneState) -> torch.Tensor:
        return state.cls_attention(self.vision_layer)
