"""``module=bavit``: train a BAViT foreground classifier on the frozen backbone's patch embeddings.

Training needs no LLM pass: cross-entropy of the per-token foreground/background logits against
the per-patch masks the data provides (``patch_mask``: ShapesVQA's, or COCO boxes/polygons with
``data=coco_masks``), grown by ``margin`` patches on the patch grid. The margin is a choice the paper
leaves open (it derives labels from masks or boxes): patches that touch an object carry its edge,
and on the embedded backbone the foreground alone answers far worse than the foreground plus a
one-patch border (checkpoints/bavit-tiny/README.md), so the default ``margin=1`` labels that border
as foreground; ``margin=0`` trains on the masks as given.
Validation reports token accuracy and foreground F1 (torchmetrics) and, on VQA data, also runs the
head as a pruner (hard mode, greedy answers, kept tokens, from the base module).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import BinaryAccuracy, BinaryF1Score

from ..pruners.bavit import BAViTHead
from .learned import HeadFactory, LearnedHead, LearnedPrunerModule


def grow_patch_mask(mask: torch.Tensor, margin: int) -> torch.Tensor:
    """``mask`` (B, N) of a square patch grid, grown by ``margin`` patches (8-neighbourhood) on the grid."""
    if margin <= 0:
        return mask
    side = math.isqrt(mask.shape[1])
    if side * side != mask.shape[1]:
        raise ValueError(f"margin={margin} needs a square patch grid; got {mask.shape[1]} patches (set margin=0)")
    grid = mask.float().view(-1, 1, side, side)
    return F.max_pool2d(grid, 2 * margin + 1, stride=1, padding=margin).flatten(1) > 0


class BAViTModule(LearnedPrunerModule):
    """Trains a :class:`~learned_prune.pruners.bavit.BAViTHead` for ``model`` on patch masks (the head's
    hyper-parameters: ``module.head`` in ``configs/module/bavit.yaml``); ``margin`` grows the labels."""

    def __init__(self, model: nn.Module, processor: Any = None, head: LearnedHead | HeadFactory = BAViTHead,
                 margin: int = 1, **kwargs: Any) -> None:
        if margin < 0:
            raise ValueError(f"BAViT margin={margin}: the label margin is a number of patches >= 0")
        kwargs.setdefault("budget_weight", 0.0)
        kwargs.setdefault("distill_weight", 0.0)
        super().__init__(model, head, processor=processor, **kwargs)
        self.token_acc = nn.ModuleDict({f"{s}_": BinaryAccuracy() for s in ("train", "val", "test")})
        self.token_f1 = nn.ModuleDict({f"{s}_": BinaryF1Score() for s in ("train", "val", "test")})  # "train" is a reserved name

    def head_sizes(self, model: nn.Module) -> dict[str, int]:
        """The classifier reads the vision tower's patch embeddings: its width."""
        return {"vision_hidden": model.config.vision_config.hidden_size}

    def patch_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The frozen tower's input tokens (patch embeddings + positions, pre-norm), [CLS] dropped."""
        if pixel_values.dim() != 4:
            raise ValueError("BAViT training takes single-view images (B, 3, H, W); LLaVA-NeXT tiles are not supported")
        tower = self.model.model.vision_tower
        tower = getattr(tower, "vision_model", tower)
        with torch.no_grad():
            return tower.pre_layrnorm(tower.embeddings(pixel_values.to(tower.embeddings.patch_embedding.weight.dtype)))[:, 1:]

    def _token_step(self, batch: dict, stage: str) -> torch.Tensor:
        if "patch_mask" not in batch:
            raise KeyError("BAViT needs per-patch foreground labels (`patch_mask`) in the batches: "
                           "use data=shapes or data=coco_masks")
        logits = self.head.logits(self.patch_embeddings(batch["pixel_values"]).float())
        target = grow_patch_mask(batch["patch_mask"].bool(), self.hparams.margin).long()
        if logits.shape[1] != target.shape[1]:
            raise ValueError(f"the tower gives {logits.shape[1]} patches but the masks have {target.shape[1]}: "
                             "the data's image_size/patch_size must match the backbone's")
        loss = F.cross_entropy(logits.flatten(0, 1), target.flatten())
        prob = logits.softmax(-1)[..., 1].detach().flatten()
        self.token_acc[stage + "_"].update(prob, target.flatten())
        self.token_f1[stage + "_"].update(prob, target.flatten())
        bs = target.shape[0]
        self.log(f"{stage}/token_loss", loss, batch_size=bs, prog_bar=stage == "train")
        self.log(f"{stage}/token_acc", self.token_acc[stage + "_"], batch_size=bs, on_step=stage == "train", on_epoch=True)
        self.log(f"{stage}/token_f1", self.token_f1[stage + "_"], batch_size=bs, on_step=stage == "train", on_epoch=True,
                 prog_bar=True)
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self._token_step(batch, "train")
        self.log("train/loss", loss, batch_size=batch["pixel_values"].shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        with torch.no_grad():
            self._token_step(batch, "val")
        if "answers" in batch:  # VQA data (ShapesVQA): also answer with the head pruning
            super().validation_step(batch, batch_idx)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        with torch.no_grad():
            self._token_step(batch, "test")
        if "answers" in batch:
            super().test_step(batch, batch_idx)
