"""Site names and the per-call bookkeeping of the engine's layer groups."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class _Group:
    """Layers that share one key layout in the KV cache (those between two hard prunes)."""

    valid: torch.Tensor  # (B, K) keys held by these layers' caches
    logmask: torch.Tensor | None
    offset: torch.Tensor  # (B,) how far positions were shifted down by re-packing
    next_pos: torch.Tensor  # (B,)


@dataclass
class _Run:
    cache: Any
    groups: list[_Group] = field(default_factory=list)
    layer_group: list[int] = field(default_factory=list)


def parse_site(site: str, num_layers: int) -> int:
    """``"vision"`` -> 0 (before the first decoder layer); ``"llm:K"`` -> K, validated."""
    if site == "vision":
        return 0
    if site.startswith("llm:"):
        try:
            k = int(site[4:])
        except ValueError:
            k = -1
        if 0 <= k < num_layers:
            return k
        raise ValueError(f"site {site!r}: the LLM has {num_layers} decoder layers, use llm:K with 0 <= K < {num_layers}")
    raise ValueError(f"unknown site {site!r}: use 'vision' or 'llm:K'")
