"""``downsample``: the image re-encoded by the vision tower at the resolution whose patch grid fits the budget."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..engine.state import PruneState, Selection
from .base import Pruner
from .pool import budget_grid, centre_slots


def resize_pixels(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``pixels`` (N, C, H, W) resized to ``size`` with antialiased bicubic interpolation (in float32).

    The processor's normalisation is a per-channel affine map and the interpolation weights sum to
    one, so resizing the normalised tensor equals normalising the resized image (no 8-bit rounding,
    no clipping of bicubic overshoot). Antialiased bicubic is the kernel of PIL's ``BICUBIC`` resize,
    the one VTC-Bench downsamples with. A tensor already at ``size`` is returned unchanged.
    """
    if tuple(pixels.shape[-2:]) == tuple(size):
        return pixels
    return F.interpolate(pixels.float(), size=size, mode="bicubic", align_corners=False, antialias=True)


@dataclass
class Downsample(Pruner):
    """Re-encode each image at a lower resolution so that its patch grid holds the budget.

    The baseline of VTC-Bench (Liao et al., "Are We Using the Right Benchmark: An Evaluation
    Framework for Visual Token Compression Methods", arXiv 2510.07143; github.com/Chenfei-Liao/VTC-Bench),
    which shows plain image downsampling beating many token-compression methods. The kept grid is
    ``h x w = pooled_grid(rows, cols, keep)`` (as ``pool``): the processor's pixel tensor is resized
    to ``(h * patch, w * patch)`` (:func:`resize_pixels`), the tower re-encodes it with position
    embeddings interpolated to ``h x w``, and the features at the backbone's feature layer (and
    select strategy: [CLS] dropped) are projected; cell ``(i, j)`` takes the slot of the original
    patch at its centre, so the LLM sees the cells in raster order.

    Departures from VTC-Bench: it resizes the raw image by a fixed factor (3) with PIL before
    Qwen2-VL's native-resolution processor; here LLaVA's fixed-resolution tower needs its
    processed crop resized to exactly the budget's grid and its learned position embeddings
    interpolated (bicubic, HF's ``interpolate_pos_encoding``). The full-resolution encoding still
    runs first (the engine acts after ``get_image_features``), so this saves LLM tokens, not tower
    compute. On LLaVA-NeXT, as ``pool``, only each image's base (global) view is re-encoded and its
    high-resolution tiles are dropped; with several images per sample only the first is kept.
    """

    site: str = "vision"
    needs = ("vision_grid",)  # refused on a family whose tower lacks it (docs/families.md)

    def prepare(self, adapter: Any) -> None:
        if adapter.select_strategy != "default":
            raise ValueError(
                f"downsample needs vision_feature_select_strategy='default' (patch tokens only), the backbone has "
                f"{adapter.select_strategy!r}: its [CLS] token would be one more visual token than the re-encoded grid"
            )

    def select(self, state: PruneState) -> Selection:
        rows, cols, h, w = budget_grid(state, self.keep, "downsample")
        images = state.image_tiles()
        if not all(images):
            raise ValueError(f"downsample needs an image in every sample; samples {[i for i, s in enumerate(images) if not s]} "
                             "have none (batch text-only prompts without a pruner)")
        first = [sample[0].first_tile for sample in images]  # each sample's first image (LLaVA-NeXT: its base view)
        pixels = state.tile_pixels()[torch.tensor(first)]
        patch_h, patch_w = pixels.shape[-2] // rows, pixels.shape[-1] // cols
        values = state.encode_pixels(resize_pixels(pixels, (h * patch_h, w * patch_w)))  # (B, h*w, Dv)
        slots = centre_slots(rows, cols, h, w).to(values.device)
        return Selection(indices=slots[None].expand(len(first), -1), values=values, values_space="vision")
