"""LVPruning end to end: training on a frozen backbone, export/load, hard-mode engine invariants."""

from __future__ import annotations

import pytest
import torch

from learned_prune import load_pruner
from learned_prune.testbed import testbed_llava as tiny_testbed  # not named test*: pytest would collect it
from learned_prune.pruners.lvpruning import LVPruningHead

from conftest import make_batch, positions_from_mask
from helpers import fit_frozen, fresh_tiny_backbone, load_exported, record_selections, reference_logits
from test_atp import TINY

LVP = [o if not o.startswith("module=") else "module=lvpruning" for o in TINY]
ATOL = 2e-4


def _random_head(model, **kw) -> LVPruningHead:
    """A head whose decisions depend on the input (the trained init keeps everything alike)."""
    tc = model.config.text_config
    torch.manual_seed(0)
    head = LVPruningHead(tc.hidden_size, tc.num_hidden_layers, **kw).eval()
    for module in head.modules_by_site.values():
        torch.nn.init.normal_(module.out.weight, std=1.0)
    return head


def test_lvpruning_trains_on_a_frozen_backbone_and_round_trips(tmp_path):
    parts = fit_frozen(tmp_path, [*LVP, "trainer.max_steps=3", "test=false"], "lvp-head")
    module, trainer = parts["module"], parts["trainer"]
    assert {"train/kept_frac/llm:3", "train/kept_frac/llm:5", "val/acc"} <= set(trainer.callback_metrics)
    head = load_exported(tmp_path / "lvp-head", module, LVPruningHead)
    assert head.layers == [3, 4, 5]  # the config default
    fresh, batch = fresh_tiny_backbone()
    with torch.no_grad(), head(fresh) as engine:
        fresh(**batch)
    n = (batch["input_ids"] == fresh.config.image_token_id).sum(1)[0].item()
    want = [round(n * r) for r in (0.5, 0.3, 0.11)]
    assert [int(engine.kept_tokens[f"llm:{k}"][0]) for k in (3, 4, 5)] == want
    # ratios are set at test time without retraining: keep shifts every module's ratio
    with torch.no_grad(), load_pruner(str(tmp_path / "lvp-head"), keep=0.22)(fresh) as engine:
        fresh(**batch)
    assert [int(engine.kept_tokens[f"llm:{k}"][0]) for k in (3, 4, 5)] == [round(n * r) for r in (0.61, 0.41, 0.22)]
    with torch.no_grad(), load_pruner(str(tmp_path / "lvp-head"), keep=16)(fresh) as engine:
        fresh(**batch)
    assert engine.kept_tokens["llm:5"].tolist() == [16, 16, 16]
    other, _ = tiny_testbed("llava", text_hidden=64, text_layers=8, vision_hidden=32, vision_layers=2)
    with pytest.raises(ValueError, match="hidden size 32.*hidden size 64"):
        with head(other):
            pass


def test_bad_schedules_fail_early():
    with pytest.raises(ValueError, match="ratios"):
        LVPruningHead(32, 8, ratios=[0.1, 0.3, 0.5])
    with pytest.raises(ValueError, match="need as many ratios"):
        LVPruningHead(32, 8, ratios=[0.5, 0.1])
    with pytest.raises(ValueError, match="layers"):
        LVPruningHead(32, 8, layers=[1, 4, 8])


@torch.no_grad()
def test_hard_mode_equals_hf_on_the_kept_subsequence_and_generates():
    model, processor = tiny_testbed("llava", text_layers=8, seed=0)
    head = _random_head(model, keep=12)
    batch = make_batch(processor, 2)
    one = {k: v[1:2] for k, v in batch.items()}
    keep = one["attention_mask"][0].bool()
    one["input_ids"], one["attention_mask"] = one["input_ids"][:, keep], one["attention_mask"][:, keep]
    records = record_selections(head)
    with head(model) as engine:
        out = model(**one).logits
    assert [int(k) for k in engine.kept_tokens.values()][-1] == 12
    ref = reference_logits(model, one, records, repack_llm=False)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    # generation after the prune = greedy decoding of the kept sub-sequence
    records.clear()
    L = one["input_ids"].shape[1]
    with head(model):
        gen = model.generate(**one, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                             suppress_tokens=[model.config.image_token_id])
    for t in range(3):
        ids = torch.cat([one["input_ids"], gen[:, L:L + t]], 1)
        step = dict(one, input_ids=ids, attention_mask=torch.ones_like(ids))
        logits = reference_logits(model, step, records[:3], repack_llm=False)[:, -1]
        logits[:, model.generation_config.eos_token_id] = float("-inf")
        logits[:, model.config.image_token_id] = float("-inf")
        assert logits.argmax(-1).item() == gen[0, L + t].item()


