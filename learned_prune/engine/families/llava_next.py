"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): LLaVA-1.5's parts, images encoded as a base view plus
any-resolution crops, unpadded and packed with a newline token at the end of each row."""

from __future__ import annotations

from typing import Any

import torch

from .llava import LlavaAdapter


class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT: :class:`LlavaAdapter` with tiles per image and the packed token layout (newlines -1)."""

    family = "llava_next"
    is_next = True

    def tiles_per_image(self, image_sizes: Any, n_images: int | None = None) -> list[int]:
        """Encoded tiles of each image (the base view + its crops) for ``image_sizes`` (N, 2)."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        return [
            image_size_to_num_patches(
                image_size=s, grid_pinpoints=self.config.image_grid_pinpoints, patch_size=self.vision_config.image_size
            )
            for s in image_sizes
        ]

    def token_sources(self, n_tiles: int, image_sizes: torch.Tensor | None) -> torch.Tensor:
        """For every image token, the flat index (tile * P + patch) of its vision patch; -1 for the row-end
        newline tokens (the backbone's own ``pack_image_features`` run on the indices)."""
        P = self.patch_grid[0] * self.patch_grid[1]
        flat = torch.arange(n_tiles * P, dtype=torch.float32).view(n_tiles, P, 1)
        packed, _ = self.inner.pack_image_features(
            list(torch.split(flat, self.tiles_per_image(image_sizes), dim=0)),
            image_sizes,
            vision_feature_select_strategy=self.select_strategy,
            image_newline=torch.tensor([-1.0]),
        )
        return torch.cat(packed).view(-1).round().long()
