"""``module=lvpruning``: train LVPruning's cross-attention decision modules on a frozen backbone."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..pruners.lvpruning import LVPruningHead
from .learned import HeadFactory, LearnedHead, LearnedPrunerModule


class LVPruningModule(LearnedPrunerModule):
    """Trains an :class:`~learned_prune.pruners.lvpruning.LVPruningHead` sized for ``model`` with LM loss +
    ``budget_weight`` x the ratio MSE (+ optional KL distillation to the unpruned backbone,
    ``distill_weight``: 0 gives the paper's loss; the shipped config uses 0.5). The head's
    hyper-parameters: ``module.head`` in ``configs/module/lvpruning.yaml``."""

    def __init__(self, model: nn.Module, processor: Any = None, head: LearnedHead | HeadFactory = LVPruningHead,
                 **kwargs: Any) -> None:
        super().__init__(model, head, processor=processor, **kwargs)
