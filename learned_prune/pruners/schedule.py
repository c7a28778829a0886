"""Stage layouts of progressive in-LLM pruners, scaled by depth, under the project's budget rule.

The budget rule (docs/benchmarks.md, "fair comparison"): ``keep`` is the number of visual tokens
that reach the LLM's layers after the *last* pruning stage; earlier stages keep more, in the
proportions of the paper's schedule.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import resolve_keep


def scale_layers(num_layers: int, paper_layers: Sequence[int], paper_depth: int = 32) -> list[int]:
    """Map the paper's pruning layers (for a ``paper_depth``-layer LLM) to a ``num_layers``-layer one."""
    layers = []
    for k in paper_layers:
        k = min(num_layers - 1, max(1, round(k * num_layers / paper_depth)))
        if layers and k <= layers[-1]:
            k = layers[-1] + 1
        layers.append(k)
    if layers[-1] >= num_layers:
        raise ValueError(f"{len(paper_layers)} pruning stages do not fit an LLM of {num_layers} layers")
    return layers


def stage_counts(keep: int | float, n_visual: torch.Tensor, shape: Sequence[float]) -> list[torch.Tensor]:
    """Per-sample counts after each stage: proportional to ``shape``, the last equal to the budget."""
    last = resolve_keep(keep, n_visual).double()
    out = []
    for s in shape:
        c = (last * s / shape[-1]).round().long()
        out.append(torch.minimum(c, n_visual.long()).clamp(min=1))
    return out
