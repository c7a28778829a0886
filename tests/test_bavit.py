"""BAViT end to end: fast dev run on a frozen backbone, export/load round trip, hard-mode pruning."""

from __future__ import annotations

import pytest
import torch

from learned_prune import load_pruner
from learned_prune.testbed import testbed_llava as tiny_testbed  # not named test*: pytest would collect it
from learned_prune.pruners.bavit import BAViTHead

from conftest import make_batch
from helpers import fit_frozen, fresh_tiny_backbone, load_exported
from test_atp import TINY

BAVIT = [o if not o.startswith("module=") else "module=bavit" for o in TINY]


@torch.no_grad()
def _foreground_prob(model, head: BAViTHead, batch: dict) -> torch.Tensor:
    """The head's foreground probability of every patch, (B, P), from the tower's patch embeddings by hand."""
    tower = model.model.vision_tower
    emb = tower.pre_layrnorm(tower.embeddings(batch["pixel_values"]))[:, 1:]
    return head.logits(emb).softmax(-1)[..., 1]


def test_bavit_trains_on_a_frozen_backbone_and_round_trips(tmp_path):
    parts = fit_frozen(tmp_path, [*BAVIT, "trainer.max_steps=3", "test=false"], "bavit-head")
    module, trainer = parts["module"], parts["trainer"]
    assert "val/token_f1" in trainer.callback_metrics
    head = load_exported(tmp_path / "bavit-head", module, BAViTHead)
    fresh, batch = fresh_tiny_backbone()
    with torch.no_grad(), head(fresh) as engine:
        fresh(**batch)
    want = (_foreground_prob(fresh, head, batch) > head.threshold).sum(1).clamp(min=head.min_keep)
    assert engine.kept_tokens["vision"].tolist() == want.tolist()  # what the exported classifier says, by hand
    with torch.no_grad(), load_pruner(str(tmp_path / "bavit-head"), keep=16)(fresh) as engine:
        fresh(**batch)
    assert engine.kept_tokens["vision"].tolist() == [16, 16, 16]
    other, _ = tiny_testbed("llava", vision_hidden=64)
    with pytest.raises(ValueError, match="vision features of size 32"):
        with head(other):
            pass


def test_bavit_keeps_what_it_classifies_as_foreground():
    model, processor = tiny_testbed("llava", seed=0)
    head = BAViTHead(model.config.vision_config.hidden_size).eval()
    batch = make_batch(processor, 2)
    torch.manual_seed(0)
    with torch.no_grad():
        head.classify.bias.copy_(torch.tensor([0.0, 0.0]))
        p = _foreground_prob(model, head, batch)
        with head(model) as engine:
            model(**batch)
    want = (p > 0.5).sum(1).clamp(min=1)
    assert engine.kept_tokens["vision"].tolist() == want.tolist()


def test_label_margin_grows_the_mask_on_the_patch_grid():
    from learned_prune.modules.bavit import grow_patch_mask

    mask = torch.zeros(1, 25, dtype=torch.bool)
    mask[0, 12] = True  # the centre of a 5 x 5 grid
    grown = grow_patch_mask(mask, 1).view(5, 5)
    want = torch.zeros(5, 5, dtype=torch.bool)
    want[1:4, 1:4] = True
    assert torch.equal(grown, want)
    assert torch.equal(grow_patch_mask(mask, 0), mask)
    corner = torch.zeros(1, 25, dtype=torch.bool)
    corner[0, 0] = True
    assert grow_patch_mask(corner, 2).sum() == 9  # clipped at the grid's edge
    with pytest.raises(ValueError, match="square patch grid"):
        grow_patch_mask(torch.zeros(1, 24, dtype=torch.bool), 1)


@torch.no_grad()
def test_bavit_keeps_original_positions_and_equals_hf_on_the_kept_rows():
    from helpers import record_selections, reference_logits

    model, processor = tiny_testbed("llava", seed=0)
    head = BAViTHead(model.config.vision_config.hidden_size, keep=20).eval()
    one = make_batch(processor, 1)
    records = record_selections(head)
    with head(model) as engine:
        out = model(**one).logits
    assert engine.kept_tokens["vision"].tolist() == [20]
    torch.testing.assert_close(out, reference_logits(model, one, records, repack_vision=False), atol=2e-4, rtol=0)
    repacked = BAViTHead(model.config.vision_config.hidden_size, keep=20, repack_positions=True).eval()
    repacked.load_state_dict(head.state_dict())
    with repacked(model):
        out_repacked = model(**one).logits
    assert not torch.allclose(out, out_repacked, atol=1e-3)  # positions matter: the default is not re-packing


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # a step called without a Trainer
@pytest.mark.parametrize("label", [1, 0])
def test_token_objective_moves_the_foreground_probability_towards_the_labels(label):
    """Label 1 is foreground for the loss as for inference: a step on all-foreground masks raises every
    patch's foreground probability, a step on all-background masks lowers it."""
    from learned_prune.modules.bavit import BAViTModule

    model, processor = tiny_testbed("llava", seed=0)
    module = BAViTModule(model, processor, margin=0)
    module.log = lambda *args, **kwargs: None
    batch = make_batch(processor, 2)
    before = _foreground_prob(model, module.head, batch)
    mask = torch.full(before.shape, bool(label))
    module.training_step({"pixel_values": batch["pixel_values"], "patch_mask": mask}, 0).backward()
    torch.optim.SGD(module.head.parameters(), lr=0.05).step()
    after = _foreground_prob(model, module.head, batch)
    assert ((after > before) if label else (after < before)).all()
