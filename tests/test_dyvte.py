"""DyVTE end to end: self-made labels, training on a frozen backbone, export/load, exits at inference."""

from __future__ import annotations

import pytest
import torch

from learned_prune import load_pruner
from learned_prune.testbed import testbed_llava as tiny_testbed  # not named test*: pytest would collect it
from learned_prune.pruners.dyvte import DyVTEHead, VisualExit, router_features
from learned_prune.run import build

from conftest import make_batch, positions_from_mask
from helpers import compose_train, fit_frozen, record_selections, reference_logits
from test_atp import TINY

DYVTE = [o if not o.startswith("module=") else "module=dyvte" for o in TINY]
ATOL = 2e-4


class _FixedExit(DyVTEHead):
    """Routers replaced by a fixed rule: exit at ``exit_at`` (None: never) — tests the exit mechanism."""

    exit_at: int | None = None

    def exit_logits(self, layer, features):
        logits = torch.tensor([0.0, 10.0] if layer == self.exit_at else [10.0, 0.0])
        return logits.expand(features.shape[0], 2)


def _head(model, exit_at: int | None, **kw) -> DyVTEHead:
    tc = model.config.text_config
    head = _FixedExit(tc.hidden_size, tc.num_hidden_layers, **kw).eval()
    head.exit_at = exit_at
    return head


def test_dyvte_trains_on_a_frozen_backbone_and_round_trips(tmp_path):
    parts = fit_frozen(tmp_path, [*DYVTE, "trainer.max_steps=3", "test=false"], "dyvte-head")
    module, trainer = parts["module"], parts["trainer"]
    metrics = trainer.callback_metrics
    assert {"train/router_acc", "val/router_acc", "val/acc", "val/llm_flops_saved", "val/exit_layer_mean"} <= set(metrics)
    assert 0 <= float(metrics["val/llm_flops_saved"]) < 1
    head = load_pruner(str(tmp_path / "dyvte-head"))
    assert isinstance(head, DyVTEHead)
    module.head.eval()
    torch.testing.assert_close(head.state_dict(), module.head.state_dict())
    other, _ = tiny_testbed("llava", text_hidden=64, text_layers=8, vision_hidden=32, vision_layers=2)
    with pytest.raises(ValueError, match="hidden size 32.*hidden size 64"):
        with head(other):
            pass


@torch.no_grad()
def test_labels_exit_only_where_the_answer_survives_without_the_image(tmp_path):
    cfg = compose_train(tmp_path, [*DYVTE, "test=false"], "dyvte-head")
    parts = build(cfg)
    module, dm = parts["module"], parts["datamodule"]
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    feats, targets = module.make_labels(batch, [1, 7])
    assert set(targets) == {1, 7} and feats[1].shape == (4, 64)
    # recompute one label by hand: layer 7, sample 0
    model = module.model
    inputs = module._inputs(batch)
    labels = batch["labels"]
    mask = labels[0, 1:] != -100
    full = model(**{k: v[:1] for k, v in inputs.items()}).logits[0, :-1]
    with VisualExit(7)(model) as engine:
        cut = model(**{k: v[:1] for k, v in inputs.items()}).logits[0, :-1]
    rows = engine.output_index[0, 1:]
    want_mask = torch.gather(labels[0], 0, rows) != -100
    a = full[mask]
    b = cut[want_mask]
    la = torch.nn.functional.cross_entropy(a, labels[0, 1:][mask])
    lb = torch.nn.functional.cross_entropy(b, labels[0, 1:][mask])
    want = bool((a.argmax(-1) == b.argmax(-1)).all()) and float(lb) <= (1 + module.hparams.rel_margin) * float(la) + module.hparams.margin
    assert bool(targets[7][0]) == want