@torch.no_grad()
def test_padded_batch_equals_single_runs():
    model, processor = tiny_testbed("llava", text_layers=8, seed=0)
    head = _random_head(model, keep=10)
    batch = make_batch(processor, 3)
    batch["position_ids"] = positions_from_mask(batch["attention_mask"])
    with head(model):
        last = model(**batch).logits[:, -1]
        for i in range(3):
            one = {k: v[i : i + 1] for k, v in make_batch(processor, 3).items()}
            keep = one["attention_mask"][0].bool()
            one["input_ids"], one["attention_mask"] = one["input_ids"][:, keep], one["attention_mask"][:, keep]
            torch.testing.assert_close(model(**one).logits[0, -1], last[i], atol=ATOL, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("name", ["lvpruning", "fastv"])
def test_teacher_forced_answers_do_not_reach_the_pruner(name):
    """In a training pass with labels, pruners read the prompt only: the pruned prompt computes as it
    does at inference, whatever answer follows."""
    model, processor = tiny_testbed("llava", text_layers=8, seed=0)
    pruner = _random_head(model, keep=10) if name == "lvpruning" else load_pruner("fastv", keep=10)
    one = {k: v[:1] for k, v in make_batch(processor, 1).items()}
    L = one["input_ids"].shape[1]
    outs = []
    for answer in ([5, 6, 7], [9, 3, 11]):
        ids = torch.cat([one["input_ids"], torch.tensor([answer])], 1)
        labels = torch.full_like(ids, -100)
        labels[:, L:] = ids[:, L:]
        full = dict(one, input_ids=ids, attention_mask=torch.ones_like(ids))
        with pruner(model) as engine:
            out = model(**full, labels=labels).logits
        prompt_rows = engine.output_index[0] < L
        outs.append(out[0, prompt_rows])
    with pruner(model):
        prompt_only = model(**one).logits[0]
    torch.testing.assert_close(outs[0], outs[1], atol=ATOL, rtol=0)
    torch.testing.assert_close(outs[0], prompt_only, atol=ATOL, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("bias, want", [((20.0, -20.0), 1.0), ((-20.0, 20.0), 0.0)])
def test_soft_decisions_take_the_keep_channel(training, bias, want):
    """Logit 0 is *keep*: a module sure to keep gives keep-probability 1 (Gumbel in training, argmax otherwise),
    one sure to drop gives 0, as hard mode's top-k of ``keep - drop`` reads them."""
    model, processor = tiny_testbed("llava", text_layers=8, seed=0)
    tc = model.config.text_config
    head = LVPruningHead(tc.hidden_size, tc.num_hidden_layers).train(training)
    for module in head.modules_by_site.values():
        module.out.bias.copy_(torch.tensor(bias))
    records = record_selections(head)
    torch.manual_seed(0)
    with head(model, mode="soft"):
        model(**make_batch(processor, 2))
    p = records[0][2].keep_prob
    assert torch.equal(p, torch.full_like(p, want))
    loss, _ = head.budget_loss()  # the per-sample ratio MSE, by hand: the cumulative kept fraction is `want` everywhere
    torch.testing.assert_close(loss, torch.tensor(sum((want - r) ** 2 for r in head.ratios) / 3))


def test_ratio_loss_lowers_the_keep_logit_when_too_many_are_kept():
    """The budget objective's direction: starting from keep-everything, its gradient pushes every module's keep
    logit down and its drop logit up (gradient descent then keeps fewer)."""
    model, processor = tiny_testbed("llava", text_layers=8, seed=0)
    tc = model.config.text_config
    head = LVPruningHead(tc.hidden_size, tc.num_hidden_layers).train()
    torch.manual_seed(0)
    with head(model, mode="soft"):
        model(**make_batch(processor, 2))
    loss, logs = head.budget_loss()
    assert all(float(logs[f"kept_frac/llm:{k}"]) > r for k, r in zip(head.layers, head.ratios))
    loss.backward()
    for module in head.modules_by_site.values():
        g = module.out.bias.grad
        assert g[0] > 0 and g[1] < 0, g
