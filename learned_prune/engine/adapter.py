"""Where the engine finds things inside an HF LLaVA model (LLaVA-1.5 and LLaVA-NeXT): one read-only view."""

from __future__ import annotations

import torch
from torch import nn


class LlavaAdapter:
    """Read-only view of the parts of an HF ``Llava*ForConditionalGeneration`` the engine uses."""

    def __init__(self, model: nn.Module) -> None:
        inner = getattr(model, "model", None)
        lm = getattr(inner, "language_model", None)
        if inner is None or lm is None or not hasattr(inner, "vision_tower"):
            raise TypeError(
                f"{type(model).__name__} is not an HF LLaVA model: expected `.model.language_model` and "
                "`.model.vision_tower` (LlavaForConditionalGeneration / LlavaNextForConditionalGeneration)"
            )
        for part in ("layers", "embed_tokens", "norm", "rotary_emb"):
            if not hasattr(lm, part):
                raise TypeError(
                    f"the language model {type(lm).__name__} has no `{part}`: only Llama-like decoders are supported"
                )
        self.model = model
        self.inner = inner
        self.lm = lm
        self.config = model.config
        self.text_config = lm.config
        self.vision_tower = inner.vision_tower
        self.vision_config = self.vision_tower.config
        self.projector = inner.multi_modal_projector
        self.is_next = hasattr(inner, "pack_image_features")
        self.image_token_id = int(self.config.image_token_id)
        self.feature_layer = self.config.vision_feature_layer
        self.select_strategy = self.config.vision_feature_select_strategy
        side = self.vision_config.image_size // self.vision_config.patch_size
        self.patch_grid = (side, side)

    @property
    def num_layers(self) -> int:
        return len(self.lm.layers)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The multi-modal projector on pre-projector vision features (cast to the projector's dtype)."""
        return self.projector(features.to(self.projector.linear_1.weight.dtype))

    def vision_layers(self) -> nn.ModuleList:
        tower = getattr(self.vision_tower, "vision_model", self.vision_tower)
        return tower.encoder.layers

    def tiles_per_image(self, image_sizes: torch.Tensor | None) -> list[int]:
        """Encoded tiles of each image (LLaVA-NeXT: the base view + its crops) for ``image_sizes`` (N, 2)."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        return [
            image_size_to_num_patches(
                image_size=s, grid_pinpoints=self.config.image_grid_pinpoints, patch_size=self.vision_config.image_size
            )
            for s in image_sizes
        ]

    def token_sources(self, n_tiles: int, image_sizes: torch.Tensor | None) -> torch.Tensor:
        """For every image token the backbone will insert, the flat index (tile * P + patch) of
        the vision patch it comes from; -1 for LLaVA-NeXT's row-end newline tokens."""
        P = self.patch_grid[0] * self.patch_grid[1]
        flat = torch.arange(n_tiles * P, dtype=torch.float32).view(n_tiles, P, 1)
        if not self.is_next:
            return flat.view(-1).long()
        packed, _ = self.inner.pack_image_features(
            list(torch.split(flat, self.tiles_per_image(image_sizes), dim=0)),
            image_sizes,
            vision_feature_select_strategy=self.select_strategy,
            image_newline=torch.tensor([-1.0]),
        )
        return torch.cat(packed).view(-1).round().long()
