"""LLaVA-1.5 (``LlavaForConditionalGeneration``): a CLIP tower with a [CLS] token on one square patch grid,
a 2-layer MLP projector, a Llama decoder with 1-D RoPE."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..vision import VisionCapture, stack_tiles
from .base import FamilyAdapter


class LlavaAdapter(FamilyAdapter):
    """Read-only view of the parts of an HF ``LlavaForConditionalGeneration`` the engine uses."""

    family = "llava"
    signals = frozenset({"vision_cls", "vision_grid"})

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        if not hasattr(self.inner, "vision_tower"):
            raise TypeError(f"{type(model).__name__} is not an HF LLaVA model: expected `.model.vision_tower`")
        self.vision_tower = self.inner.vision_tower
        self.vision_config = self.vision_tower.config
        self.projector = self.inner.multi_modal_projector
        self.feature_layer = self.config.vision_feature_layer
        self.select_strategy = self.config.vision_feature_select_strategy
        side = self.vision_config.image_size // self.vision_config.patch_size
        self.patch_grid = (side, side)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The multi-modal projector on pre-projector vision features (cast to the projector's dtype)."""
        return self.projector(features.to(self.projector.linear_1.weight.dtype))

    def vision_layers(self) -> nn.ModuleList:
        tower = getattr(self.vision_tower, "vision_model", self.vision_tower)
        return tower.encoder.layers

    def post_layernorm(self, features: torch.Tensor) -> torch.Tensor:
        """The vision tower's final ``post_layernorm`` applied to features (..., Dv)."""
        return getattr(self.vision_tower, "vision_model", self.vision_tower).post_layernorm(features)

    def tiles_per_image(self, image_sizes: Any, n_images: int) -> list[int]:
        """Encoded tiles of each image: one per image here."""
        return [1] * n_images

    def token_sources(self, n_tiles: int, image_sizes: torch.Tensor | None) -> torch.Tensor:
        """For every image token the backbone will insert, the flat index (tile * P + patch) of the vision patch
        it comes from (-1 for row-end newline tokens, which LLaVA-1.5 has not)."""
        P = self.patch_grid[0] * self.patch_grid[1]
        return torch.arange(n_tiles * P)

    def vision_capture(self, out: Any, bound: dict, wants_vision: bool) -> VisionCapture:
        feats = out.pooler_output
        n_feats = sum(int(f.shape[0]) if f.dim() == 2 else int(f.shape[0] * f.shape[1]) for f in feats)
        sizes = bound.get("image_sizes")
        tiles = self.tiles_per_image(sizes, len(feats))
        return VisionCapture(
            n_features=n_feats,
            hidden_states=out.hidden_states if wants_vision else None,
            n_tiles=out.hidden_states[0].shape[0] if wants_vision else 0,
            image_sizes=sizes,
            features=list(feats),
            tiles=tiles,
            pixels=stack_tiles(bound.get("pixel_values"), tiles) if wants_vision else None,
        )

    def grid_coords(self, source: torch.Tensor, n_original: torch.Tensor, vision: Any) -> torch.Tensor:
        """(row, col) of each visual token (``source``: its index among the sample's original ones) in the base
        grid, by index modulo the grid (B, Nv, 2)."""
        rows, cols = self.patch_grid
        src = source % (rows * cols)
        return torch.stack([src // cols, src % cols], -1)

    def vision_tokens(self, n_visual: int) -> int:
        """Tiles (``n_visual`` over one grid, at least 1) times the grid's patches plus [CLS]."""
        grid = self.patch_grid[0] * self.patch_grid[1]
        return max(1, round(n_visual / grid)) * (grid + 1)

    def signature(self) -> dict[str, Any]:
        vc = self.vision_config
        return {**super().signature(), "vision_hidden_size": vc.hidden_size, "image_size": vc.image_size,
                "patch_size": vc.patch_size}
