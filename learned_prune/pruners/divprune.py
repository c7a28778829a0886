"""DivPrune: diversity-based visual-token pruning (Alvar et al., CVPR 2025, arXiv 2503.02175).

Code vbdi/divprune. Solves the Max-Min Diversity Problem greedily on the projected visual tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..engine.state import PruneState, Selection
from .base import Pruner, resolve_keep
from .indices import sorted_picks


def max_min_diverse(x: torch.Tensor, valid: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Greedy max-min diversity over cosine distances, batched: indices (B, max k), -1 padded, sorted.

    First pick: the most isolated token (largest distance to its nearest neighbour). Then each
    step adds the token whose minimum distance to the chosen set is largest. Only the k greedy
    steps loop in Python; each step is a vectorised (B, N) update.
    """
    x = F.normalize(x.float(), dim=-1)
    dist = 1 - x @ x.transpose(1, 2)  # (B, N, N)
    B, N, _ = dist.shape
    eye = torch.eye(N, dtype=torch.bool, device=x.device)
    invalid_pair = eye[None] | ~valid[:, None, :] | ~valid[:, :, None]
    nn_dist = dist.masked_fill(invalid_pair, float("inf")).amin(1)  # distance to the nearest neighbour
    nn_dist = nn_dist.masked_fill(~valid, float("-inf"))
    kmax = int(k.max())
    chosen = torch.empty(B, kmax, dtype=torch.long, device=x.device)
    taken = ~valid.clone()
    first = nn_dist.argmax(1)
    chosen[:, 0] = first
    taken[torch.arange(B), first] = True
    min_dist = dist[torch.arange(B), first]  # (B, N): distance to the chosen set
    for i in range(1, kmax):
        nxt = min_dist.masked_fill(taken, float("-inf")).argmax(1)
        chosen[:, i] = nxt
        taken[torch.arange(B), nxt] = True
        min_dist = torch.minimum(min_dist, dist[torch.arange(B), nxt])
    return sorted_picks(chosen, k)


@dataclass
class DivPrune(Pruner):
    """Keep a maximally diverse subset of ``keep`` projected visual tokens, before the LLM.

    As the official code: cosine distance between the projector outputs, first pick = the most
    isolated token, then greedy max-min; kept tokens in their original order, positions re-packed.
    Departure: batched over samples (the official loop handles one image).
    """

    site: str = "vision"

    def select(self, state: PruneState) -> Selection:
        k = resolve_keep(self.keep, state.n_visual_original).clamp(max=state.n_visual)
        return Selection(indices=max_min_diverse(state.visual_hidden, state.visual_valid, k))
