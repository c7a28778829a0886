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
from .merging import merge_to


def _pad(values: list[torch.Tensor], slots: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    k = max(v.shape[0] for v in values)
    B, D = len(values), values[0].shape[-1]
    out = values[0].new_zeros(B, k, D)
    idx = torch.full((B, k), -1, dtype=torch.long, device=values[0].device)
    for i, (v, s) in enumerate(zip(values, slots)):
        out[i, : v.shape[0]], idx[i, : s.shape[0]] = v, s
    return out, idx


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

    def _merge_inputs(self, state: PruneState) -> tuple[torch.Tensor, torch.Tensor, str]:
        return state.visual_hidden, state.vision_keys(-1), "llm"

    def _first_steps(self, n: int) -> list[int]:
        return []

    def select(self, state: PruneState) -> Selection:
        k = resolve_keep(self.keep, state.n_visual_original).clamp(max=state.n_visual)
        x, metric, space = self._merge_inputs(state)
        values, slots = [], []
        for b in range(x.shape[0]):
            n = int(state.n_visual[b])
            v, s = merge_to(x[b, :n], metric[b, :n], int(k[b]), self._first_steps(n))
            values.append(v)
            slots.append(s)
        vals, idx = _pad(values, slots)
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

    def _merge_inputs(self, state: PruneState) -> tuple[torch.Tensor, torch.Tensor, str]:
        h = state.visual_hidden
        return h, h, "llm"

    def _first_steps(self, n: int) -> list[int]:
        return [n // 2, n // 4]
