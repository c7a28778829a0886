"""Per-patch foreground labels from COCO-format annotations (``data=coco_masks``), for BAViT.

Reads a COCO "instances" JSON (``images``, ``annotations`` with ``segmentation`` polygons or RLE
and/or ``bbox``) and a folder of images from local disk; nothing is downloaded. Each image's
foreground mask is the union of its objects (``labels="auto"``: the segmentation where present,
else the box; ``"segmentation"`` or ``"bbox"`` to force one). The mask goes through the backbone's
own image processor (resize, crop) as an image, so it lines up with the pixels the tower sees
whatever the processor does; a patch is foreground when at least ``min_fraction`` of its pixels are.
Compressed (string) RLE needs ``pycocotools``; polygons, boxes and uncompressed RLE do not.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

LABEL_SOURCES = ("auto", "segmentation", "bbox")


def _rle_decode(rle: dict, height: int, width: int) -> np.ndarray:
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        try:
            from pycocotools import mask as mask_utils
        except ImportError as e:
            raise ImportError("compressed COCO RLE needs pycocotools (pip install pycocotools); "
                              "polygons, boxes and uncompressed RLE work without it") from e
        return mask_utils.decode(rle).astype(bool)
    flat = np.zeros(height * width, dtype=bool)
    pos, value = 0, False
    for run in counts:  # alternating runs of 0s and 1s, column-major, starting with 0s
        flat[pos : pos + run] = value
        pos, value = pos + run, not value
    return flat.reshape(width, height).T


def polygon_mask(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pixels whose centre lies inside the polygon ``points`` (K, 2) of (x, y) edge coordinates
    (even-odd rule, evaluated over the polygon's bounding box only)."""
    x0, y0 = np.floor(points.min(0)).astype(int).clip(0)
    x1, y1 = np.ceil(points.max(0)).astype(int)
    x1, y1 = min(x1, width), min(y1, height)
    mask = np.zeros((height, width), dtype=bool)
    if x1 <= x0 or y1 <= y0:
        return mask
    px, py = np.meshgrid(np.arange(x0, x1) + 0.5, np.arange(y0, y1) + 0.5)
    inside = np.zeros(px.shape, dtype=bool)
    xa, ya = points[:, 0], points[:, 1]
    xb, yb = np.roll(xa, -1), np.roll(ya, -1)
    for ax, ay, bx, by in zip(xa, ya, xb, yb):
        crosses = (ay > py) != (by > py)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_cross = ax + (py - ay) * (bx - ax) / (by - ay)
        inside ^= crosses & (px < x_cross)
    mask[y0:y1, x0:x1] = inside
    return mask


def object_mask(annotation: dict, height: int, width: int, labels: str = "auto") -> np.ndarray:
    """The (height, width) bool mask of one COCO annotation."""
    seg = annotation.get("segmentation")
    use_seg = labels == "segmentation" or (labels == "auto" and seg)
    if use_seg:
        if not seg:
            raise ValueError(f"annotation {annotation.get('id')} has no segmentation; use data.labels=bbox or auto")
        if isinstance(seg, dict):
            return _rle_decode(seg, height, width)
        mask = np.zeros((height, width), dtype=bool)
        for polygon in seg:
            if len(polygon) >= 6:
                mask |= polygon_mask(np.asarray(polygon, dtype=np.float64).reshape(-1, 2), height, width)
        return mask
    if "bbox" not in annotation:
        raise ValueError(f"annotation {annotation.get('id')} has neither a usable segmentation nor a bbox")
    x, y, w, h = annotation["bbox"]
    mask = np.zeros((height, width), dtype=bool)
    mask[max(0, int(np.floor(y))) : int(np.ceil(y + h)), max(0, int(np.floor(x))) : int(np.ceil(x + w))] = True
    return mask


