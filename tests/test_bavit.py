"""BAViT end to end: fast dev run on a frozen backbone, export/load round trip, hard-mode pruning."""

from __future__ import annotations

import pytest
import torch

from learned_prune import load_pruner, tiny_llava
from learned_prune.pruners.bavit import BAViTHead

from conftest import make_batch
from helpers import fit_frozen
from test_atp import TINY

BAVIT = [o if not o.startswith("module=") else "module=bavit" for o in TINY]


def test_bavit_trains_on_a_frozen_backbone_and_round_trips(tmp_path):
    parts = fit_frozen(tmp_path, [*BAVIT, "trainer.max_steps=3", "test=false"], "bavit-head")
    module, trainer = parts["module"], parts["trainer"]
    assert "val/token_f1" in trainer.callback_metrics
    head = load_pruner(str(tmp_path / "bavit-head"))
    assert isinstance(head, BAViTHead)
    module.head.eval()
    torch.testing.assert_close(head.state_dict(), module.head.state_dict())
    fresh, processor = tiny_llava("llava", vision_hidden=32, text_hidden=32, text_layers=8, vision_layers=2,
                                  intermediate_size=64, seed=0)
    batch = make_batch(processor, 3)
    with torch.no_grad(), head(fresh) as engine:
        fresh(**batch)
    kept = engine.kept_tokens["vision"]
    assert ((kept >= 1) & (kept <= 144)).all()
    with torch.no_grad(), load_pruner(str(tmp_path / "bavit-head"), keep=16)(fresh) as engine:
        fresh(**batch)
    assert engine.kept_tokens["vision"].tolist() == [16, 16, 16]
    other, _ = tiny_llava("llava", vision_hidden=64)
    with pytest.raises(ValueError, match="vision features of size 32"):
        with head(other):
            pass


def test_bavit_keeps_what_it_classifies_as_foreground():
    model, processor = tiny_llava("llava", seed=0)
    head = BAViTHead(model.config.vision_config.hidden_size).eval()
    batch = make_batch(processor, 2)
    torch.manual_seed(0)
    with torch.no_grad():
        head.classify.bias.copy_(torch.tensor([0.0, 0.0]))
        tower = model.model.vision_tower
        emb = tower.pre_layrnorm(tower.embeddings(batch["pixel_values"]))[:, 1:]
        p = head(emb).softmax(-1)[..., 1]
        with head(model) as engine:
            model(**batch)
    want = (p > 0.5).sum(1).clamp(min=1)
    assert engine.kept_tokens["vision"].tolist() == want.tolist()
