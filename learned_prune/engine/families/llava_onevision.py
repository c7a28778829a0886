"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``), images: a SigLIP tower without [CLS] whose every
patch feeds the projector, any-resolution crops unpadded, pooled when an image has too many (``anyres_max_9``)
and packed with row-end newline tokens, a Qwen2 decoder with 1-D RoPE."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..vision import VisionCapture
from .llava import LlavaAdapter


class LlavaOnevisionAdapter(LlavaAdapter):
    """LLaVA-OneVision: LLaVA's module layout and 1-D positions; no vision-tower signals for pruners."""

    family = "llava_onevision"
    signals = frozenset()
    no_signal = ("LLaVA-OneVision's SigLIP tower has no [CLS] token, and its crops are unpadded and pooled per image "
                 "(anyres_max_9) before the LLM, so its patch grid is not one fixed square")

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)

    def vision_tokens(self, n_visual: int) -> int:
        """Tiles (``n_visual`` over one grid, at least 1) times the grid's patches (SigLIP has no [CLS])."""
        grid = self.patch_grid[0] * self.patch_grid[1]
        return max(1, round(n_visual / grid)) * grid

    def check_inputs(self, kwargs: dict) -> None:
        self.refuse_video(kwargs)

    def vision_capture(self, out: Any, bound: dict, wants_vision: bool) -> VisionCapture:
        feats = list(out.pooler_output)
        return VisionCapture(n_features=sum(int(f.shape[0]) for f in feats), hidden_states=None, n_tiles=len(feats),
                             image_sizes=bound.get("image_sizes"), features=feats, tiles=[1] * len(feats), pixels=None)
