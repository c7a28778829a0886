"""Where a backbone's vision-tower [CLS] looks: the share of its most-attended patches on objects.

The [CLS]-attention pruners (FasterVLM, VTC-CLS, VisionZip) keep the patches the tower's [CLS]
attends to most. On a CLIP tower these carry the image's content; a tower whose [CLS] was never
trained to summarise the image gives them nothing to go on. For every layer of the tower this script
reports, over ShapesVQA samples, the share of the ``k`` patches with the highest head-mean [CLS]
attention that are foreground (on an object) and that belong to an object the question is about,
next to the shares of all patches (what a random choice gets).

    python benchmarks/cls_attention.py                                        # the embedded backbone
    python benchmarks/cls_attention.py --backbone outputs/x/export --split hard --k 16 --json cls.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from learned_prune import load_backbone  # noqa: E402
from learned_prune.testbed import ShapesVQADataset  # noqa: E402


@torch.no_grad()
def cls_attention_shares(model, processor, items: list[dict], k: int) -> list[dict]:
    """Per tower layer: the share of the top-``k`` [CLS]-attended patches on objects / on the question's objects."""
    pixels = processor.image_processor(images=[Image.fromarray(s["image"]) for s in items],
                                       return_tensors="pt")["pixel_values"]
    tower = model.model.vision_tower
    previous = tower.config._attn_implementation
    tower.config._attn_implementation = "eager"  # attention probabilities are returned by eager attention only
    try:
        out = tower(pixels, output_attentions=True)
    finally:
        tower.config._attn_implementation = previous
    fg = torch.stack([s["patch_mask"] for s in items]).float()
    target = torch.stack([s["target_patches"] for s in items]).float()
    rows = []
    for layer, attn in enumerate(out.attentions):
        top = attn[:, :, 0, 1:].mean(1).topk(k, dim=1).indices  # the [CLS] row, head mean, patches only
        rows.append({"layer": layer, "top_k_on_objects": float(fg.gather(1, top).mean()),
                     "top_k_on_question_objects": float(target.gather(1, top).mean())})
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default=str(ROOT / "checkpoints" / "tiny-llava-shapes"))
    p.add_argument("--split", default="test")
    p.add_argument("--scenes", default="sparse", help="ShapesVQA scenes: sparse (the shipped backbone's) or redundant")
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    model, processor = load_backbone(a.backbone)
    data = ShapesVQADataset(a.split, size=a.samples, scenes=a.scenes)
    items = [data[i] for i in range(a.samples)]
    rows = cls_attention_shares(model, processor, items, a.k)
    base = {"on_objects": float(torch.stack([s["patch_mask"] for s in items]).float().mean()),
            "on_question_objects": float(torch.stack([s["target_patches"] for s in items]).float().mean())}
    print(f"{a.backbone} ({a.split}, {a.samples} samples): share of the top-{a.k} [CLS]-attended patches")
    print(f"{'layer':>5} {'on objects':>11} {'on the question objects':>24}")
    for r in rows:
        print(f"{r['layer']:>5} {r['top_k_on_objects']:>11.2f} {r['top_k_on_question_objects']:>24.3f}")
    print(f"{'all':>5} {base['on_objects']:>11.2f} {base['on_question_objects']:>24.3f}   (every patch: what random gets)")
    result = {"backbone": a.backbone, "split": a.split, "samples": a.samples, "k": a.k, "layers": rows, "all_patches": base}
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
