"""benchmarks/cls_attention.py: shares are shares, per layer, and a [CLS] that attends to objects scores high."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

SHAPES = Path(__file__).resolve().parents[1] / "checkpoints" / "tiny-llava-shapes"


def test_reports_one_row_per_tower_layer_with_shares(tmp_path):
    import cls_attention

    out = cls_attention.main(["--backbone", str(SHAPES), "--samples", "8", "--k", "4", "--json", str(tmp_path / "c.json")])
    assert len(out["layers"]) == 4 and (tmp_path / "c.json").is_file()
    for r in out["layers"]:
        assert 0 <= r["top_k_on_question_objects"] <= r["top_k_on_objects"] <= 1
    assert 0 < out["all_patches"]["on_objects"] < 1


def test_a_cls_that_attends_to_the_objects_gets_a_share_of_one():
    import cls_attention

    from learned_prune import load_backbone
    from learned_prune.testbed import ShapesVQADataset

    model, processor = load_backbone(SHAPES)
    items = [ShapesVQADataset("test", size=4)[i] for i in range(4)]
    fg = torch.stack([s["patch_mask"] for s in items])
    first = model.model.vision_tower.encoder.layers[0].self_attn

    def on_objects(module, args, kwargs, output):  # attention probabilities: [CLS] row only on foreground
        attn = output[1].clone()
        attn[:, :, 0, 1:] = fg[:, None].float() / fg.sum(1)[:, None, None]
        return output[0], attn

    handle = first.register_forward_hook(on_objects, with_kwargs=True)
    try:
        rows = cls_attention.cls_attention_shares(model, processor, items, k=int(fg.sum(1).min()))
    finally:
        handle.remove()
    assert rows[0]["top_k_on_objects"] == 1.0
