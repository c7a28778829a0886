"""train.py end to end on tiny configs: resumption and reproducibility."""

from __future__ import annotations

from pathlib import Path

import torch

from learned_prune.run import train

from helpers import compose_train
from test_configs import CONFIGS

TINY = [
    "module=backbone", "backbone.vision_hidden=32", "backbone.text_hidden=32", "backbone.text_layers=2",
    "backbone.vision_layers=2", "backbone.intermediate_size=64", "data.batch_size=4", "data.val_size=4",
    "data.test_size=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "logger=csv", "test=false",
    "~callbacks.progress_bar", "trainer.enable_progress_bar=false",
]


def _cfg(out, *overrides):
    return compose_train(out, [*TINY, *overrides], "export")


def test_resumed_run_continues_from_its_checkpoint_step(tmp_path):
    first = tmp_path / "a"
    train(_cfg(first, "trainer.max_steps=4"))
    last = first / "checkpoints" / "last.ckpt"
    assert last.is_file()
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 4
    resumed = tmp_path / "b"
    train(_cfg(resumed, "trainer.max_steps=6", f"ckpt_path={last}"))
    state = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 6  # 4 steps from the first run + 2 more, not 6 from scratch
    metrics = (resumed / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    steps = [int(line.split(",")[[h for h in metrics[0].split(",")].index("step")]) for line in metrics[1:]
             if line.split(",")[metrics[0].split(",").index("step")]]
    assert min(steps) >= 4, steps


def test_seeded_runs_are_reproducible(tmp_path):
    a = train(_cfg(tmp_path / "a", "trainer.max_steps=2", "optimized_metric=train/loss"))
    b = train(_cfg(tmp_path / "b", "trainer.max_steps=2", "optimized_metric=train/loss"))
    assert a is not None and a == b


def test_position_jitter_moves_the_question_and_never_overlaps_the_image():
    from learned_prune.testbed import testbed_llava
    from learned_prune.testbed import BackboneModule

    model, processor = testbed_llava("llava", seed=0)
    image = model.config.image_token_id
    n = 6
    ids = torch.tensor([[1, 2] + [image] * n + [7, 8, 9]] * 64)
    module = BackboneModule(model, processor, position_jitter=4, sincos_positions=False).train()
    torch.manual_seed(0)
    pos = module._positions({"input_ids": ids})
    assert torch.equal(pos[:, :2], torch.tensor([[0, 1]] * 64))  # before the image: unchanged
    gaps = pos[:, -3:] - torch.arange(8, 11)
    assert (gaps == gaps[:, :1]).all() and set(gaps[:, 0].tolist()) == set(range(-4, 5))  # the question moves as one
    img = pos[:, 2:2 + n]
    assert (img[:, 1:] >= img[:, :-1]).all() and (img[:, 0] == 2).all()  # the image compresses, in order
    assert (pos[:, 2 + n] > img[:, -1]).all()  # and never reaches the question's positions
    for row, g in zip(pos, gaps[:, 0].tolist()):
        assert int(row[2 + n - 1]) == 2 + n - 1 + min(g, 0)  # re-packing |g| of n tokens ends the image there
    assert module.eval()._positions({"input_ids": ids}) is None  # evaluation sees the plain positions
    assert BackboneModule(model, processor, sincos_positions=False).train()._positions({"input_ids": ids}) is None


def test_backbone_trains_with_position_jitter(tmp_path):
    loss = train(_cfg(tmp_path, "module.position_jitter=8", "trainer.max_steps=2", "module.tower_steps=1",
                      "optimized_metric=train/loss"))
    assert loss is not None and torch.isfinite(torch.tensor(loss))


def test_relation_readout_teaches_the_relation_only_on_position_questions():
    from learned_prune.testbed import testbed_llava
    from learned_prune.data import VQACollator
    from learned_prune.testbed import BackboneModule, ShapesVQADataset

    model, processor = testbed_llava("llava", text_layers=4, seed=0)
    ds = ShapesVQADataset("val", size=64, question_weights={"position": 1.0, "color": 1.0})
    items = [ds[i] for i in range(64)]
    batch = VQACollator(processor)(items)
    torch.manual_seed(0)
    plain = BackboneModule(model, processor, sincos_positions=False)
    with_relation = BackboneModule(model, processor, sincos_positions=False, relation_weight=1.0)
    with_relation.readout_probe.load_state_dict(plain.readout_probe.state_dict())
    _, base, _ = plain._losses(batch)
    loss, parts, _ = with_relation._losses(batch)
    assert parts["readout_loss"] > base["readout_loss"]  # the relation terms add to the read-out
    loss.backward()
    assert with_relation.offset_probe.weight.grad.abs().sum() > 0
    assert with_relation.relation_probe.weight.grad.abs().sum() > 0
    colour_only = VQACollator(processor)([s for s in items if s["qtype"] == "color"])
    _, a, _ = plain._losses(colour_only)
    _, b, _ = with_relation._losses(colour_only)
    assert torch.allclose(a["readout_loss"], b["readout_loss"])  # no position question: nothing added


def test_plain_ddp_with_a_tower_stage_fails_early_with_the_strategy_to_use():
    import pytest
    from pytorch_lightning.strategies import DDPStrategy, SingleDeviceStrategy

    from learned_prune.testbed.recipe import check_ddp_allows_the_tower_stage

    with pytest.raises(ValueError, match="trainer.strategy=ddp_find_unused_parameters_true"):
        check_ddp_allows_the_tower_stage(DDPStrategy(), tower_steps=1000)
    check_ddp_allows_the_tower_stage(DDPStrategy(find_unused_parameters=True), tower_steps=1000)
    check_ddp_allows_the_tower_stage(DDPStrategy(), tower_steps=0)
    check_ddp_allows_the_tower_stage(SingleDeviceStrategy("cpu"), tower_steps=1000)


class _SeenSamples:
    """Records the dataset indices of every training batch (a Lightning callback)."""

    def __new__(cls):
        import pytorch_lightning as pl

        class Seen(pl.Callback):
            def __init__(self):
                self.steps = []

            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                self.steps.append(batch["index"].tolist())

        return Seen()


def _fit_recording(out, *overrides, ckpt_path=None, crash_at=None):
    import pytorch_lightning as pl

    from learned_prune.run import build

    class Crash(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == crash_at:
                raise RuntimeError("simulated crash")

    parts = build(_cfg(out, *overrides))
    seen = _SeenSamples()
    parts["trainer"].callbacks.extend([seen, Crash()])
    try:
        parts["trainer"].fit(parts["module"], datamodule=parts["datamodule"], ckpt_path=ckpt_path)
    except RuntimeError as e:
        assert crash_at is not None and "simulated crash" in str(e)
    return seen.steps


def test_a_resumed_run_goes_on_with_the_samples_the_crashed_one_had_not_trained_on(tmp_path):
    whole = _fit_recording(tmp_path / "whole", "trainer.max_steps=6")
    crashed = _fit_recording(tmp_path / "a", "trainer.max_steps=6", crash_at=4)  # LastCheckpoint saves on the way out
    rest = _fit_recording(tmp_path / "b", "trainer.max_steps=6", ckpt_path=str(tmp_path / "a" / "checkpoints" / "last.ckpt"))
    assert len(whole) == 6 and crashed[:4] == whole[:4]
    assert rest == whole[4:]  # not the epoch's first batches again


def test_the_shuffle_is_the_one_of_a_seeded_dataloader_in_every_epoch():
    from torch.utils.data import DataLoader

    from learned_prune.data import ResumableShuffle

    n = 103
    plain = DataLoader(list(range(n)), batch_size=10, shuffle=True, generator=torch.Generator().manual_seed(3))
    want = [[int(i) for b in plain for i in b] for _ in range(3)]
    sampler = ResumableShuffle(n, 3)
    ours = DataLoader(list(range(n)), batch_size=10, sampler=sampler, generator=torch.Generator().manual_seed(3))
    for epoch in range(3):
        sampler.set_epoch(epoch)
        assert [int(i) for b in ours for i in b] == want[epoch]
    sampler.set_epoch(1)
    sampler.skip = 20
    assert [int(i) for b in ours for i in b] == want[1][20:]  # once: the next epoch starts at the top again
    assert [int(i) for b in ours for i in b] == want[1]


def test_no_step_limit_gives_a_schedule_over_the_epochs_not_a_zero_learning_rate(tmp_path):
    import pytorch_lightning as pl

    from learned_prune.run import build

    class RecordLR(pl.Callback):
        lrs: list = []

        def on_train_batch_start(self, trainer, *args):
            self.lrs.append(max(g["lr"] for g in trainer.optimizers[0].param_groups))

    parts = build(_cfg(tmp_path, "trainer.max_steps=-1", "trainer.max_epochs=1", "data.train_size=32"))
    trainer, record = parts["trainer"], RecordLR()
    trainer.callbacks.append(record)
    trainer.fit(parts["module"], datamodule=parts["datamodule"])
    assert trainer.global_step == 8  # 32 samples / batch 4, one epoch
    assert all(lr > 0 for lr in record.lrs[:7]), record.lrs  # a schedule over 8 steps, not over "-1"


def test_no_limit_at_all_fails_before_training_with_what_to_set(tmp_path):
    import pytest

    from learned_prune.run import build

    parts = build(_cfg(tmp_path, "trainer.max_steps=-1", "trainer.max_epochs=-1"))
    with pytest.raises(ValueError, match="trainer.max_steps=N"):
        parts["trainer"].fit(parts["module"], datamodule=parts["datamodule"])


def test_train_returns_the_optimized_metric_and_fails_loudly_when_it_was_not_logged(tmp_path):
    import json

    import pytest

    from learned_prune.run import optimized_value

    assert optimized_value({"val/acc": 0.5}, "val/acc") == 0.5
    assert optimized_value({"val/acc": 0.5}, None) is None
    with pytest.raises(KeyError, match=r"optimized_metric='val/acc' was not logged by this run; logged metrics: "
                                       r"train/loss, val/f1"):
        optimized_value({"val/f1": 1.0, "train/loss": 2.0}, "val/acc")
    with pytest.raises(KeyError, match=r"optimized_metric='val/no_such_metric'.*logged metrics: .*train/loss"):
        train(_cfg(tmp_path, "trainer.max_steps=1", "optimized_metric=val/no_such_metric",
                   "callbacks.model_checkpoint.monitor=train/loss"))
    assert "train/loss" in json.loads((tmp_path / "summary.json").read_text())["metrics"]  # the run's record is kept


def _best(folder) -> dict:
    """The ModelCheckpoint state saved in a run's last.ckpt."""
    state = torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return next(v for k, v in state["callbacks"].items() if k.startswith("BestCheckpoint") or "ModelCheckpoint" in k)


def test_a_run_resumed_into_another_folder_validates_before_it_ends_and_keeps_its_best_checkpoint(tmp_path):
    import csv
    import json

    first, resumed = tmp_path / "a", tmp_path / "b"
    train(_cfg(first, "trainer.max_steps=4"))  # validates at steps 2 and 4 (every 2 steps)
    before = _best(first)
    value = train(_cfg(resumed, "trainer.max_steps=5", f"ckpt_path={first}/checkpoints/last.ckpt"))
    summary = json.loads((resumed / "summary.json").read_text())
    assert value is not None and value == summary["metrics"]["val/acc"]  # not None, not an error: it validated
    rows = list(csv.DictReader(open(resumed / "csv" / "version_0" / "metrics.csv")))
    assert [int(r["step"]) for r in rows if r.get("val/acc")] == [5]  # at its last step, between two intervals
    after = _best(resumed)
    if value > float(before["best_model_score"]):  # better: the resumed run's own checkpoint is the best
        assert Path(after["best_model_path"]).parent == resumed / "checkpoints"
    else:  # not better: the first folder's best stays the best (Lightning's own forgot it in a new folder)
        assert after["best_model_path"] == before["best_model_path"] == summary["best_checkpoint"]
        assert float(after["best_model_score"]) == float(before["best_model_score"])
    assert Path(before["best_model_path"]).is_file()  # nothing outside the new run's folder is deleted


def test_the_best_checkpoint_record_skips_files_that_are_gone(tmp_path):
    from learned_prune.modules.callbacks import BestCheckpoint

    (tmp_path / "old").mkdir()
    kept = tmp_path / "old" / "step_2.ckpt"
    kept.write_bytes(b"")
    callback = BestCheckpoint(dirpath=str(tmp_path / "new"), monitor="val/acc", mode="max", save_top_k=1)
    callback.load_state_dict({"dirpath": str(tmp_path / "old"), "best_model_path": str(tmp_path / "old" / "gone.ckpt"),
                              "best_model_score": torch.tensor(0.9), "best_k_models": {
                                  str(tmp_path / "old" / "gone.ckpt"): torch.tensor(0.9), str(kept): torch.tensor(0.5)}})
    assert callback.best_model_path == str(kept) and float(callback.best_model_score) == 0.5
    assert callback.kth_best_model_path == str(kept)
