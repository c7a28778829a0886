"""Stage layouts of progressive pruners, scaled to the depth of the model at hand.

Papers give their pruning layers for one depth (LLaVA-1.5-7B: 32 decoder layers; CLIP-L: 24 vision
layers); these helpers map them to any depth, so every method scales the same way. Counts follow
the project's budget rule (docs/benchmarks.md, "fair comparison"): ``keep`` is the number of visual
tokens that reach the LLM's layers after the *last* pruning stage; earlier stages keep more, in the
proportions of the paper's schedule.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import resolve_keep

PAPER_DEPTH = 32  # decoder layers of the 7B LLMs the papers report their layers for


def scale_layer(layer: int | float, depth: int, paper_depth: int = PAPER_DEPTH) -> int:
    """``layer`` of a ``paper_depth``-layer model, at the same relative depth of a ``depth``-layer one (rounded)."""
    return round(layer * depth / paper_depth)


def scale_layers(num_layers: int, paper_layers: Sequence[int], paper_depth: int = PAPER_DEPTH) -> list[int]:
    """Map the paper's pruning layers (for a ``paper_depth``-layer LLM) to a ``num_layers``-layer one:
    each in 1..num_layers-1 and strictly after the previous one."""
    layers = []
    for k in paper_layers:
        k = min(num_layers - 1, max(1, scale_layer(k, num_layers, paper_depth)))
        if layers and k <= layers[-1]:
            k = layers[-1] + 1
        layers.append(k)
    if layers[-1] >= num_layers:
        raise ValueError(f"{len(paper_layers)} pruning stages do not fit an LLM of {num_layers} layers")
    return layers


def fractional_layers(num_layers: int, fractions: Sequence[float]) -> list[int]:
    """Layers at ``fractions`` of the depth (e.g. 8/16/24 of 32 -> 1/4, 1/2, 3/4), each in
    1..num_layers-1, sorted, duplicates merged."""
    return sorted({min(num_layers - 1, max(1, round(f * num_layers))) for f in fractions})


def stage_counts(keep: int | float, n_visual: torch.Tensor, shape: Sequence[float]) -> list[torch.Tensor]:
    """Per-sample counts after each stage: proportional to ``shape``, the last equal to the budget."""
    last = resolve_keep(keep, n_visual).double()
    out = []
    for s in shape:
        c = (last * s / shape[-1]).round().long()
        out.append(torch.minimum(c, n_visual.long()).clamp(min=1))
    return out
