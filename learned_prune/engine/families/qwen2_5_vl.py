"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): a window-attention ViT without [CLS] on each image's own
patch grid, a 2x2 patch merger as the projector, a Qwen2 decoder with multimodal RoPE (M-RoPE).

Positions: HF gives the decoder (3, B, L) M-RoPE ids (temporal, height, width; text tokens have three
equal ids, an image's tokens its grid coordinates offset by the text before it, and the text after an
image continues at the image's start + its larger grid side), or (4, B, L) with the text ids first
during ``generate()``. The engine keeps them as (B, L, 3). A pruned token keeps its ids at every site
by default (the image's grid and ``rope_deltas`` stay as HF computed them, so decoding continues at
the positions HF gives); ``repack_positions=True`` shifts all three ids of every later token down by
the number removed (there is no "as if never in the prompt" layout for an M-RoPE image).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..vision import VisionCapture
from .base import FamilyAdapter


class Qwen2_5_VLAdapter(FamilyAdapter):
    """Read-only view of an HF ``Qwen2_5_VLForConditionalGeneration`` for the engine."""

    family = "qwen2_5_vl"
    mrope = True
    signals = frozenset()
    no_signal = ("Qwen2.5-VL's vision tower has no [CLS] token and encodes each image on its own grid with window "
                 "attention, merged 2x2 into each visual token")

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        visual = getattr(self.inner, "visual", None)
        if visual is None:
            raise TypeError(f"{type(model).__name__} is not an HF Qwen-VL model: expected `.model.visual`")
        if getattr(self.text_config, "use_sliding_window", False):
            raise ValueError(f"the {self.family} decoder uses sliding-window attention (text_config.use_sliding_window"
                             "=True), whose masks the pruning engine does not build; load it with use_sliding_window=False")
        self.vision_tower = visual
        self.vision_config = visual.config
        self.projector = visual.merger
        self.merge = int(self.vision_config.spatial_merge_size)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The patch merger on (..., merge**2 * Dv) groups of patch features (its norm runs per patch)."""
        shape = features.shape[:-1]
        x = features.reshape(-1, self.vision_config.hidden_size)
        return self.projector(x.to(self.projector.mlp[0].weight.dtype)).view(*shape, -1)

    def vision_layers(self) -> nn.ModuleList:
        return self.vision_tower.blocks

    # ---- M-RoPE positions: (B, L, 3) in the engine --------------------------------------
    def prefill_positions(self, position_ids: torch.Tensor | None, B: int, q: int, device: Any) -> torch.Tensor:
        if position_ids is None:
            return torch.arange(q, device=device)[None, :, None].expand(B, q, 3)
        pos = position_ids.to(device)
        if pos.dim() == 2:
            return pos.expand(B, q)[..., None].expand(B, q, 3)
        if pos.shape[0] == 4:  # generate(): text ids first, then the three M-RoPE rows
            pos = pos[1:]
        return pos.expand(3, B, q).permute(1, 2, 0)

    def step_positions(self, position_ids: torch.Tensor | None, B: int, q: int, device: Any) -> torch.Tensor | None:
        if position_ids is None:
            return None
        pos = position_ids.to(device)
        if pos.dim() == 3:  # a decoded token is text: its three M-RoPE ids are equal
            pos = pos[-3]
        return pos.expand(B, q)

    def from_scalar(self, pos: torch.Tensor) -> torch.Tensor:
        return pos[..., None].expand(*pos.shape, 3)

    def rope(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lm.rotary_emb(x, pos.permute(2, 0, 1) if pos.dim() == 3 else pos)

    def layer_position_ids(self, pos: torch.Tensor) -> torch.Tensor | None:
        return None  # as HF: the decoder layers get no text ids unless sequences are packed

    # ---- images --------------------------------------------------------------------------
    def check_inputs(self, kwargs: dict) -> None:
        self.refuse_video(kwargs)

    def vision_capture(self, out: Any, bound: dict, wants_vision: bool) -> VisionCapture:
        feats = list(out.pooler_output)
        grid = bound.get("image_grid_thw")
        return VisionCapture(n_features=sum(int(f.shape[0]) for f in feats), hidden_states=None, n_tiles=len(feats),
                             image_sizes=grid, features=feats, tiles=[1] * len(feats), pixels=None)

    def grid_coords(self, source: torch.Tensor, n_original: torch.Tensor, vision: Any) -> torch.Tensor:
        """(row, col) of each visual token in its own image's merged grid, (B, Nv, 2): a sample's images follow
        each other in ``image_grid_thw`` order, each row-major over (h / merge, w / merge)."""
        grids = [] if vision is None or vision.image_sizes is None else vision.image_sizes.tolist()
        tables, it = [], iter(grids)
        for n in n_original.tolist():
            coords: list[torch.Tensor] = []
            while sum(int(c.shape[0]) for c in coords) < n:
                t, h, w = next(it)
                r, c = torch.meshgrid(torch.arange(h // self.merge), torch.arange(w // self.merge), indexing="ij")
                coords.append(torch.stack([r.flatten(), c.flatten()], -1).repeat(t, 1))
            tables.append(torch.cat(coords) if coords else torch.zeros(0, 2, dtype=torch.long))
        flat = torch.cat(tables).to(source.device)
        start = (torch.cumsum(n_original, 0) - n_original).to(source.device)
        return flat[(start[:, None] + source).clamp(0, max(flat.shape[0] - 1, 0))]

    def vision_tokens(self, n_visual: int) -> int:
        """Each visual token merges ``merge**2`` patches (window attention counted as full attention)."""
        return n_visual * self.merge**2

    def signature(self) -> dict[str, Any]:
        vc = self.vision_config
        return {**super().signature(), "vision_hidden_size": vc.hidden_size, "patch_size": vc.patch_size,
                "spatial_merge_size": vc.spatial_merge_size}
