"""``python train.py -m hparams_search=<head>``: Optuna through Hydra's sweeper, a budgeted metric, resumption."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from learned_prune.sweep import BudgetScore, visual_fraction

ROOT = Path(__file__).resolve().parents[1]
HEADS = ["atp", "lvpruning", "bavit", "dyvte", "flashsloth", "quecc"]
TINY = [
    "backbone=tiny_init", "backbone.vision_hidden=32", "backbone.text_hidden=32", "backbone.text_layers=8",
    "backbone.vision_layers=2", "backbone.intermediate_size=64", "data.batch_size=4", "data.val_size=4",
    "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "test=false",
    "~callbacks.progress_bar", "trainer.enable_progress_bar=false",
]


def _sweep(folder: Path, n_trials: int, head: str = "atp") -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "train.py", "-m", f"hparams_search={head}", f"hydra.sweeper.n_trials={n_trials}", *TINY,
           f"hydra.sweep.dir={folder}"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def _study(folder: Path, name: str = "atp"):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{folder}/optuna.db")


def test_visual_fraction_by_hand():
    # ATP at llm:3 and llm:5 of 8 layers: 3 whole layers, 2 at 0.5, 3 at 0.25
    atp = {"val/kept_frac/llm:3": 0.5, "val/kept_frac/llm:5": 0.25, "val/kept_tokens": 36.0}
    assert visual_fraction(atp, "val", 8, 144, "layers") == pytest.approx((3 + 2 * 0.5 + 3 * 0.25) / 8)
    assert visual_fraction(atp, "val", 8, 144, "tokens") == pytest.approx(0.25)
    # DyVTE: half the samples exit at layer 2 (6 of 8 layers without visual tokens), the rest never
    dyvte = {"val/exit_frac/llm:1": 0.0, "val/exit_frac/llm:2": 0.5}
    assert visual_fraction(dyvte, "val", 8, 144, "layers") == pytest.approx(1 - 0.5 * 6 / 8)
    with pytest.raises(ValueError, match="cost=layers"):
        visual_fraction(dyvte, "val", 8, 144, "tokens")
    # a vision-site head: the kept count over the image's tokens, the same in every layer
    assert visual_fraction({"val/kept_tokens": 16.0}, "val", 8, 144, "layers") == pytest.approx(16 / 144)
    with pytest.raises(KeyError, match="kept_tokens"):
        visual_fraction({"val/acc": 1.0}, "val", 8, 144)


def test_budget_score_charges_only_the_overshoot():
    score = BudgetScore(budget=0.1, cost="tokens", penalty=1.0)
    within = score.score({"val/acc": 0.9, "val/kept_tokens": 14.0}, "val", 8, 144)
    assert within["val/acc_at_budget"] == pytest.approx(0.9)  # 14 of 144 < 10%: no charge, no bonus
    over = score.score({"val/acc": 0.9, "val/kept_tokens": 28.8}, "val", 8, 144)
    assert over["val/acc_at_budget"] == pytest.approx(0.9 - 1.0)  # twice the budget: one whole unit
    assert score.score({"val/kept_tokens": 3.0}, "val", 8, 144) == {}  # no accuracy: nothing to score
    with pytest.raises(ValueError, match="budget"):
        BudgetScore(budget=0.0)
    with pytest.raises(ValueError, match="cost"):
        BudgetScore(budget=0.1, cost="flops")


@pytest.mark.parametrize("head", HEADS)
def test_wandb_sweep_describes_the_same_space(head):
    """sweeps/wandb/<head>.yaml searches the keys and values of configs/hparams_search/<head>.yaml, for the same
    metric, and its runs select the same search config (module, budget, metric)."""
    optuna_cfg = yaml.safe_load((ROOT / "configs" / "hparams_search" / f"{head}.yaml").read_text())
    base = yaml.safe_load((ROOT / "configs" / "hparams_search" / "base.yaml").read_text())
    wandb_cfg = yaml.safe_load((ROOT / "sweeps" / "wandb" / f"{head}.yaml").read_text())
    params = optuna_cfg["hydra"]["sweeper"]["params"]
    assert set(params) == set(wandb_cfg["parameters"])
    for key, spec in params.items():
        w = wandb_cfg["parameters"][key]
        interval = re.fullmatch(r"tag\(log, interval\(([^,]+), ([^)]+)\)\)", spec)
        if interval:
            assert w["distribution"] == "log_uniform_values"
            assert (w["min"], w["max"]) == (float(interval[1]), float(interval[2])), key
        else:
            values = yaml.safe_load("[" + re.fullmatch(r"choice\((.*)\)", spec)[1] + "]")
            assert w["values"] == values, key
    assert wandb_cfg["metric"] == {"name": base["optimized_metric"], "goal": "maximize"}
    assert f"hparams_search={head}" in wandb_cfg["command"]


def test_sweep_runs_three_trials_and_reports_the_best(tmp_path):
    done = _sweep(tmp_path, 3)
    study = _study(tmp_path)
    values = [t.value for t in study.trials if t.state.name == "COMPLETE"]
    assert len(values) == 3 and all(v is not None for v in values)
    for n in range(3):  # each trial trained, validated and exported in its own folder
        assert (tmp_path / f"trial_{n}" / "atp-tiny" / "model.safetensors").is_file()
        assert f"hparams_search: trial {n} finished ({n + 1} of 3)" in done.stdout
    best = study.best_trial
    assert f"best of 3 finished trials: trial {best.number}, val/acc_at_budget = {best.value:.4f}" in done.stdout
    results = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(best.value)
    # the value optimised is the run's accuracy at the budget, not its accuracy
    summary = yaml.safe_load((tmp_path / f"trial_{best.number}" / "summary.json").read_text())["metrics"]
    assert summary["val/acc_at_budget"] == pytest.approx(best.value)
    expected = BudgetScore(budget=0.333, cost="layers").score(summary, "val", 8, 144)["val/acc_at_budget"]
    assert best.value == pytest.approx(expected, abs=1e-6)


def test_interrupted_sweep_resumes_where_it_stopped(tmp_path):
    _sweep(tmp_path, 1)
    first = (tmp_path / "trial_0" / "summary.json").read_text()
    study = _study(tmp_path)
    study.ask()  # a trial that was running when the search was killed: RUNNING in the study, never told
    done = _sweep(tmp_path, 3)
    assert "1 of 3 trials finished, 1 interrupted (marked failed), 2 to run" in done.stdout
    trials = _study(tmp_path).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert (tmp_path / "trial_0" / "summary.json").read_text() == first  # an earlier trial's folder is kept
    assert all((tmp_path / f"trial_{n}" / "summary.json").is_file() for n in (2, 3))
    assert trials[2].params != trials[0].params  # the re-seeded sampler does not repeat the first trial
    assert "trial 3 finished (3 of 3)" in done.stdout
    assert "best of 3 finished trials" in done.stdout
