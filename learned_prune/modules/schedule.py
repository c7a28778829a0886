"""Learning-rate schedule shared by the training modules."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def warmup_cosine_factor(total_steps: int, warmup_steps: int, floor: float = 0.0) -> Callable[[int], float]:
    """The learning-rate factor of step ``step``: linear warm-up over ``warmup_steps`` (at most a tenth of
    training), then cosine decay from 1 to ``floor`` at ``total_steps``."""
    warm = max(1, min(warmup_steps, max(1, total_steps // 10)))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                  floor: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps`` (at most a tenth of training), then cosine decay to ``floor``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine_factor(total_steps, warmup_steps, floor))