@torch.no_grad()
@pytest.mark.parametrize("layer", [1, 4, 7])
def test_exit_logits_from_the_full_run_equal_the_engine_run(layer):
    from learned_prune.modules.dyvte import logits_without_visual_from

    model, processor = tiny_testbed("llava", seed=0)
    batch = make_batch(processor, 3)  # left-padded: the prompts differ in length
    assert not batch["attention_mask"].bool().all()
    full = model(**batch, output_hidden_states=True, use_cache=False)
    is_image = batch["input_ids"] == model.config.image_token_id
    valid = batch["attention_mask"].bool()
    fast, rows, rows_valid = logits_without_visual_from(model, full.hidden_states[layer], layer, ~is_image, valid)
    with VisualExit(layer)(model) as engine:
        slow = model(**batch, use_cache=False).logits
    for b in range(3):  # compare the real rows, matched by their input position
        ok = rows_valid[b]
        want = {int(r): slow[b, j] for j, r in enumerate(engine.output_index[b]) if engine.output_valid[b, j]}
        got = {int(r): fast[b, j] for j, r in enumerate(rows[b]) if ok[j]}
        assert set(got) == set(want) == set((~is_image[b] & valid[b]).nonzero()[:, 0].tolist())
        for r in got:
            torch.testing.assert_close(got[r], want[r], atol=ATOL, rtol=0)


@torch.no_grad()
def test_router_features_match_between_training_and_inference():
    model, processor = tiny_testbed("llava", text_layers=8, seed=0)
    head = _head(model, None)
    one = {k: v[:1] for k, v in make_batch(processor, 1).items()}
    seen = {}
    original = head.select

    def spy(state):
        seen[state.layer] = router_features(state.hidden, state.instruction_mask, state.prompt_valid)
        return original(state)

    head.select = spy
    with head(model):
        model(**one)
    L = one["input_ids"].shape[1]
    ids = torch.cat([one["input_ids"], torch.tensor([[5, 6]])], 1)
    labels = torch.full_like(ids, -100)
    labels[:, L:] = ids[:, L:]
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=one["pixel_values"],
                output_hidden_states=True)
    idx = torch.arange(ids.shape[1])[None]
    is_image = ids == model.config.image_token_id
    prompt = labels == -100
    instruction = prompt & ~is_image & (idx > torch.where(is_image, idx, -1).amax(1, keepdim=True))
    for layer in (1, 4):
        torch.testing.assert_close(router_features(out.hidden_states[layer], instruction, prompt), seen[layer],
                                   atol=1e-4, rtol=0)


@torch.no_grad()
def test_first_exit_removes_every_visual_token_for_the_rest_of_the_llm():
    model, processor = tiny_testbed("llava", text_layers=8, seed=0)
    batch = make_batch(processor, 1)
    for exit_at in (3, None):
        head = _head(model, exit_at)
        records = record_selections(head)
        with head(model) as engine:
            out = model(**batch).logits
        n_vis = int((batch["input_ids"] == model.config.image_token_id).sum())
        if exit_at is None:
            assert all(int(v) == n_vis for v in engine.kept_tokens.values())
            assert head.exit_layer.tolist() == [8]
            continue
        assert head.exit_layer.tolist() == [exit_at]
        assert int(engine.kept_tokens[f"llm:{exit_at}"]) == 0 and f"llm:{exit_at + 1}" not in engine.kept_tokens
        ref = reference_logits(model, batch, records, repack_llm=False)
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
        with VisualExit(exit_at)(model):
            torch.testing.assert_close(model(**batch).logits, out, atol=ATOL, rtol=0)


@torch.no_grad()
def test_per_sample_exits_in_a_padded_batch_equal_single_runs():
    model, processor = tiny_testbed("llava", text_layers=8, seed=0)
    head = DyVTEHead(model.config.text_config.hidden_size, 8, threshold=0.5).eval()
    torch.manual_seed(1)
    for router in head.routers.values():
        torch.nn.init.normal_(router.w2.weight, std=0.5)
    batch = make_batch(processor, 3)
    batch["position_ids"] = positions_from_mask(batch["attention_mask"])
    with head(model):
        gen = model.generate(**{k: v for k, v in batch.items() if k != "position_ids"}, max_new_tokens=3,
                             min_new_tokens=3, do_sample=False)
        last = model(**batch).logits[:, -1]
        exits = head.exit_layer.tolist()
        for i in range(3):
            one = {k: v[i : i + 1] for k, v in make_batch(processor, 3).items()}
            keep = one["attention_mask"][0].bool()
            one["input_ids"], one["attention_mask"] = one["input_ids"][:, keep], one["attention_mask"][:, keep]
            torch.testing.assert_close(model(**one).logits[0, -1], last[i], atol=ATOL, rtol=0)
            assert head.exit_layer.tolist() == [exits[i]]
            g1 = model.generate(**one, max_new_tokens=3, min_new_tokens=3, do_sample=False)
            assert torch.equal(g1[0, -3:], gen[i, -3:])


