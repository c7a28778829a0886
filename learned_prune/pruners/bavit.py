"""BAViT: background-aware token dropping with a small foreground classifier (arXiv 2410.09324).

The paper (no official code) trains a small ViT — 2 layers, or 10 in its deeper variant — with a
per-token linear classifier on foreground/background labels from segmentation masks or boxes, and
drops the background tokens before the frozen backbone. Here:

* the classifier reads the backbone's own patch embeddings (the vision tower's input after its
  patchify convolution, position embeddings and pre-norm: ``hidden_states[0]``) through a linear
  map to ``width`` and ``depth`` pre-norm transformer layers; re-using the frozen patchify keeps
  the head tiny and tied to the backbone's tokenisation (the paper patchifies with its own stem);
* tokens are dropped at the ``vision`` site, after the tower and before the projector (the engine
  has no site inside the tower), so the saving is in the LLM, where most of the prefill is;
* kept tokens keep their original RoPE positions (``repack_positions=False``, unlike the vision
  site's default of re-packing them): background dropping is spatial, and an LLM that only saw
  whole images reads a foreground that keeps its place in the grid (the embedded backbone's
  comparison: checkpoints/bavit-tiny/README.md); ``repack_positions=True`` gives the re-packed variant;
* inference keeps the tokens whose foreground probability exceeds ``threshold`` (an adaptive,
  per-image count; at least ``min_keep``), or with a budget ``keep`` the most probable ones.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..engine.state import PruneState, Selection
from .base import resolve_keep, topk_selection
from .learned import LearnedHead


class BAViTHead(LearnedHead):
    """A small ViT over the patch embeddings with a per-token foreground/background classifier."""

    method = "bavit"
    needs = ("vision_grid",)  # reads pre-projector patch features of one square grid (docs/families.md)
    display_name = "BAViT"
    adaptive = True  # the threshold sets the kept count per image
    accepts_keep = True  # ... but a budget `keep` may replace it at inference

    def __init__(self, vision_hidden: int, width: int = 64, depth: int = 2, heads: int = 4,
                 threshold: float = 0.5, min_keep: int = 1, keep: int | float | None = None,
                 repack_positions: bool = False) -> None:
        super().__init__()
        if not 0 < threshold < 1:
            raise ValueError(f"BAViT threshold={threshold}: must lie in (0, 1)")
        if width % heads:
            raise ValueError(f"BAViT width={width} must be a multiple of heads={heads}")
        self.vision_hidden, self.width, self.depth, self.heads = vision_hidden, width, depth, heads
        self.threshold, self.min_keep, self.keep = threshold, min_keep, keep
        self.repack_positions = repack_positions
        self.embed = nn.Linear(vision_hidden, width)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.classify = nn.Linear(width, 2)  # logits (background, foreground)

    def logits(self, patch_embeddings: torch.Tensor) -> torch.Tensor:
        """Foreground/background logits (B, N, 2) of patch embeddings (B, N, vision_hidden)."""
        x = self.encoder(self.embed(patch_embeddings))
        return self.classify(self.norm(x))

    # ---- pruner protocol -----------------------------------------------------------------
    def sites(self, adapter: Any) -> list[str]:
        return ["vision"]

    def prepare(self, adapter: Any) -> None:
        if adapter.vision_config.hidden_size != self.vision_hidden:
            raise ValueError(
                f"this BAViT head reads vision features of size {self.vision_hidden}, but the model's vision tower "
                f"has hidden size {adapter.vision_config.hidden_size}; train a head for this backbone"
            )
        super().prepare(adapter)

    def foreground_prob(self, state: PruneState) -> torch.Tensor:
        feats = state.vision_features(layer=0)  # the tower's input: patch embeddings + positions, pre-norm
        with torch.autocast(feats.device.type, enabled=False):
            logits = self.logits(feats.float())
        return logits.softmax(-1)[..., 1].masked_fill(~state.visual_valid, 0)

    def select(self, state: PruneState) -> Selection:
        p = self.foreground_prob(state)
        valid = state.visual_valid
        if state.mode == "soft":
            return Selection(keep_prob=p)
        if self.keep is not None:
            k = resolve_keep(self.keep, state.n_visual_original).clamp(max=state.n_visual)
        else:
            k = ((p > self.threshold) & valid).sum(1).clamp(min=self.min_keep).clamp(max=state.n_visual)
        self._last_kept = k
        return Selection(indices=topk_selection(p, valid, k))

    def budget_loss(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        zero = self.classify.weight.new_zeros(())
        return zero, {}
