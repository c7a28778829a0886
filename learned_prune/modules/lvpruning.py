"""``module=lvpruning``: train LVPruning's cross-attention decision modules on a frozen backbone."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..pruners.lvpruning import LVPruningHead
from .learned import LearnedPrunerModule


class LVPruningModule(LearnedPrunerModule):
    """Builds an :class:`~learned_prune.pruners.lvpruning.LVPruningHead` sized for ``model`` and trains it
    with LM loss + ``budget_weight`` x the ratio MSE (+ optional KL distillation to the unpruned
    backbone, ``distill_weight``: 0 gives the paper's loss; the shipped config uses 0.5)."""

    def __init__(
        self,
        model: nn.Module,
        processor: Any = None,
        layers: list[int] | None = None,
        ratios: list[float] | None = None,
        heads: int | None = None,
        blocks: int = 2,
        tau: float = 1.0,
        **kwargs: Any,
    ) -> None:
        tc = model.config.text_config
        head = LVPruningHead(tc.hidden_size, tc.num_hidden_layers, layers=list(layers) if layers else None,
                             ratios=list(ratios) if ratios else None, heads=heads, blocks=blocks, tau=tau)
        super().__init__(model, head, processor=processor, **kwargs)
