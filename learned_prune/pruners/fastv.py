"""FastV: prune visual tokens inside the LLM by the attention they receive (Chen et al., ECCV 2024).

"An Image is Worth 1/2 Tokens After Layer 2", arXiv 2403.06764; code pkunlp-icler/FastV.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.state import PruneState
from .base import Pruner


@dataclass
class FastV(Pruner):
    """Keep the ``keep`` visual tokens most attended by the last token at layer K-1; prune before layer K.

    Defaults follow the paper (K=2). Scoring follows the official code rather than the paper's
    text: the head-mean attention row of the **last** token (the paper says "average over all
    tokens"; FastV issues #14/#44 discuss the difference). Kept tokens keep their original RoPE
    position ids, as in the official code. Departure: the attention row is rebuilt from layer
    K-1's captured keys and its q projection of that one row, so SDPA stays on and no attention
    matrix is materialised (the official code runs eager attention for it).
    """

    layer: int = 2

    def sites(self, adapter) -> list[str]:
        return [f"llm:{self.layer}"]

    def prepare(self, adapter) -> None:
        if not 1 <= self.layer < adapter.num_layers:
            raise ValueError(f"FastV layer={self.layer}: needs 1 <= layer < {adapter.num_layers} (the LLM's depth)")

    def score(self, state: PruneState) -> torch.Tensor:
        return state.attention("last", layer="previous")
