"""Habits of the entry points (issue #20): eval.py says where it writes and how to resume after Ctrl-C,
CPU peak memory reads "n/a" rather than a made-up 0, and Lightning's noise that tells the user nothing
is filtered out (only those messages)."""

from __future__ import annotations

import logging

import pytest
import torch

from learned_prune.evaluation.measure import time_prefill_and_generation
from learned_prune.evaluation.report import markdown_table

from conftest import get_tiny, make_batch
from test_bad_input import compose_eval


def test_eval_prints_its_run_folder_first_and_a_ctrl_c_ends_with_how_to_resume(tmp_path, monkeypatch, capsys):
    import learned_prune.evaluate as evaluate

    def interrupted(*args, **kwargs):
        print("eval grid: 3/10 runs")
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "run_grid", interrupted)
    with pytest.raises(SystemExit) as e:
        evaluate.main(compose_eval(tmp_path, "methods=[none,fastv]", "keep=[16]"))
    assert e.value.code == 130
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == f"eval run folder: {tmp_path} (an interrupted grid resumes with hydra.run.dir={tmp_path})"
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"interrupted; finished runs are kept in {tmp_path / 'results.jsonl'}. Resume: python eval.py")
    assert last.endswith(f"hydra.run.dir={tmp_path}")


def test_cpu_peak_memory_is_not_measured_and_shows_n_a():
    from learned_prune import load_pruner

    model, processor = get_tiny("llava")
    batch = make_batch(processor, 1)
    timing = time_prefill_and_generation(model, load_pruner("fastv", keep=8), batch, repeats=1, warmup=0)
    assert timing["peak_mem_mb"] is None and timing["prefill_ms"] > 0 and timing["kv_cache_mb"] > 0
    record = {"method": "fastv", "keep": 8, "dataset": "d", "accuracy": 0.5, "kept_tokens": {}, "prefill_tflops": 1.0,
              **timing}
    cells = markdown_table([record]).splitlines()[-1].split(" | ")
    assert cells[-2] == "n/a"  # peak MB; the KV-cache MB beside it is measured
    skipped = dict.fromkeys(timing)  # timing.repeats=0: every timing field "-"
    assert markdown_table([{**record, **skipped}]).splitlines()[-1].endswith("| - | - | - | - |")


class _Collect(logging.Handler):
    """Keeps the messages that reach Lightning's own log handlers (what a user sees)."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_lightning_noise_that_says_nothing_is_filtered_out(tmp_path):
    import warnings

    from test_atp import _cfg

    from learned_prune.run import build

    collect, lightning = _Collect(), logging.getLogger("pytorch_lightning")
    lightning.addHandler(collect)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            parts = build(_cfg(tmp_path, "trainer.max_steps=2", "trainer.val_check_interval=1", "test=false",
                               "callbacks.last_checkpoint.every_n_steps=1"))
            parts["trainer"].fit(parts["module"], datamodule=parts["datamodule"])
    finally:
        lightning.removeHandler(collect)
    said = "\n".join(collect.messages + [str(w.message) for w in caught])
    for noise in ("litlogger", "in eval mode at the start of training", "`weights_only` was not set"):
        assert noise not in said, noise
    assert "`Trainer.fit` stopped: `max_steps=2` reached." in said  # Lightning's other messages still show
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