def test_dyvte_composes_with_fastv():
    model, processor = tiny_testbed("llava", text_layers=8, seed=0)
    batch = make_batch(processor, 2)
    head = _head(model, 5)
    with torch.no_grad(), load_pruner([head, load_pruner("fastv", keep=10)])(model) as engine:
        model(**batch)
    assert engine.kept_tokens["llm:2"].tolist() == [10, 10]
    assert engine.kept_tokens["llm:5"].tolist() == [0, 0]


class _ConstantExit(DyVTEHead):
    """Every router says exit with probability 0.8: which layer exits is decided by the thresholds alone."""

    def exit_logits(self, layer, features):
        p = torch.tensor([0.2, 0.8])
        return p.log().expand(features.shape[0], 2)


@torch.no_grad()
def test_per_layer_thresholds_pick_the_exit_layer_and_round_trip(tmp_path):
    model, processor = tiny_testbed("llava", text_layers=8, seed=0)
    batch = make_batch(processor, 2)
    tc = model.config.text_config
    for threshold, exit_at in ((0.7, 1), (0.9, 8), ([0.9, 0.9, 0.7, 0.9, 0.9, 0.9, 0.9], 3)):
        head = _ConstantExit(tc.hidden_size, 8, threshold=threshold).eval()
        with head(model):
            model(**batch)
        assert head.exit_layer.tolist() == [exit_at, exit_at]
    head = DyVTEHead(tc.hidden_size, 8, threshold=[0.9, 0.9, 0.7, 0.9, 0.9, 0.9, 0.9])
    head.save_pretrained(tmp_path / "h")
    assert load_pruner(str(tmp_path / "h")).threshold == [0.9, 0.9, 0.7, 0.9, 0.9, 0.9, 0.9]
    assert load_pruner(str(tmp_path / "h"), threshold=0.6).threshold == 0.6
    with pytest.raises(ValueError, match="one per router site llm:1..llm:7"):
        DyVTEHead(tc.hidden_size, 8, threshold=[0.5, 0.5])
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\), got \[1.5\]"):
        DyVTEHead(tc.hidden_size, 8, threshold=[0.5] * 6 + [1.5])


def test_a_per_layer_threshold_for_another_depth_fails_with_the_config_node_to_change(tmp_path):
    from functools import partial

    from learned_prune.modules import DyVTEModule

    model, processor = tiny_testbed("llava", text_layers=4, seed=0)
    with pytest.raises(ValueError, match=r"module.head: .*one float for every router \(e.g. 0.5\), or one per router "
                                         r"site llm:1..llm:3 \(3 values\), got 7"):
        DyVTEModule(model, processor, head=partial(DyVTEHead, threshold=[0.75] * 7))


def test_label_buffer_keeps_the_newest_samples_and_draws_only_stored_ones():
    from learned_prune.modules.dyvte import LabelBuffer

    buf = LabelBuffer(capacity=5)
    for start in (0, 3, 6):  # 9 samples through a 5-slot buffer: 4..8 remain
        ids = torch.arange(start, start + 3, dtype=torch.float32)
        buf.add(ids[:, None, None].expand(3, 2, 4), torch.stack([ids.long() % 2, torch.full((3,), -1)], 1))
    assert buf.size == 5
    assert sorted(buf.x[:, 0, 0].long().tolist()) == [4, 5, 6, 7, 8]
    x, y = buf.sample(64, torch.device("cpu"))
    assert x.shape == (64, 2, 4) and y.shape == (64, 2)
    assert set(x[:, 0, 0].long().tolist()) <= {4, 5, 6, 7, 8}
    assert (y[:, 0] == x[:, 0, 0].long() % 2).all() and (y[:, 1] == -1).all()  # labels stay with their features


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # steps called without a Trainer
def test_replay_trains_on_earlier_labels_and_validation_does_not_join_the_buffer(tmp_path):
    cfg = compose_train(tmp_path, [*DYVTE, "test=false", "module.replay=6", "module.replay_capacity=10",
                                   "module.layers_per_step=2"], "dyvte-head")
    parts = build(cfg)
    module, dm = parts["module"], parts["datamodule"]
    dm.setup("fit")
    loader = iter(dm.train_dataloader())
    first = next(loader)
    module.router_loss(first, [1, 7], "train", replay=6)
    assert module.buffer.size == 4
    stored = module.buffer.y[:4]
    assert (stored[:, [1, 2, 3, 4, 5]] == -1).all() and (stored[:, [0, 6]] >= 0).all()  # only the labelled sites
    # the next step's loss includes replayed labels: with every stored label flipped, the loss changes
    second = next(loader)
    torch.manual_seed(0)
    base = module.router_loss(second, [1, 7], "train", replay=6)
    module.buffer.y[:4] = torch.where(stored >= 0, 1 - stored, stored)
    module.buffer.size, module.buffer.next = 4, 4
    torch.manual_seed(0)
    flipped = module.router_loss(second, [1, 7], "train", replay=6)
    assert not torch.isclose(base, flipped)
    assert module.buffer.size == 8
    module.validation_step(next(iter(dm.val_dataloader())), 0)
    assert module.buffer.size == 8
    with pytest.raises(ValueError, match="module.replay=-1"):
        from learned_prune.modules import DyVTEModule

        DyVTEModule(module.model, None, replay=-1)


