"""PyramidDrop: stage-wise visual-token dropping inside the LLM (Xing et al., CVPR 2025, arXiv 2410.17247).

Code Cooperx521/PyramidDrop (`--layer_list [8,16,24] --image_token_ratio_list [0.5,0.25,0.125]`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..engine.state import PruneState, Selection
from .base import Pruner, resolve_keep
from .indices import topk_selection
from .stages import fractional_layers

PAPER_FRACTIONS = (0.25, 0.5, 0.75)  # boundaries 8/16/24 of 32 layers


def stage_layers(num_layers: int, fractions: tuple[float, ...] = PAPER_FRACTIONS) -> list[int]:
    """Stage boundaries scaled by depth: 8/16/24 of 32 layers -> fractions 1/4, 1/2, 3/4."""
    return fractional_layers(num_layers, fractions)


@dataclass
class PyramidDrop(Pruner):
    """At each stage boundary keep a fraction ``ratio`` of the previous stage's visual tokens, ranked
    by the attention of the last instruction token.

    Defaults as the paper for LLaVA-1.5-7B: boundaries at 8/16/24 of 32 layers (scaled by depth),
    ratio (lambda) 0.5. ``keep`` is the share that reaches the layers after the last boundary (the
    project's budget rule); stage s of n keeps ``int(N * keep / ratio**(n-1-s))`` of the N original
    visual tokens, the official ``int(N * image_token_ratio_list[s+1])`` for ``keep = ratio**n``
    (``keep=72`` of 576 gives the official 288/144/72; an int ``keep`` counts as ``keep / N``).
    Positions are re-packed (official: reset to ``arange``).

    Scoring as the official ``pdrop_rank_drop`` (a test re-states it from eager attention
    matrices): at a boundary before layer K, layer K's own input_layernorm, q_proj and k_proj with
    RoPE on the hidden states entering it (``score_layer="current"``), softmax attention of the last
    instruction (prompt) token, mean over heads, on the visual tokens; top count, original order.
    Only that query row is projected, so SDPA stays on.

    Departures (options, off by default): ``score_layer="previous"`` scores with the last token's
    attention in the layer before the boundary, from keys captured during its forward pass (as
    FastV scores), saving one k_proj over the whole sequence per stage.
    """

    layers: tuple[int, ...] | None = None
    ratio: float = 0.5
    score_layer: str = "current"
    repack_positions: bool | None = field(default=True, kw_only=True)

    def _boundaries(self, depth: int) -> list[int]:
        return list(self.layers) if self.layers else stage_layers(depth)

    def sites(self, adapter) -> list[str]:
        return [f"llm:{k}" for k in self._boundaries(adapter.num_layers)]

    def prepare(self, adapter) -> None:
        bad = [k for k in self._boundaries(adapter.num_layers) if not 1 <= k < adapter.num_layers]
        if bad:
            raise ValueError(f"PyramidDrop layers {bad}: need 1 <= layer < {adapter.num_layers}")
        if self.score_layer not in ("previous", "current"):
            raise ValueError(f"PyramidDrop score_layer must be 'previous' or 'current', got {self.score_layer!r}")
        if not 0 < self.ratio <= 1:
            raise ValueError(f"PyramidDrop ratio={self.ratio}: must lie in (0, 1]")

    def stage_counts(self, n_visual: torch.Tensor, n_stages: int) -> list[torch.Tensor]:
        """Per-sample visual tokens kept after each boundary: int(N*keep/ratio^(n-1-s)), floored as the official int()."""
        n = n_visual.long()
        last = n.double() * self.keep if isinstance(self.keep, float) else resolve_keep(self.keep, n).double()
        # a hair above the floor: keep/ratio^j that is an integer in exact arithmetic must not round down
        counts = [(last / self.ratio ** (n_stages - 1 - s) + 1e-9).floor().long() for s in range(n_stages)]
        return [torch.minimum(c, n).clamp(min=1) for c in counts]

    def select(self, state: PruneState) -> Selection:
        boundaries = self._boundaries(state.llm_depth)
        stage = boundaries.index(state.layer)
        k = self.stage_counts(state.n_visual_original, len(boundaries))[stage].clamp(max=state.n_visual)
        score = state.attention("last", layer=self.score_layer)
        return Selection(indices=topk_selection(score, state.visual_valid, k))
