"""ToMe-style merging of visual tokens before the LLM, and AIM's pre-LLM merge.

ToMe: Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023 (facebookresearch/ToMe).
AIM: Zhong et al., "AIM: Adaptive Inference of Multi-Modal LLMs via Token Merging and Pruning",
ICCV 2025, arXiv 2412.03248 (LaVi-Lab/AIM).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.state import PruneState, Selection
from .base import Pruner, resolve_keep
from .merging import merge_to_batched


@dataclass
class ToMe(Pruner):
    """Merge visual tokens down to ``keep`` by repeated bipartite soft matching, before the LLM.

    Each step is ToMe's ``bipartite_soft_matching`` + ``merge_wavg`` (see
    :mod:`~learned_prune.pruners.merging`): the metric is the head-mean key of the vision tower's
    last layer, A/B sets alternate on the current order, at most half the tokens merge per step,
    merged tokens are size-weighted averages, and a step outputs ``[unmerged A tokens in edge-rank
    order, B tokens]`` (no class token among them, so ToMe's re-sort of A does not apply); the LLM reads the last step's order (the engine writes the tokens into the
    first visual slots, positions re-packed).

    Departures: ToMe merges inside the ViT a few tokens per layer, re-computing the metric from
    each layer's keys; here (as the pre-LLM ToMe baseline in DART's tables) the merge runs once,
    down to the budget, on the projected tokens the LLM receives, the keys being merged alongside
    the tokens (size-weighted) between steps. LLaVA-NeXT's newline tokens, which have no vision
    keys, get an all-zero metric (cosine 0 to everything, where ToMe's normalisation would give
    NaN) and merge like any other token.
    """

    site: str = "vision"
    mode = "wavg"  # class constants (not fields): how merged tokens average, and the step sizes
    aim_schedule = False

    def _merge_inputs(self, state: PruneState) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(tokens, metric or None to match on the tokens themselves)."""
        return state.visual_hidden, state.vision_keys(-1)

    def select(self, state: PruneState) -> Selection:
        # The whole batch merges at once (merging.merge_to_batched): no Python loop over samples.
        n = state.n_visual
        k = resolve_keep(self.keep, state.n_visual_original).clamp(max=n)
        x, metric = self._merge_inputs(state)
        vals, source = merge_to_batched(x, metric, k, n=n, mode=self.mode, aim_schedule=self.aim_schedule)
        ar = torch.arange(source.shape[1], device=source.device).expand_as(source)
        index = torch.where(source >= 0, ar, -1)  # the first k visual slots, in the merged order
        return Selection(indices=index, values=vals, values_space="llm", info={"source": source})


@dataclass
class AIMMerge(ToMe):
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

    mode = "mean"
    aim_schedule = True

    def _merge_inputs(self, state: PruneState) -> tuple[torch.Tensor, torch.Tensor | None]:
        return state.visual_hidden, None  # metric = the embeddings: one buffer serves both
