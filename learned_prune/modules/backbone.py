"""``module=backbone``: train the whole tiny LLaVA on ShapesVQA (the embedded default backbone).

Loss = next-token cross-entropy on the answer tokens only, plus an auxiliary per-patch loss on
the vision tower's feature layer (the layer LLaVA feeds its projector): a linear probe predicts
each patch's foreground/background label from the ShapesVQA masks (and, when the batch carries
them, the colour and shape of the object covering the patch). The probe is training-only and
is not saved with the model; it teaches the tower *what* is where quickly, so that the LLM's
harder job — routing from the question to the right patches — starts from useful features.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..evaluation.vqa import AnswerAccuracy, greedy_answers


class BackboneModule(pl.LightningModule):
    """Trains every parameter of an HF LLaVA (vision tower, projector, LLM) on a VQA data module."""

    def __init__(
        self,
        model: nn.Module,
        processor: Any = None,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 200,
        max_steps: int | None = None,
        aux_patch_weight: float = 0.5,
        n_patch_classes: int = 0,
        export_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.processor = processor
        self.save_hyperparameters(ignore=["model", "processor"])
        vdim = model.config.vision_config.hidden_size
        self.patch_probe = nn.Linear(vdim, 1 + n_patch_classes)  # training-only, never exported
        self.train_acc = AnswerAccuracy()
        self.val_acc = AnswerAccuracy()
        self.test_acc = AnswerAccuracy()
        self.train_aux = MeanMetric()

    def on_fit_start(self) -> None:
        self.model.train()  # backbones are built in eval mode; here every part is trained

    # ---- steps -----------------------------------------------------------------------------
    def _losses(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, Any]:
        inner = self.model.model
        vision = inner.get_image_features(pixel_values=batch["pixel_values"], output_hidden_states=True)
        out = self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=vision.pooler_output)},
            labels=batch["labels"],
            use_cache=False,
        )
        aux = torch.zeros((), device=out.loss.device)
        if self.hparams.aux_patch_weight > 0 and "patch_mask" in batch:
            feats = vision.hidden_states[self.model.config.vision_feature_layer][:, 1:]
            logits = self.patch_probe(feats)
            aux = F.binary_cross_entropy_with_logits(logits[..., 0], batch["patch_mask"].float())
            if logits.shape[-1] > 1 and "patch_labels" in batch:
                aux = aux + F.cross_entropy(logits[..., 1:].flatten(0, 1), batch["patch_labels"].flatten(), ignore_index=-100)
        return out.loss, aux, out

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        lm_loss, aux, out = self._losses(batch)
        loss = lm_loss + self.hparams.aux_patch_weight * aux
        self.train_acc.update_from_logits(out.logits, batch["labels"], batch.get("qtypes"))
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/lm_loss", lm_loss, batch_size=bs)
        self.log("train/aux_loss", aux, batch_size=bs)
        self.log("train/acc", self.train_acc, prog_bar=True, on_step=True, on_epoch=False, batch_size=bs)
        return loss

    def _eval_step(self, batch: dict, metric: AnswerAccuracy, stage: str) -> None:
        answers = greedy_answers(self.model, self.processor, batch)
        metric.update(answers, batch["answers"], batch.get("qtypes"))
        lm_loss, _, _ = self._losses(batch)
        self.log(f"{stage}/loss", lm_loss, batch_size=len(answers), sync_dist=True)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, self.val_acc, "val")

    def on_validation_epoch_end(self) -> None:
        for k, v in self.val_acc.compute_all().items():
            self.log(f"val/{k}", v, prog_bar=k == "acc", sync_dist=True)
        self.val_acc.reset()

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, self.test_acc, "test")

    def on_test_epoch_end(self) -> None:
        for k, v in self.test_acc.compute_all().items():
            self.log(f"test/{k}", v, sync_dist=True)
        self.test_acc.reset()

    # ---- optimisation --------------------------------------------------------------------
    def configure_optimizers(self) -> dict:
        decay, no_decay = [], []
        for n, p in self.named_parameters():
            if p.requires_grad:
                (no_decay if p.dim() < 2 or "norm" in n or "embedding" in n else decay).append(p)
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr,
            betas=(0.9, 0.98),
        )
        total = self.hparams.max_steps or self.trainer.estimated_stepping_batches
        warm = max(1, min(self.hparams.warmup_steps, total // 10 if total else 1))

        def schedule(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            progress = min(1.0, (step - warm) / max(1, total - warm))
            return 0.05 + 0.95 * 0.5 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item())

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- export --------------------------------------------------------------------------
    def export(self, directory: str | Path) -> Path:
        """Write the trained model, tokenizer and image processor with ``save_pretrained``."""
        directory = Path(directory)
        if self._trainer is not None and not self.trainer.is_global_zero:
            return directory
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory, safe_serialization=True)
        if self.processor is not None:
            self.processor.save_pretrained(directory)
        return directory
