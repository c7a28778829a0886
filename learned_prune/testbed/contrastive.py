"""``module=contrastive``: CLIP-style contrastive pre-training of the testbed backbone's vision tower.

Real LLaVA towers come from CLIP, whose [CLS] token was trained to summarise the image against its
caption; the [CLS]-attention pruners (FasterVLM, VTC-CLS, VisionZip) rely on that. This stage gives
the testbed's tower the same: each ShapesVQA scene gets a caption generated from its objects
(:func:`describe`), a small text encoder (:class:`CaptionEncoder`) embeds the caption, the tower's
pooled [CLS] output (after ``post_layernorm``) is projected into the same space, and both are trained
with CLIP's symmetric InfoNCE loss and a learned temperature (Radford et al., 2021). Only the tower,
the two projections and the caption encoder train; the export is the whole HF LLaVA with the trained
tower (``save_pretrained``), the input of the next stage of the recipe.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchmetrics import MeanMetric

from .datamodule import ShapesStageDataModule
from .stage import StageModule


def describe(objects: list[dict[str, Any]]) -> str:
    """A caption of a scene: its objects from left to right, ``"a large red circle , a small blue cross"``."""
    ordered = sorted(objects, key=lambda o: o["cx"])
    return " , ".join(f"a {o['size']} {o['color']} {o['shape']}" for o in ordered)


class CaptionCollator:
    """Images (the processor's pixel values) and tokenised captions of ShapesVQA samples."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        tok = self.processor.tokenizer
        images = [Image.fromarray(s["image"]) for s in samples]
        pixels = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        captions = [describe(s["objects"]) for s in samples]
        text = tok(captions, return_tensors="pt", padding=True, add_special_tokens=False)
        return {"pixel_values": pixels, "caption_ids": text["input_ids"], "caption_mask": text["attention_mask"],
                "captions": captions}


class ShapesCaptionDataModule(ShapesStageDataModule):
    """ShapesVQA scenes as (image, caption) pairs for the contrastive stage (the same seeded splits)."""

    collator = CaptionCollator


class CaptionEncoder(nn.Module):
    """A small text transformer: word embeddings + learned positions, ``layers`` encoder layers, mean
    pooling over the caption's tokens."""

    def __init__(self, vocab_size: int, width: int = 64, layers: int = 2, heads: int = 4, max_len: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.pos = nn.Parameter(torch.zeros(max_len, width))
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] > self.pos.shape[0]:
            raise ValueError(f"captions of {ids.shape[1]} tokens exceed the encoder's max_len={self.pos.shape[0]}")
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        x = self.norm(self.encoder(x, src_key_padding_mask=~mask.bool()))
        m = mask.unsqueeze(-1).to(x.dtype)
        return (x * m).sum(1) / m.sum(1).clamp_min(1)


class ContrastiveTowerModule(StageModule):
    """Train a LLaVA's vision tower contrastively against generated captions (CLIP's loss)."""

    def __init__(
        self,
        model: nn.Module,
        processor: Any = None,
        embed_dim: int = 64,
        text_width: int = 64,
        text_layers: int = 2,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 100,
        max_steps: int | None = None,
        temperature: float = 0.07,
        export_dir: str | None = None,
    ) -> None:
        super().__init__(model, processor)
        self.save_hyperparameters(ignore=["model", "processor"])
        self.freeze_all_but_trained()
        self.text = CaptionEncoder(model.config.text_config.vocab_size, text_width, text_layers)
        self.image_proj = nn.Linear(model.config.vision_config.hidden_size, embed_dim, bias=False)
        self.text_proj = nn.Linear(text_width, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / temperature)))
        self.val_retrieval = MeanMetric()

    @property
    def tower(self) -> nn.Module:
        return self.model.model.vision_tower

    def trained(self) -> list[nn.Module]:
        return [self.tower]

    def embed(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised image ([CLS]) and caption embeddings, (B, embed_dim) each."""
        cls = self.tower(batch["pixel_values"]).pooler_output  # [CLS] after post_layernorm, as CLIP pools
        img = F.normalize(self.image_proj(cls), dim=-1)
        txt = F.normalize(self.text_proj(self.text(batch["caption_ids"], batch["caption_mask"])), dim=-1)
        return img, txt

    def similarity(self, batch: dict[str, Any]) -> torch.Tensor:
        """Image-to-caption logits (B, B): scaled cosine similarities."""
        img, txt = self.embed(batch)
        return self.logit_scale.clamp(max=math.log(100)).exp() * img @ txt.T

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        logits = self.similarity(batch)
        target = torch.arange(len(logits), device=logits.device)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        self.log("train/loss", loss, prog_bar=True, batch_size=len(logits))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.val_retrieval.update(retrieval_accuracy(self.similarity(batch), batch["captions"]))

    def on_validation_epoch_end(self) -> None:
        self.log("val/retrieval", self.val_retrieval.compute(), prog_bar=True, sync_dist=True)
        self.val_retrieval.reset()


def retrieval_accuracy(logits: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """Share of images whose most similar caption in the batch is their own (or an identical one)."""
    best = logits.argmax(1).tolist()
    return torch.tensor(float(np.mean([captions[j] == captions[i] for i, j in enumerate(best)])))
