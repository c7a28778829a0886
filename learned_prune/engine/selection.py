"""What a pruner returns at a site (:class:`Selection`) and what an observer sees of one layer (:class:`LayerTrace`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Selection:
    """A pruner's decision at one site.

    Hard mode: ``indices`` (B, k) are positions *among the visual tokens* of each sample
    (0..n_visual-1, in the order they stand in the sequence), padded with -1 where a
    sample keeps fewer. ``values`` (B, k, D), optional, replace the hidden states at the
    kept slots (merging methods place a merged token in the slot of one of its members).
    ``values_space="vision"`` means the values are pre-projector vision features that the
    engine still has to project (vision site only).

    Soft mode: ``keep_prob`` (B, n_visual) in [0, 1]; nothing is removed, the engine
    turns it into an additive log-mask on the keys of later layers.
    """

    indices: torch.Tensor | None = None
    values: torch.Tensor | None = None
    values_space: str = "llm"
    keep_prob: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.indices is None) == (self.keep_prob is None):
            raise ValueError("A Selection holds exactly one of `indices` (hard) or `keep_prob` (soft)")
        if self.values is not None and self.indices is None:
            raise ValueError("`values` need `indices`: the slots they are written to")
        if self.values_space not in ("llm", "vision"):
            raise ValueError(f"values_space must be 'llm' or 'vision', got {self.values_space!r}")


@dataclass
class LayerTrace:
    """What one decoder layer did to every token, for pruners that watch layers run (``observe``).

    A pre-norm decoder layer computes ``mid = h_in + attn(attn_in)`` with ``attn_in =
    input_layernorm(h_in)``, then ``h_out = mid + mlp(mlp_in)`` with ``mlp_in =
    post_attention_layernorm(mid)``. ``attn_out`` / ``mlp_out`` are the branch outputs *before*
    the residual add. All (B, L, D) on the layer's current (possibly pruned) sequence.
    """

    h_in: torch.Tensor
    attn_in: torch.Tensor
    attn_out: torch.Tensor
    mlp_in: torch.Tensor
    mlp_out: torch.Tensor
    h_out: torch.Tensor
