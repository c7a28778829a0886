"""Learning-rate schedule shared by the training modules."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch


def schedule_length(max_steps: int | None, trainer: Any) -> int:
    """Optimizer steps the schedule spans: ``max_steps`` when it is a limit, else what the trainer
    will run (``trainer.estimated_stepping_batches``). Lightning's "no limit" (``max_steps=-1``,
    None or 0) must not become the length; a run with no limit at all cannot have a decaying schedule."""
    if max_steps is not None and max_steps > 0:
        return int(max_steps)
    total = trainer.estimated_stepping_batches
    if not math.isfinite(total) or total <= 0:
        raise ValueError(
            f"the learning-rate schedule needs a finite length, but trainer.max_steps={max_steps} and "
            f"trainer.max_epochs give {total} steps: set trainer.max_steps=N (or trainer.max_epochs=N)"
        )
    return int(total)


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
