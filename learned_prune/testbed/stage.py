"""What the stages of the testbed recipe share: AdamW with warm-up + cosine over the parts a stage
trains, and the export of the whole HF LLaVA (``save_pretrained``) as the next stage's input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from ..modules.lr_schedule import schedule_length, warmup_cosine


class StageModule(pl.LightningModule):
    """Base of a recipe stage: ``model`` (an HF LLaVA) with only ``trained()`` parts learning.

    Subclasses call ``super().__init__(model, processor)`` then ``self.save_hyperparameters(...)`` with
    ``lr``, ``weight_decay``, ``warmup_steps``, ``max_steps`` among them, and name what trains in
    :meth:`trained` (the rest of the backbone stays frozen, in eval mode).
    """

    def __init__(self, model: nn.Module, processor: Any = None) -> None:
        super().__init__()
        self.model = model
        self.processor = processor

    def trained(self) -> list[nn.Module]:  # pragma: no cover - abstract
        """The parts of the backbone this stage trains."""
        raise NotImplementedError

    def freeze_all_but_trained(self) -> None:
        self.model.requires_grad_(False)
        for part in self.trained():
            part.requires_grad_(True)

    def on_fit_start(self) -> None:
        self.model.eval()  # backbones are built in eval mode; only the trained parts train
        for part in self.trained():
            part.train()

    def configure_optimizers(self) -> dict:
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = schedule_length(self.hparams.max_steps, self.trainer)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": warmup_cosine(opt, total, self.hparams.warmup_steps),
                                                   "interval": "step"}}

    def export(self, directory: str | Path) -> Path:
        """Write the whole HF LLaVA and its processor (``save_pretrained``) on global rank 0."""
        directory = Path(directory)
        if self._trainer is not None and not self.trainer.is_global_zero:
            return directory
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory, safe_serialization=True)
        if self.processor is not None:
            self.processor.save_pretrained(directory)
        return directory
