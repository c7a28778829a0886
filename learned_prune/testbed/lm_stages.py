"""Two next-token stages of the testbed recipe, after LLaVA's own (Liu et al., 2023):

* ``module=text_pretrain``: the small language model learns language first, from text alone: each
  ShapesVQA scene's description, its question and its answer as one sentence
  (``"a large red circle , a small blue cross . what color is the cross ? blue"``), next-token loss on
  every token; only the LLM (embeddings, decoder, LM head) trains.
* ``module=align``: projector alignment (LLaVA's stage 1): the prompt is the image and "describe the
  image .", the target its caption; the vision tower and the LLM stay frozen and only the projector
  trains, so the projected image tokens come to speak the LLM's language.

Instruction tuning on the VQA mix (LLaVA's stage 2) is ``module=backbone`` started from the aligned
model. Each stage exports the whole HF LLaVA for the next.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from torchmetrics import MeanMetric

from .contrastive import describe
from .datamodule import ShapesStageDataModule
from .stage import StageModule

DESCRIBE = "describe the image ."


def next_token_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Share of labelled positions (labels != -100) whose next token is the argmax."""
    pred, target = logits[:, :-1].argmax(-1), labels[:, 1:]
    mask = target != -100
    return (pred[mask] == target[mask]).float().mean() if bool(mask.any()) else logits.new_zeros(())


class NextTokenStage(StageModule):
    """A stage trained with the HF model's own next-token loss on ``labels``; validation logs the
    next-token accuracy on the labelled tokens (``val/next_token_acc``, what the recipe's checkpoint keeps)."""

    def __init__(self, model: nn.Module, processor: Any = None, lr: float = 1e-3, weight_decay: float = 0.01,
                 warmup_steps: int = 100, max_steps: int | None = None, export_dir: str | None = None) -> None:
        super().__init__(model, processor)
        self.save_hyperparameters(ignore=["model", "processor"])
        self.freeze_all_but_trained()
        self.val_acc = MeanMetric()

    def _forward(self, batch: dict[str, Any]) -> Any:
        keys = ("input_ids", "attention_mask", "pixel_values", "labels")
        return self.model(**{k: batch[k] for k in keys if k in batch})

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self._forward(batch)
        self.log("train/loss", out.loss, prog_bar=True, batch_size=len(batch["input_ids"]))
        return out.loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out = self._forward(batch)
        self.val_acc.update(next_token_accuracy(out.logits, batch["labels"]))
        self.log("val/loss", out.loss, batch_size=len(batch["input_ids"]), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self.log("val/next_token_acc", self.val_acc.compute(), prog_bar=True, sync_dist=True)
        self.val_acc.reset()


class TextPretrainModule(NextTokenStage):
    """``module=text_pretrain``: the LLM alone, on scene descriptions, questions and answers as text."""

    def trained(self) -> list[nn.Module]:
        return [self.model.model.language_model, self.model.lm_head]


class ProjectorAlignModule(NextTokenStage):
    """``module=align``: the projector alone, on image -> caption (tower and LLM frozen)."""

    def trained(self) -> list[nn.Module]:
        return [self.model.model.multi_modal_projector]


class SceneText:
    """Collate ShapesVQA samples into text-only LM batches: ``describe . question answer`` + EOS,
    right-padded, labels on every real token."""

    def __init__(self, processor: Any) -> None:
        self.tokenizer = processor.tokenizer

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        tok = self.tokenizer
        texts = [f"{describe(s['objects'])} . {s['question']} {s['answer']}{tok.eos_token}" for s in samples]
        side, tok.padding_side = tok.padding_side, "right"
        try:
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            tok.padding_side = side
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


class CaptionAsAnswer(Dataset):
    """A ShapesVQA split whose question is "describe the image ." and whose answer is the scene's caption."""

    def __init__(self, scenes: Dataset) -> None:
        self.scenes = scenes

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.scenes[index])
        item.update(question=DESCRIBE, answer=describe(item["objects"]), qtype="caption")
        return item


class ShapesTextDataModule(ShapesStageDataModule):
    """ShapesVQA as text (``data=shapes_text``): for ``module=text_pretrain``."""

    collator = SceneText


class ShapesAlignDataModule(ShapesStageDataModule):
    """ShapesVQA images with their captions as the answer (``data=shapes_align``): for ``module=align``."""

    def __init__(self, processor: Any = None, **kwargs: Any) -> None:
        super().__init__(processor, **kwargs)
        self.train_set, self.val_set, self.test_set = (CaptionAsAnswer(d) for d in
                                                       (self.train_set, self.val_set, self.test_set))
