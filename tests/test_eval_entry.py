"""eval.py as a user runs it: configs/eval.yaml composed with Hydra and run on a tiny grid on the shipped backbone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from learned_prune.evaluate import evaluate, resolve_methods
from learned_prune.pruners import PRUNERS
from learned_prune.testbed import ShapesVQADataset

ROOT = Path(__file__).resolve().parents[1]
TINY_GRID = ["methods=[none,fastv]", "keep=[16]", "data.test_size=4", "data.eval_batch_size=4", "timing.repeats=0",
             "data.eval_split=test"]


def _compose_eval(out: Path, *overrides: str):
    """configs/eval.yaml composed as eval.py composes it, writing under ``out``."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
            return compose("eval", overrides=[*overrides, f"paths.output_dir={out}", f"paths.root_dir={ROOT}"])
    finally:
        GlobalHydra.instance().clear()


def test_eval_config_runs_a_tiny_grid_and_writes_records_table_and_plot(tmp_path, capsys):
    cfg = _compose_eval(tmp_path, *TINY_GRID)
    assert cfg.backbone.name_or_path == f"{ROOT}/checkpoints/tiny-llava-shapes"  # the embedded default
    records = evaluate(cfg)
    assert f"eval run folder: {tmp_path}" in capsys.readouterr().out
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert [json.loads(line)["method"] for line in lines] == ["none", "fastv"] == [r["method"] for r in records]
    by = {r["method"]: r for r in records}
    none, fastv = by["none"], by["fastv"]
    assert none["keep"] == "all" and fastv["keep"] == 16
    assert {r["dataset"] for r in records} == {"shapesvqa:test"} and {r["n_samples"] for r in records} == {4}
    assert none["accuracy"] >= 0.75  # the shipped backbone answers nearly every question unpruned
    assert 0.0 <= fastv["accuracy"] <= 1.0
    assert none["kept_tokens"] == {} and fastv["kept_tokens"] == {"llm:2": 16}
    assert fastv["options"] == {"layer": 2}  # configs/method/fastv.yaml's arguments reach the pruner
    assert 0 < fastv["prefill_tflops"] < none["prefill_tflops"]
    assert none["flops"]["vision"] == fastv["flops"]["vision"] and fastv["flops"]["llm"] < none["flops"]["llm"]
    table = (tmp_path / "results.md").read_text().splitlines()
    assert len(table) == 4 and table[2].startswith("| fastv | 16 |") and table[3].startswith("| none | all |")
    assert (tmp_path / "accuracy_vs_flops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same command again resumes: nothing is run twice, the records are the same
    again = evaluate(_compose_eval(tmp_path, *TINY_GRID))
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 2
    assert [(r["method"], r["keep"], r["accuracy"]) for r in again] == [(r["method"], r["keep"], r["accuracy"])
                                                                        for r in records]


def test_a_list_of_splits_runs_each_into_one_results_file(tmp_path):
    records = evaluate(_compose_eval(tmp_path, *TINY_GRID[:-1], "methods=[none]", "data.eval_split=[test,hard]"))
    assert sorted(r["dataset"] for r in records) == ["shapesvqa:hard", "shapesvqa:test"]
    hard = ShapesVQADataset("hard", size=4)
    assert all(len(hard[i]["objects"]) >= 6 for i in range(4))  # the hard split's crowded scenes
    assert {line.split(" | ")[2] for line in (tmp_path / "results.md").read_text().splitlines()[2:]} == \
        {"shapesvqa:test", "shapesvqa:hard"}


def test_default_grid_is_every_pruner_and_every_shipped_head(tmp_path):
    cfg = _compose_eval(tmp_path)
    assert cfg.methods is None and list(cfg.keep) == [0.11, 0.22, 0.33]
    methods = resolve_methods(cfg.methods, Path(cfg.paths.checkpoints_dir))
    heads = [m for m in methods if m not in PRUNERS]
    assert methods[: len(PRUNERS)] == list(PRUNERS)
    assert sorted(Path(h).name for h in heads) == ["atp-tiny", "bavit-tiny", "dyvte-tiny", "lvpruning-tiny"]


def test_eval_py_runs_from_the_command_line(tmp_path):
    """``python eval.py`` itself (Hydra's entry point, its run folder and runtime paths)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "eval.py", "methods=[none]", "keep=[16]", "data.test_size=2", "data.eval_batch_size=2",
           "timing.repeats=0", "data.eval_split=test", f"hydra.run.dir={tmp_path}"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"eval run folder: {tmp_path}" in done.stdout
    (record,) = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert record["method"] == "none" and record["n_samples"] == 2
    assert (tmp_path / ".hydra" / "config.yaml").is_file() and (tmp_path / "results.md").is_file()
