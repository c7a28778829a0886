"""data=coco_masks: COCO-format boxes / polygons / RLE to per-patch labels, and BAViT trained on them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from learned_prune.testbed import testbed_llava
from learned_prune.data.coco_masks import CocoMaskCollator, CocoMasksDataset, object_mask

from helpers import fit_frozen
from test_atp import TINY


def _write_coco(root, n_images: int = 6):
    """96x96 images (the tiny processor's size, 8-pixel patches => a 12x12 grid) with known objects."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(n_images):
        Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "height": 96, "width": 96})
        # a box over patches rows 0-1, cols 0-2 and a square polygon over patch (5, 5)..(6, 6)
        anns.append({"id": 10 * i, "image_id": i, "bbox": [0, 0, 24, 16], "category_id": 1})
        anns.append({"id": 10 * i + 1, "image_id": i, "category_id": 1, "bbox": [40, 40, 16, 16],
                     "segmentation": [[40, 40, 56, 40, 56, 56, 40, 56]]})
    # an uncompressed RLE (column-major runs) covering column 95 entirely, on image 0
    anns.append({"id": 999, "image_id": 0, "category_id": 1, "iscrowd": 1, "bbox": [95, 0, 1, 96],
                 "segmentation": {"size": [96, 96], "counts": [95 * 96, 96]}})
    path = root / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}))
    return path


def test_masks_from_boxes_polygons_and_rle(tmp_path):
    path = _write_coco(tmp_path)
    ds = CocoMasksDataset(path, tmp_path / "images", split="all")
    assert len(ds) == 6
    item = ds[0]
    assert item["mask"][:16, :24].all() and item["mask"][40:56, 40:56].all() and item["mask"][:, 95].all()
    assert item["mask"].sum() == 16 * 24 + 16 * 16 + 96
    ann = {"bbox": [40, 40, 16, 16], "segmentation": [[40, 40, 56, 40, 48, 56]]}  # a triangle
    tri = object_mask(ann, 96, 96)
    assert 0.4 < tri.sum() / 256 < 0.6 and object_mask(ann, 96, 96, labels="bbox").sum() == 256

    _, processor = testbed_llava("llava", seed=0)
    batch = CocoMaskCollator(processor, patch_size=8)([ds[0], ds[1]])
    grid = batch["patch_mask"].view(2, 12, 12)
    want = torch.zeros(12, 12, dtype=torch.bool)
    want[0:2, 0:3] = True
    want[5:7, 5:7] = True
    assert torch.equal(grid[1], want)
    want[:, 11] = False  # one pixel column of 8 is under the min_fraction of 0.25
    assert torch.equal(grid[0], want)
    assert batch["pixel_values"].shape == (2, 3, 96, 96)


def test_splits_are_disjoint_and_bad_input_fails_clearly(tmp_path):
    path = _write_coco(tmp_path, n_images=20)
    train = CocoMasksDataset(path, tmp_path / "images", split="train", val_fraction=0.3)
    val = CocoMasksDataset(path, tmp_path / "images", split="val", val_fraction=0.3)
    ids = lambda d: {im["id"] for im in d.images}  # noqa: E731
    assert ids(train).isdisjoint(ids(val)) and len(ids(train) | ids(val)) == 20 and len(val) > 0
    with pytest.raises(FileNotFoundError, match="data.annotations"):
        CocoMasksDataset(tmp_path / "missing.json", tmp_path)
    with pytest.raises(ValueError, match="labels must be"):
        CocoMasksDataset(path, tmp_path / "images", labels="boxes")
    with pytest.raises(ValueError, match="no segmentation"):
        object_mask({"id": 3, "bbox": [0, 0, 1, 1]}, 8, 8, labels="segmentation")


def test_bavit_trains_on_coco_masks(tmp_path):
    path = _write_coco(tmp_path, n_images=12)
    overrides = [o if not o.startswith("module=") else "module=bavit" for o in TINY]
    overrides = [o for o in overrides if not o.startswith("data.")]
    parts = fit_frozen(tmp_path, [*overrides, "data=coco_masks", f"data.annotations={path}",
                                  f"data.images_dir={tmp_path / 'images'}", "data.batch_size=4",
                                  "data.val_fraction=0.3", "trainer.max_steps=2", "test=false"], "bavit-coco")
    trainer = parts["trainer"]
    assert {"val/token_f1", "val/token_acc"} <= set(trainer.callback_metrics)
    assert (tmp_path / "bavit-coco" / "model.safetensors").is_file()
