"""What a pruner sees at a site: :class:`PruneState`, its whole view of the model and the sequence.

Plain tensors are properties; costly signals (attention rows, vision-tower signals) are methods,
computed on demand and cached for the site. Pruners read the model only through this class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from . import attention, vision
from .selection import LayerTrace, Selection
from .tokens import gather_rows

if TYPE_CHECKING:  # pragma: no cover
    from .families import FamilyAdapter
    from .tokens import TokenSequence
    from .vision import ImageTiles, VisionCapture

__all__ = ["LayerTrace", "PruneState", "Selection"]


def _sequence_view(name: str, doc: str) -> property:
    """A read-only :class:`PruneState` property: the current sequence's ``name``."""
    return property(lambda self: getattr(self.seq, name), doc=doc)


@dataclass
class PruneState:
    """Everything a pruner may read at a site (or, for an observer, after a layer ran).

    Shapes: B samples, L current sequence length, Nv the largest visual-token count of the
    batch (``visual_valid`` marks real entries), D hidden size. ``seq``, ``adapter`` and ``vision``
    are the engine's own records; pruners use the properties and methods below.
    """

    site: str
    layer: int
    mode: str
    seq: "TokenSequence"
    adapter: "FamilyAdapter"
    visual_pos: torch.Tensor  # (B, Nv) positions of visual tokens in the current sequence (0 where invalid)
    visual_valid: torch.Tensor  # (B, Nv) bool
    vision: "VisionCapture | None" = None
    soft_eps: float = 1e-6
    cache: dict = field(default_factory=dict)

    # ---- the sequence --------------------------------------------------------------------
    hidden = _sequence_view("hidden", "Hidden states entering the site's layer (at the vision site: the projected "
                                      "embeddings), (B, L, D).")
    n_visual_original = _sequence_view("n_visual_original", "Visual tokens per sample before any pruning, (B,): what "
                                                            "ratio budgets refer to.")
    token_keep_prob = _sequence_view("keep_prob", "Soft mode: the cumulative keep-probability of every token, (B, L) "
                                                  "(1 for text); None in hard mode.")
    position_ids = _sequence_view("pos", "(B, L) RoPE position ids of the current tokens.")
    valid = _sequence_view("valid", "(B, L) bool: real tokens (False on padding).")
    is_visual = _sequence_view("is_visual", "(B, L) bool: visual tokens (padding included: and it with valid).")
    prompt_valid = _sequence_view("prompt_valid", "(B, L) bool: real prompt tokens (in a teacher-forced pass the "
                                                  "answer tokens are left out).")
    extras = _sequence_view("extras", "Per-token (B, L) tensors a pruner keeps across layers (they follow the tokens "
                                      "through every prune).")

    @property
    def visual_hidden(self) -> torch.Tensor:
        """Hidden states of the visual tokens, (B, Nv, D)."""
        return gather_rows(self.seq.hidden, self.visual_pos)

    @property
    def n_visual(self) -> torch.Tensor:
        """Visual tokens per sample at this site, (B,)."""
        return self.visual_valid.sum(1)

    @property
    def visual_source(self) -> torch.Tensor:
        """Index of each current visual token among the sample's original visual tokens, (B, Nv)."""
        return torch.gather(self.seq.visual_rank, 1, self.visual_pos)

    @property
    def keep_prob(self) -> torch.Tensor | None:
        """Soft mode: the cumulative keep-probability of each visual token so far, (B, Nv)."""
        if self.seq.keep_prob is None:
            return None
        return torch.gather(self.seq.keep_prob, 1, self.visual_pos)

    @property
    def instruction_mask(self) -> torch.Tensor:
        """(B, L) bool: the text tokens after the last visual token (the instruction)."""
        return self.seq.instruction_mask()

    # ---- the backbone --------------------------------------------------------------------
    @property
    def llm_depth(self) -> int:
        """Decoder layers of the LLM (what stage layouts scale by)."""
        return self.adapter.num_layers

    @property
    def vision_depth(self) -> int:
        """Encoder layers of the vision tower."""
        return len(self.adapter.vision_layers())

    @property
    def image_grid(self) -> tuple[int, int]:
        """(rows, cols) of one image's base patch grid (LLaVA-NeXT: the global view); a family whose images
        have grids of their own sizes (Qwen-VL) has none and raises."""
        grid = getattr(self.adapter, "patch_grid", None)
        if grid is None:
            raise ValueError(f"a {self.adapter.family} backbone encodes each image on a grid of its own size: there "
                             "is no single image grid (read the per-token grid_coords instead)")
        return grid

    @property
    def grid_coords(self) -> torch.Tensor:
        """(row, col) of each current visual token in its image's token grid, (B, Nv, 2) (the family adapter's
        layout: LLaVA's one base grid by token index; Qwen-VL each image's own merged grid)."""
        if "grid_coords" not in self.cache:
            self.cache["grid_coords"] = self.adapter.grid_coords(self.visual_source, self.n_visual_original, self.vision)
        return self.cache["grid_coords"]

    @property
    def any_resolution(self) -> bool:
        """True when images are encoded as several tiles (LLaVA-NeXT's base view + crops)."""
        return self.adapter.is_next

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The LLM's final norm (the one before ``lm_head``) applied to ``x`` (..., D)."""
        return self.adapter.lm.norm(x)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The backbone's multi-modal projector applied to pre-projector vision features (..., Dv)."""
        return self.adapter.project(features)

    def vision_post_layernorm(self, features: torch.Tensor) -> torch.Tensor:
        """The vision tower's final ``post_layernorm`` applied to features (..., Dv)."""
        return self.adapter.post_layernorm(features)

    # ---- LLM signals computed on demand --------------------------------------------------
    def attention(self, queries: str | torch.Tensor = "last", layer: str = "previous") -> torch.Tensor:
        """Head-mean softmax attention of query rows onto the visual tokens, (B, Nv).

        ``queries``: ``"last"`` (the last token, FastV/PDrop), ``"instruction"`` (mean over the
        instruction tokens, TransPrune), or a (B, L) bool mask. ``layer``: ``"previous"`` uses the
        attention of layer K-1 (FastV) from its captured keys; ``"current"`` uses layer K's own
        projections on the hidden states entering it (PyramidDrop). Only the requested query
        rows are projected: no full attention matrix, SDPA stays on.
        """
        return attention.llm_attention(self, queries, layer)

    def keys(self) -> torch.Tensor:
        """Post-RoPE keys of layer K-1 for the current sequence, (B, H_kv, L, head_dim)."""
        return attention.previous_layer_keys(self)

    # ---- vision-tower signals (vision site) ----------------------------------------------
    def cls_attention(self, layer: int = -2) -> torch.Tensor:
        """Head-mean [CLS]->patch attention of vision encoder layer ``layer``, per visual token (B, Nv);
        LLaVA-NeXT's row-end newline tokens get 0."""
        return vision.cls_attention(self, layer)

    def vision_features(self, layer: int | None = None) -> torch.Tensor:
        """Pre-projector patch features at encoder output ``layer`` (default: the layer the backbone
        feeds its projector), per visual token (B, Nv, Dv); newline tokens get zeros."""
        return vision.vision_features(self, layer)

    def vision_keys(self, layer: int = -1) -> torch.Tensor:
        """Head-mean keys of vision encoder layer ``layer`` per visual token, (B, Nv, head_dim)."""
        return vision.vision_keys(self, layer)

    @property
    def patch_index(self) -> torch.Tensor:
        """Flat vision-patch index (tile * P + patch) of each current visual token, (B, Nv); -1 for newlines."""
        return vision.token_patch_index(self)

    def image_tiles(self) -> list[list["ImageTiles"]]:
        """For each sample, its images in order: tiles among the encoded ones, tokens among its visual tokens."""
        return vision.image_tiles(self)

    def tile_cls_attention(self, layer: int = -2, heads: str = "mean") -> torch.Tensor:
        """[CLS]->patch attention of vision encoder layer ``layer`` for every encoded tile, (T, P) float32;
        ``heads``: ``"mean"`` or ``"sum"`` over the heads."""
        return vision.tile_cls_attention(self, layer, heads)

    def tile_keys(self, layer: int = -1) -> torch.Tensor:
        """Head-mean keys of vision encoder layer ``layer`` for every token of every tile, [CLS] first, (T, N, hd)."""
        return vision.tile_keys(self, layer)

    def tile_pixels(self) -> torch.Tensor:
        """Pixel values of every encoded tile, (T, C, H, W), as the vision tower read them (the processor's
        normalised tensor; LLaVA-NeXT: each image's base view, then its crops)."""
        return vision.tile_pixels(self)

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pre-projector features of the vision tower re-run on ``pixels`` (N, C, H, W) of any patch-multiple size
        (position embeddings interpolated), at the backbone's feature layer and select strategy, (N, tokens, Dv)."""
        return vision.encode_pixels(self, pixels)

    def tile_hidden(self, layer: int | None = None) -> torch.Tensor:
        """Raw vision hidden states of every encoded tile, [CLS] first, (T, N, Dv), at hidden-state index
        ``layer`` (default: the backbone's feature layer), before LLaVA-NeXT's unpadding."""
        return vision.tile_hidden(self, layer)
