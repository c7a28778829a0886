"""What ships under checkpoints/: small safetensors with a card, portable configs, heads that load
offline on the shipped backbone and prune it as their cards say."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from learned_prune import load_backbone, load_pruner
from learned_prune.testbed import ShapesVQADataModule
from learned_prune.evaluation.vqa import greedy_answers

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p for p in (ROOT / "checkpoints").iterdir() if p.is_dir())
HEADS = [p for p in SHIPPED if p.name != "tiny-llava-shapes"]
MAX_BYTES = 16 * 1024 * 1024


@pytest.mark.parametrize("folder", SHIPPED, ids=lambda p: p.name)
def test_shipped_folders_are_small_safetensors_with_a_card(folder):
    assert (folder / "README.md").is_file(), f"{folder.name} ships without a card"
    for f in folder.iterdir():
        assert f.suffix in {".safetensors", ".json", ".md", ".txt", ".jinja"}, f"{f.name}: not a shippable format"
        assert f.stat().st_size <= MAX_BYTES, f"{f.name} is over 16 MB"
    config = (folder / "config.json").read_text()
    assert "/work/" not in config and "/home/" not in config and "/tmp/" not in config, "absolute path in config"


@pytest.fixture(scope="module")
def backbone():
    model, processor = load_backbone(ROOT / "checkpoints" / "tiny-llava-shapes")
    dm = ShapesVQADataModule(processor, eval_batch_size=6, val_size=6, test_size=6, train_size=6)
    dm.setup("validate")
    return model.eval(), processor, next(iter(dm.val_dataloader()))


@pytest.mark.parametrize("folder", HEADS, ids=lambda p: p.name)
def test_shipped_heads_prune_the_shipped_backbone(folder, backbone):
    model, processor, batch = backbone
    head = load_pruner(str(folder))
    n = int((batch["prompt_input_ids"][0] == model.config.image_token_id).sum())
    with torch.no_grad(), head(model) as engine:
        answers = greedy_answers(model, processor, batch)
    assert len(answers) == len(batch["answers"]) and all(a.strip() for a in answers)
    last = engine.kept_tokens[list(engine.kept_tokens)[-1]]
    method = json.loads((folder / "config.json").read_text())["method"]
    pruned = last < n
    # DyVTE exits per sample (some questions need the image to the last layer); the others prune every sample
    assert (last >= 0).all() and (pruned.any() if method == "dyvte" else pruned.all()), \
        "a shipped head should prune at its default"
    if method == "lvpruning":
        assert last.tolist() == [round(n * 0.11)] * len(answers)