class CocoMasksDataset(Dataset):
    """Images and their foreground masks from a COCO instances file; items ``{"image", "mask", "image_id"}``."""

    def __init__(self, annotations: str | Path, images_dir: str | Path, split: str = "train",
                 val_fraction: float = 0.1, labels: str = "auto", seed: int = 0) -> None:
        if labels not in LABEL_SOURCES:
            raise ValueError(f"labels must be one of {LABEL_SOURCES}, got {labels!r}")
        if split not in ("train", "val", "all"):
            raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
        path = Path(annotations)
        if not path.is_file():
            raise FileNotFoundError(f"COCO annotations {path} not found (set data.annotations=<instances_*.json>)")
        data = json.loads(path.read_text())
        if "images" not in data or "annotations" not in data:
            raise ValueError(f"{path} is not a COCO instances file: it needs 'images' and 'annotations'")
        self.images_dir, self.labels = Path(images_dir), labels
        by_image: dict[Any, list[dict]] = {}
        for ann in data["annotations"]:
            by_image.setdefault(ann["image_id"], []).append(ann)
        images = sorted(data["images"], key=lambda im: str(im["id"]))

        def in_val(im: dict) -> bool:  # a stable split by image id, independent of file order
            return (zlib.crc32(f"{seed}:{im['id']}".encode()) % 10_000) < val_fraction * 10_000

        if split != "all":
            images = [im for im in images if in_val(im) == (split == "val")]
        self.images = images
        self.annotations = by_image

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        info = self.images[index]
        file = self.images_dir / info["file_name"]
        if not file.is_file():
            raise FileNotFoundError(f"image {file} (image_id {info['id']}) not found under data.images_dir")
        image = Image.open(file).convert("RGB")
        width, height = image.size
        mask = np.zeros((height, width), dtype=bool)
        for ann in self.annotations.get(info["id"], []):
            mask |= object_mask(ann, height, width, self.labels)
        return {"image": image, "mask": mask, "image_id": info["id"]}


class CocoMaskCollator:
    """``pixel_values`` from the backbone's image processor and ``patch_mask`` (B, N) bool aligned with them."""

    def __init__(self, processor: Any, patch_size: int, min_fraction: float = 0.25) -> None:
        if processor is None:
            raise ValueError("data=coco_masks needs the backbone's processor to align masks with the tower's patches")
        self.image_processor = getattr(processor, "image_processor", processor)
        self.patch_size, self.min_fraction = patch_size, min_fraction

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        images = [s["image"] for s in samples]
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        masks = [Image.fromarray((s["mask"] * 255).astype(np.uint8)).convert("RGB") for s in samples]
        aligned = self.image_processor(images=masks, return_tensors="pt", do_normalize=False)["pixel_values"][:, 0]
        if aligned.shape[-2:] != pixels.shape[-2:]:
            raise ValueError("the processor gave masks and images of different sizes")
        frac = F.avg_pool2d(aligned[:, None].float().clamp(0, 1), self.patch_size)
        return {
            "pixel_values": pixels,
            "patch_mask": (frac >= self.min_fraction).flatten(1),
            "image_ids": [s["image_id"] for s in samples],
        }


class CocoMasksDataModule(pl.LightningDataModule):
    """Train / val loaders of COCO-format foreground masks (val doubles as test; ``val_size`` caps it)."""

    def __init__(self, processor: Any = None, annotations: str = "data/coco/annotations/instances_val2017.json",
                 images_dir: str = "data/coco/val2017", labels: str = "auto", val_fraction: float = 0.1,
                 patch_size: int = 8, min_fraction: float = 0.25, batch_size: int = 32, num_workers: int = 0,
                 seed: int = 0, val_size: int | None = None) -> None:
        super().__init__()
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        common = dict(annotations=annotations, images_dir=images_dir, val_fraction=val_fraction, labels=labels,
                      seed=seed)
        self.train_set = CocoMasksDataset(split="train", **common)
        self.val_set = CocoMasksDataset(split="val", **common)
        if val_size is not None:  # at most val_size validation images
            self.val_set.images = self.val_set.images[:val_size]
        if not len(self.train_set) or not len(self.val_set):
            raise ValueError(f"{annotations}: {len(self.train_set)} train / {len(self.val_set)} val images; "
                             "adjust data.val_fraction so that both splits are non-empty")
        self.collate = CocoMaskCollator(processor, patch_size, min_fraction)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, generator=generator,
                          num_workers=self.num_workers, collate_fn=self.collate)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False)
