"""AIM's pre-LLM merge of visual tokens.

Zhong et al., "AIM: Adaptive Inference of Multi-Modal LLMs via Token Merging and Pruning",
ICCV 2025, arXiv 2412.03248 (LaVi-Lab/AIM).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.state import PruneState
from .merging import MergingPruner


@dataclass
class AIMMerge(MergingPruner):
    """AIM's pre-LLM merge: ``bipartite_soft_matching_merge`` twice on the projected embeddings
    (metric = the embedding itself), removing ``N // 2`` then ``N // 4`` tokens (leaving 25%, AIM's
    default); each step merges by a plain mean (``scatter_reduce`` "mean": the B token and the A
    tokens merged into it this step, unweighted) and outputs ``[unmerged A tokens in edge-rank
    order, B tokens]``, the order the LLM reads.

    A budget above 25% stops the steps at ``keep``; below it, steps of ``N // 8``, ``N // 16``, ...
    follow (the schedule AIM's code carries commented out) down to ``keep``.

    Departures: AIM's released code (LLaVA-OneVision) merges the tokens of each video frame; on
    images it merges each sample's visual tokens as one sequence (LLaVA-NeXT: all tiles and the
    newline tokens together). AIM then prunes inside the LLM with PageRank scores over eager
    attention logits; that part is not implemented here, which is why this is named for the merge.
    """

    site: str = "vision"
    mode = "mean"
    aim_schedule = True

    def _merge_inputs(self, state: PruneState) -> tuple[torch.Tensor, torch.Tensor | None]:
        return state.visual_hidden, None  # metric = the embeddings: one buffer serves both
