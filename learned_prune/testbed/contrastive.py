"""``module=contrastive``: CLIP-style contrastive pre-training of the testbed backbone's vision tower.

Real LLaVA towers come from CLIP, whose [CLS] token was trained to summarise the image against its
caption; the [CLS]-attention pruners (FasterVLM, VTC-CLS, VisionZip) rely on that. This stage gives
the testbed's tower the same: each ShapesVQA scene gets a caption generated from its objects
(:func:`describe`), a small text encoder (:class:`CaptionEncoder`) embeds the caption, the tower's
pooled [CLS] output (after ``post_layernorm``) is projected into the same space, and both are trained
with CLIP's symmetric InfoNCE loss and a learned temperature (Radford et al., 2021). Each image also
gets a hard-negative caption, its own with one object's colour, shape or size changed (as NegCLIP,
Yuksekgonul et al., 2023, adds swapped captions), among the image-to-text candidates: random scenes
differ in so much that without them the tower need not bind attributes to objects. Only the tower,
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
from .training_aids import sincos_position_init


def describe(objects: list[dict[str, Any]]) -> str:
    """A caption of a scene: its objects from left to right, ``"a large red circle , a small blue cross"``."""
    ordered = sorted(objects, key=lambda o: o["cx"])
    return " , ".join(f"a {o['size']} {o['color']} {o['shape']}" for o in ordered)


def perturbed(objects: list[dict[str, Any]], rng: np.random.Generator) -> list[dict[str, Any]]:
    """The objects with one of them given another colour, shape or size: a caption that is wrong
    about exactly one attribute (a hard negative)."""
    from .scenes import COLOR_NAMES, SHAPES, SIZE_NAMES

    out = [dict(o) for o in objects]
    o = out[int(rng.integers(len(out)))]
    key, values = [("color", COLOR_NAMES), ("shape", SHAPES), ("size", SIZE_NAMES)][int(rng.integers(3))]
    o[key] = [v for v in values if v != o[key]][int(rng.integers(len(values) - 1))]
    return out


class CaptionCollator:
    """Images (the processor's pixel values) and tokenised captions of ShapesVQA samples."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        tok = self.processor.tokenizer
        images = [Image.fromarray(s["image"]) for s in samples]
        pixels = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        captions = [describe(s["objects"]) for s in samples]
        negatives = [describe(perturbed(s["objects"], np.random.default_rng([s["index"], 17]))) for s in samples]
        text = tok(captions + negatives, return_tensors="pt", padding=True, add_special_tokens=False)
        n = len(samples)
        return {"pixel_values": pixels, "caption_ids": text["input_ids"][:n], "caption_mask": text["attention_mask"][:n],
                "negative_ids": text["input_ids"][n:], "negative_mask": text["attention_mask"][n:],
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
        sincos_positions: bool = True,
        export_dir: str | None = None,
    ) -> None:
        super().__init__(model, processor)
        self.save_hyperparameters(ignore=["model", "processor"])
        self.freeze_all_but_trained()
        if sincos_positions:  # a from-scratch tower: start its patch positions from a 2-D sin-cos table
            sincos_position_init(self.tower)
        self.text = CaptionEncoder(model.config.text_config.vocab_size, text_width, text_layers)
        self.image_proj = nn.Linear(model.config.vision_config.hidden_size, embed_dim, bias=False)
        self.text_proj = nn.Linear(text_width, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / temperature)))
        self.val_retrieval = MeanMetric()
        self.val_binding = MeanMetric()

    @property
    def tower(self) -> nn.Module:
        return self.model.model.vision_tower

    def trained(self) -> list[nn.Module]:
        return [self.tower]

    def embed(self, batch: dict[str, Any], negatives: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised image ([CLS]) and caption embeddings, (B, embed_dim) and (B, embed_dim) (with
        ``negatives``: (2B, embed_dim), the hard negatives after the captions)."""
        cls = self.tower(batch["pixel_values"]).pooler_output  # [CLS] after post_layernorm, as CLIP pools
        img = F.normalize(self.image_proj(cls), dim=-1)
        txt = self.text(batch["caption_ids"], batch["caption_mask"])
        if negatives and "negative_ids" in batch:
            txt = torch.cat([txt, self.text(batch["negative_ids"], batch["negative_mask"])])
        return img, F.normalize(self.text_proj(txt), dim=-1)

    def similarity(self, batch: dict[str, Any], negatives: bool = False) -> torch.Tensor:
        """Image-to-caption logits (B, B), or (B, 2B) with the hard negatives: scaled cosine similarities."""
        img, txt = self.embed(batch, negatives)
        return self.logit_scale.clamp(max=math.log(100)).exp() * img @ txt.T

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        logits = self.similarity(batch, negatives=True)
        n = len(logits)
        target = torch.arange(n, device=logits.device)
        # images pick among captions and hard negatives; captions pick among images
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :n].T, target)) / 2
        self.log("train/loss", loss, prog_bar=True, batch_size=len(logits))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        logits = self.similarity(batch, negatives="negative_ids" in batch)
        n = len(logits)
        self.val_retrieval.update(retrieval_accuracy(logits[:, :n], batch["captions"]))
        if logits.shape[1] == 2 * n:  # the own caption above its one-attribute-wrong twin
            self.val_binding.update((logits.diagonal() > logits[:, n:].diagonal()).float().mean())

    def on_validation_epoch_end(self) -> None:
        self.log("val/retrieval", self.val_retrieval.compute(), prog_bar=True, sync_dist=True)
        self.val_retrieval.reset()
        if self.val_binding.update_count:
            self.log("val/binding", self.val_binding.compute(), prog_bar=True, sync_dist=True)
        self.val_binding.reset()


def retrieval_accuracy(logits: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """Share of images whose most similar caption in the batch is their own (or an identical one)."""
    best = logits.argmax(1).tolist()
    return torch.tensor(float(np.mean([captions[j] == captions[i] for i, j in enumerate(best)])))