def test_a_run_with_replay_resumes_from_its_checkpoint_and_refills_the_buffer(tmp_path):
    overrides = [*DYVTE, "test=false", "module.replay=4"]
    first = build(compose_train(tmp_path / "a", [*overrides, "trainer.max_steps=3"], "dyvte-head"))
    first["trainer"].fit(first["module"], datamodule=first["datamodule"])
    assert first["module"].buffer.size == 3 * 4  # three batches of 4 labelled samples
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    second = build(compose_train(tmp_path / "b", [*overrides, "trainer.max_steps=5"], "dyvte-head"))
    second["trainer"].fit(second["module"], datamodule=second["datamodule"], ckpt_path=str(last))
    assert second["trainer"].global_step == 5
    assert second["module"].buffer.size == 2 * 4  # not checkpointed: only the two steps after the resume


def test_flops_saved_by_hand():
    """An exit at layer e of L saves (L - e) layers' worth of the visual tokens' FLOPs; no exit saves nothing."""
    from learned_prune.modules import DyVTEModule

    model, processor = tiny_testbed("llava", text_layers=8, seed=0)
    module = DyVTEModule(model, processor)
    batch = make_batch(processor, 3)
    batch = {"prompt_input_ids": batch["input_ids"], "prompt_attention_mask": batch["attention_mask"]}
    module.head.exit_layer = torch.tensor([2, 8, 7])
    tc = model.config.text_config
    d, m = tc.hidden_size, tc.intermediate_size

    def layer(n: int) -> float:  # q, k, v, o projections + scores and weighted values + gated MLP
        return 4 * n * d * d + 2 * n * n * d + 3 * n * d * m

    n = batch["prompt_attention_mask"].sum(1).tolist()
    nv = (batch["prompt_input_ids"] == model.config.image_token_id).sum(1).tolist()
    want = [(8 - e) * (layer(n[i]) - layer(n[i] - nv[i])) / (8 * layer(n[i])) for i, e in enumerate((2, 8, 7))]
    got = module.flops_saved(batch)
    assert want[0] > want[2] > 0 and want[1] == 0
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-6, atol=0)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # steps called without a Trainer
def test_router_objective_raises_the_exit_probability_on_exit_labels(tmp_path, monkeypatch):
    """Label 1 means *exit* for the loss as for inference (``p_exit = softmax[:, 1]``): a gradient step on
    exit labels raises the routers' exit probability, on stay labels lowers it."""
    cfg = compose_train(tmp_path, [*DYVTE, "test=false"], "dyvte-head")
    parts = build(cfg)
    module, dm = parts["module"], parts["datamodule"]
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    feats, _ = module.make_labels(batch, [2, 5])
    start = {k: v.clone() for k, v in module.head.state_dict().items()}
    for label in (1, 0):
        module.head.load_state_dict(start)
        module.head.zero_grad()
        monkeypatch.setattr(module, "make_labels", lambda b, layers: (feats, {k: torch.full((4,), label) for k in layers}))
        opt = torch.optim.SGD(module.head.parameters(), lr=0.1)
        before = {k: module.head.exit_logits(k, feats[k]).softmax(-1)[:, 1].detach() for k in (2, 5)}
        module.router_loss(batch, [2, 5], "train").backward()
        opt.step()
        for k in (2, 5):
            after = module.head.exit_logits(k, feats[k]).softmax(-1)[:, 1].detach()
            assert ((after > before[k]) if label else (after < before[k])).all(), (label, k)
