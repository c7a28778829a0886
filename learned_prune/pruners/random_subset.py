"""``random``: a seeded uniform subset of the visual tokens (a strong reference baseline)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.state import PruneState
from .base import Pruner


@dataclass
class RandomPruner(Pruner):
    """Keeps a uniformly random subset of ``keep`` visual tokens (in their original order).

    Seeded and batch-invariant: the subset depends only on ``seed`` and the visual-token count,
    never on the global RNG or on which other samples share the batch, so every image of one
    shape gets the same random positions (an unbiased baseline in expectation over a data set).
    A strong baseline in the literature (DART, arXiv 2502.11494, Fig. 2). ``repack_positions=False``
    keeps the kept tokens' original RoPE positions at the vision site: the control for heads that
    do the same (BAViT).
    """

    site: str = "vision"
    seed: int = 0

    def score(self, state: PruneState) -> torch.Tensor:
        g = torch.Generator(device="cpu").manual_seed(self.seed)
        row = torch.rand(state.visual_pos.shape[1], generator=g).to(state.hidden.device)
        return row.expand_as(state.visual_pos)
