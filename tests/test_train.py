"""train.py end to end on tiny configs: resumption and reproducibility."""

from __future__ import annotations

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
