"""ToMe-style merging of visual tokens before the LLM, and AIM's two-step merge.

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

    As ToMe: the metric is the head-mean key of the vision tower's last layer, A/B sets alternate,
    at most half the tokens merge per step, merged tokens are size-weighted averages. Departures:
    ToMe merges inside the ViT a few tokens per layer; here (as the pre-LLM ToMe baseline in DART's
    tables) the merge runs once, down to the budget, on the projected tokens the LLM receives (so
    LLaVA-NeXT's newline tokens, which have no vision features, merge like any other). Each merged
    token sits in the slot of its B-set member, so the LLM sees raster order.
    """

    site: str = "vision"

    def _merge_inputs(self, state: PruneState) -> tuple[torch.Tensor, torch.Tensor | None, str]:
        """(tokens, metric or None to match on the tokens themselves, values space)."""
        return state.visual_hidden, state.vision_keys(-1), "llm"

    def _first_steps(self, n: torch.Tensor) -> list[torch.Tensor]:
        """Per-sample token counts (B,) removed by fixed first steps, from the visual counts ``n``."""
        return []

    def select(self, state: PruneState) -> Selection:
        # The whole batch merges at once (merging.merge_to_batched): no Python loop over samples,
        # one batched step per halving, padded samples masked by their visual-token counts.
        n = state.n_visual
        k = resolve_keep(self.keep, state.n_visual_original).clamp(max=n)
        x, metric, space = self._merge_inputs(state)
        vals, idx = merge_to_batched(x, metric, k, n=n, first_steps=self._first_steps(n))
        return Selection(indices=idx, values=vals, values_space=space)


@dataclass
class AIMMerge(ToMe):
    """AIM's pre-LLM merge: two bipartite steps on the projected embeddings (metric = the embedding
    itself), the first removing N/2 tokens and the second N/4 (leaving 25%, AIM's default).

    The second step stops at ``keep`` when the budget is above N/4; below it, further ToMe steps
    continue down to ``keep`` (AIM itself then prunes inside the LLM with PageRank scores over
    eager attention logits; that part is not implemented here, which is why this is named for the
    merge alone).
    """

    def _merge_inputs(self, state: PruneState) -> tuple[torch.Tensor, torch.Tensor | None, str]:
        return state.visual_hidden, None, "llm"  # metric = the embeddings: one buffer serves both

    def _first_steps(self, n: torch.Tensor) -> list[torch.Tensor]:
        return [n // 2, n // 4]
