"""Shared base of learned *compressors*: vision-site heads that replace an image's visual tokens by a few
new ones (FlashSloth, QueCC), as opposed to heads that choose which tokens to keep.

A compressor reads the frozen vision tower's patch features on the image's square patch grid (and the
instruction's token embeddings, for instruction-aware ones) and returns ``tokens`` new tokens in the LLM's
embedding space. The engine writes them into ``tokens`` of the image's visual slots, evenly spaced over
the image span, and drops the other visual tokens; ``repack_positions`` (default False) chooses whether
the new tokens keep those slots' RoPE positions or are re-packed to be contiguous. There is no soft mode:
the new tokens exist only in hard mode, where gradients reach the head through their values, so a
compressor trains in hard mode (:class:`~learned_prune.modules.compressor.CompressorModule`).

Only single-view images (LLaVA-1.5-style square patch grids) are supported; LLaVA-NeXT's tiles are refused.
"""

from __future__ import annotations

from typing import Any

import torch

from ..engine.state import PruneState, Selection
from .learned import LearnedHead


def spread_slots(n_visual: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k) slots among each sample's ``n_visual`` visual tokens, evenly spread: the centre of each of
    ``k`` equal parts of the span, in order."""
    part = (torch.arange(k, device=n_visual.device, dtype=torch.float64) + 0.5) / k
    return (part[None] * n_visual[:, None].double()).floor().long().clamp(max=n_visual.max() - 1)


class CompressorHead(LearnedHead):
    """Base of compressors: subclasses set ``method``, build their layers and implement :meth:`compress`.

    ``vision_hidden`` and ``hidden_size`` are the tower's and the LLM's widths, ``grid`` the side of the
    image's patch grid (the training module supplies them); ``n_tokens`` is the number of tokens emitted.
    """

    repack_positions: bool | None = False
    adaptive = True  # the count is the architecture's: the eval grid runs it once, at that count, and gives no `keep`

    def __init__(self, vision_hidden: int, hidden_size: int, grid: int) -> None:
        super().__init__()
        if vision_hidden < 1 or hidden_size < 1 or grid < 1:
            raise ValueError(f"{self.display_name}: vision_hidden={vision_hidden}, hidden_size={hidden_size} and "
                             f"grid={grid} must be positive (the backbone's sizes)")
        self.vision_hidden, self.hidden_size, self.grid = vision_hidden, hidden_size, grid

    @property
    def n_tokens(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def compress(self, state: PruneState) -> torch.Tensor:  # pragma: no cover - abstract
        """The new tokens of each sample, (B, n_tokens, hidden_size), in the LLM's embedding space."""
        raise NotImplementedError

    # ---- what a compressor reads -----------------------------------------------------------
    def grid_features(self, state: PruneState, layer: int | None = None) -> torch.Tensor:
        """Pre-projector features at hidden-state ``layer`` of the tower (default: the projector's input layer)
        on the patch grid, (B, grid, grid, vision_hidden), float32."""
        feats = state.vision_features(layer)
        if feats.shape[1] != self.grid * self.grid or not bool(state.visual_valid.all()):
            raise ValueError(f"this {self.display_name} head reads a {self.grid}x{self.grid} patch grid per image, "
                             f"but the sample has {feats.shape[1]} visual tokens; it supports one single-view image "
                             "per sample (LLaVA-1.5-style), not LLaVA-NeXT tiles or several images")
        return feats.float().reshape(len(feats), self.grid, self.grid, -1)

    @staticmethod
    def instruction(state: PruneState) -> tuple[torch.Tensor, torch.Tensor]:
        """The instruction's token embeddings (B, T, D) float32 and their validity (B, T): the prompt text after
        the image (the answer of a teacher-forced pass is left out); a sample without any has one valid zero row."""
        mask = state.instruction_mask
        n = mask.sum(1)
        width = max(int(n.max()), 1)
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :width]
        valid = torch.arange(width, device=mask.device)[None] < n[:, None]
        valid[:, 0] |= n == 0  # a sample without instruction attends to one zero row, not to nothing
        rows = torch.gather(state.hidden, 1, order.unsqueeze(-1).expand(*order.shape, state.hidden.shape[-1]))
        return rows.float() * valid.unsqueeze(-1), valid

    # ---- pruner protocol ---------------------------------------------------------------------
    def sites(self, adapter: Any) -> list[str]:
        return ["vision"]

    def prepare(self, adapter: Any) -> None:
        vc, tc = adapter.vision_config, adapter.text_config
        image_size, patch_size = getattr(vc, "image_size", None), getattr(vc, "patch_size", None)
        if adapter.is_next or not isinstance(image_size, int) or not patch_size:
            raise ValueError(f"{self.display_name} heads compress one single-view image on a square patch grid "
                             f"(LLaVA-1.5-style); this {type(adapter.model).__name__} is not supported")
        have = (vc.hidden_size, tc.hidden_size, image_size // patch_size)
        if have != (self.vision_hidden, self.hidden_size, self.grid):
            raise ValueError(f"this {self.display_name} head was built for a tower of width {self.vision_hidden}, an LLM "
                             f"of width {self.hidden_size} and a {self.grid}x{self.grid} patch grid; the model has "
                             f"{have[0]}, {have[1]} and {have[2]}x{have[2]}: train a head for this backbone")
        super().prepare(adapter)

    def select(self, state: PruneState) -> Selection:
        if state.mode == "soft":
            raise ValueError(f"{self.display_name} compresses the image into new tokens, which exist only in hard "
                             "mode: install it with mode='hard' (its training module trains in hard mode)")
        if int(state.n_visual.min()) < self.n_tokens:
            raise ValueError(f"this {self.display_name} head emits {self.n_tokens} tokens but a sample has only "
                             f"{int(state.n_visual.min())} visual tokens")
        with torch.autocast(state.hidden.device.type, enabled=False):
            values = self.compress(state)
        self._last_kept = torch.full_like(state.n_visual, self.n_tokens)
        return Selection(indices=spread_slots(state.n_visual, self.n_tokens), values=values.to(state.hidden.dtype))

    def budget_loss(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """No budget term: the token count is fixed by the architecture."""
        p = next(self.parameters())
        return p.new_zeros(()), {}
