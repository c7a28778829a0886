"""ToMe-style merging of visual tokens before the LLM.

Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023 (facebookresearch/ToMe).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.state import PruneState
from .merging import MergingPruner


@dataclass
class ToMe(MergingPruner):
    """Merge visual tokens down to ``keep`` by repeated bipartite soft matching, before the LLM.

    Each step is ToMe's ``bipartite_soft_matching`` + ``merge_wavg`` (see
    :mod:`~learned_prune.pruners.merging`): the metric is the head-mean key of the vision tower's
    last layer, A/B sets alternate on the current order, at most half the tokens merge per step,
    merged tokens are size-weighted averages, and a step outputs ``[unmerged A tokens in edge-rank
    order, B tokens]`` (no class token among them, so ToMe's re-sort of A does not apply); the LLM
    reads the last step's order (the engine writes the tokens into the first visual slots,
    positions re-packed).

    Departures: ToMe merges inside the ViT a few tokens per layer, re-computing the metric from
    each layer's keys; here (as the pre-LLM ToMe baseline in DART's tables) the merge runs once,
    down to the budget, on the projected tokens the LLM receives, the keys being merged alongside
    the tokens (size-weighted) between steps. LLaVA-NeXT's newline tokens, which have no vision
    keys, get an all-zero metric (cosine 0 to everything, where ToMe's normalisation would give
    NaN) and merge like any other token.
    """

    site: str = "vision"
    needs = ("vision_grid",)  # refused on a family whose tower lacks it (docs/families.md)
    mode = "wavg"  # class constants (not fields): how merged tokens average, and the step sizes
    aim_schedule = False

    def _merge_inputs(self, state: PruneState) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(tokens, metric or None to match on the tokens themselves)."""
        return state.visual_hidden, state.vision_keys(-1)

