"""``module=atp``: train an ATP head (learned instance-wise thresholds) on a frozen backbone."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..pruners.atp import ATPHead
from .learned import LearnedPrunerModule


class ATPModule(LearnedPrunerModule):
    """Builds an :class:`~learned_prune.pruners.atp.ATPHead` sized for ``model`` and trains it."""

    def __init__(
        self,
        model: nn.Module,
        processor: Any = None,
        target: float = 0.2,
        layers: list[int] | None = None,
        temperature: float = 10.0,
        stride: int = 4,
        width: int = 64,
        layer_cost: float = 0.05,
        **kwargs: Any,
    ) -> None:
        tc = model.config.text_config
        head = ATPHead(tc.hidden_size, tc.num_hidden_layers, layers=list(layers) if layers else None, target=target,
                       temperature=temperature, stride=stride, width=width, layer_cost=layer_cost)
        super().__init__(model, head, processor=processor, **kwargs)
