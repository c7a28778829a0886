"""``module=atp``: train an ATP head (learned instance-wise thresholds) on a frozen backbone."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..pruners.atp import ATPHead
from .learned import HeadFactory, LearnedHead, LearnedPrunerModule


class ATPModule(LearnedPrunerModule):
    """Trains an :class:`~learned_prune.pruners.atp.ATPHead` sized for ``model`` (its hyper-parameters:
    ``module.head`` in ``configs/module/atp.yaml``; the class's defaults when ``head`` is not given)."""

    def __init__(self, model: nn.Module, processor: Any = None, head: LearnedHead | HeadFactory = ATPHead,
                 **kwargs: Any) -> None:
        super().__init__(model, head, processor=processor, **kwargs)
