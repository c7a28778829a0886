"""Bad input a new user gives: each fails before any work is done, with one message that names the file,
key or argument and says what to change (issue #20: "silently wrong" items 4-5 and the "unclear" list)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import open_dict
from PIL import Image
from safetensors.torch import load_file, save_file

from learned_prune import load_backbone, load_pruner

ROOT = Path(__file__).resolve().parents[1]
HEAD = ROOT / "checkpoints" / "atp-tiny"


def compose_eval(out: Path, *overrides: str):
    """The composed eval.py config for ``overrides``, writing under ``out`` (tiny data, no timing)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        cfg = compose("eval", overrides=["data.test_size=4", "data.eval_batch_size=4", "timing.repeats=0",
                                         *overrides])
    GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        cfg.paths.root_dir = str(ROOT)
        cfg.paths.log_dir = str(out)
    return cfg


def _evaluate(tmp_path: Path, *overrides: str):
    from learned_prune.evaluate import evaluate

    return evaluate(compose_eval(tmp_path, *overrides))


def _head_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "head"
    shutil.copytree(HEAD, folder)
    return folder


# ---- item 4: damaged head files ----------------------------------------------------------------
def test_a_head_whose_weights_hold_nan_or_inf_is_refused_naming_the_file_and_tensor(tmp_path):
    folder = _head_copy(tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    name = sorted(k for k, v in state.items() if v.is_floating_point() and v.numel() >= 2)[0]
    state[name].view(-1)[:2] = torch.tensor([float("nan"), float("inf")])
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"model.safetensors: .*non-finite .*{name} \(1 NaN, 1 Inf\)"):
        load_pruner(str(folder))


@pytest.mark.parametrize("damage,match", [
    ("model.safetensors", r"model.safetensors: cannot read the head weights, not a valid safetensors file"),
    ("config.json", r"config.json: the head config is not valid JSON \(.* at line \d+, column \d+\)"),
])
def test_damaged_head_files_name_the_file(tmp_path, damage, match):
    folder = _head_copy(tmp_path)
    data = (folder / damage).read_bytes()
    (folder / damage).write_bytes(data[: len(data) // 2])  # an interrupted copy
    with pytest.raises(ValueError, match=match):
        load_pruner(str(folder))


def test_a_broken_config_in_checkpoints_stops_the_default_grid_instead_of_dropping_the_head(tmp_path):
    from learned_prune.evaluate import resolve_methods

    shutil.copytree(HEAD, tmp_path / "atp-tiny")
    assert resolve_methods(None, tmp_path)[-1] == str(tmp_path / "atp-tiny")
    (tmp_path / "atp-tiny" / "config.json").write_text('{"method": "atp", ')
    with pytest.raises(ValueError, match=r"atp-tiny/config.json: the config is not valid JSON.*methods=\[\.\.\.\]"):
        resolve_methods(None, tmp_path)


# ---- item 5: grid lists and POPE files ---------------------------------------------------------
@pytest.mark.parametrize("override,match", [
    ("keep=[]", r"keep=\[\] gives no budget, so random, pool, downsample, fastv.* would not run"),
    ("methods=[]", r"methods=\[\] names no method"),
    ("methods=[none,fastv,fastv]", r"methods lists fastv more than once"),
    ("keep=[16,32,16]", r"keep lists 16 more than once"),
    ("keep=[abc]", r"keep=\[abc\]: 'abc' is not a budget; a budget is a token count"),
    ("keep=[16,0]", r"keep=\[16,0\]: keep=0: a budget must keep at least 1"),
    ("keep=[16.0]", r"keep=\[16.0\]: keep=16.0: a ratio budget must lie in \(0, 1\]"),
])
def test_grid_lists_that_would_skip_or_repeat_runs_are_refused_before_anything_loads(tmp_path, override, match):
    with pytest.raises(ValueError, match=match):
        _evaluate(tmp_path, override)
    assert not (tmp_path / "results.jsonl").exists()


def test_budgets_are_optional_when_no_method_needs_one_and_one_number_is_a_list():
    from learned_prune.evaluation.methods import check_grid, parse_keeps

    check_grid(["none", str(HEAD)], [])  # `none` and an adaptive head take no budget
    assert parse_keeps(16) == [16] and parse_keeps([0.11, 32]) == [0.11, 32]


def _pope(tmp_path: Path, rows: list[dict]) -> Path:
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "a.jpg")
    (tmp_path / "pope.json").write_text("\n".join(json.dumps(r) for r in rows))
    return tmp_path


def _pope_set(root: Path, **kwargs):
    from learned_prune.data.vqa_files import VQABenchmarkDataset

    return VQABenchmarkDataset("pope", root, annotations="pope.json", image_folder=".", **kwargs)


def test_pope_labels_other_than_yes_or_no_are_refused_naming_the_line(tmp_path):
    from learned_prune.data.vqa_metrics import BenchmarkAccuracy

    row = {"image": "a.jpg", "text": "Is there a cat?"}
    root = _pope(tmp_path, [{**row, "label": "yes"}, {**row, "label": "Yes "}, {**row, "label": "true"}])
    with pytest.raises(ValueError, match=r"pope.json, line 3: needs a yes/no label \(got label='true'"):
        _pope_set(root)
    with pytest.raises(ValueError, match="POPE label 'true' is not yes/no"):
        BenchmarkAccuracy("pope").update(["yes"], ["true"])


def test_a_one_line_pope_file_is_one_question(tmp_path):
    root = _pope(tmp_path, [{"image": "a.jpg", "text": "Is there a cat?", "label": "no"}])
    dataset = _pope_set(root)
    assert len(dataset) == 1 and dataset[0]["answer"] == "no"


# ---- the "unclear" list ------------------------------------------------------------------------
def test_a_layer_out_of_range_fails_before_the_first_method_runs(tmp_path):
    with pytest.raises(ValueError, match=r"method 'fastv@layer=99': FastV layer=99: needs 1 <= layer < 8"):
        _evaluate(tmp_path, 'methods=[none,fastv,"fastv@layer=99"]', "keep=[16]")
    assert not (tmp_path / "results.jsonl").exists()  # `none` and `fastv` did not run first


def test_paths_that_do_not_exist_and_folders_of_the_wrong_kind_are_named():
    from learned_prune.evaluation.methods import check_spec

    with pytest.raises(FileNotFoundError, match=r"no such folder .*/no/such/backbone") as e:
        load_backbone("/no/such/backbone")
    assert "huggingface-cli" not in str(e.value)
    with pytest.raises(ValueError, match=r"is a pruning head's folder \(atp\), not a backbone: load it with load_pruner"):
        load_backbone(str(HEAD))
    with pytest.raises(FileNotFoundError, match=r"no head folder at checkpoints/atp-tny"):
        load_pruner("checkpoints/atp-tny")
    with pytest.raises(ValueError, match=r"no head folder at checkpoints/atp-tny"):
        check_spec("checkpoints/atp-tny+fastv")
    with pytest.raises(ValueError, match=r"names no `method`.*it is a backbone's config.*load_backbone"):
        load_pruner(str(ROOT / "checkpoints" / "tiny-llava-shapes"))


def test_a_lora_adapter_config_missing_a_key_names_the_file_and_key(tmp_path):
    from learned_prune.pruners.lora import LoraSettings, load_adapter, save_adapter

    save_adapter(tmp_path, {"layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 4)}, LoraSettings(r=2))
    assert load_adapter(tmp_path)[0].r == 2
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    del config["lora_alpha"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"adapter_config.json lacks 'lora_alpha': a LoRA adapter config needs"):
        load_adapter(tmp_path)


def test_vqa_rows_without_a_field_and_damaged_images_name_the_file(tmp_path):
    from learned_prune.data.vqa_files import VQABenchmarkDataset

    (tmp_path / "gqa.json").write_text(json.dumps({"q1": {"imageId": "a", "question": "What?", "answer": "x"},
                                                   "q2": {"imageId": "a", "question": "What?"}}))
    with pytest.raises(ValueError, match=r"gqa.json, question 'q2': needs 'answer'; a gqa row has question"):
        VQABenchmarkDataset("gqa", tmp_path, annotations="gqa.json")
    root = _pope(tmp_path, [{"image": "a.jpg", "text": "Is there a cat?", "label": "no"}])
    data = (root / "a.jpg").read_bytes()
    (root / "a.jpg").write_bytes(data[: len(data) // 2])  # a truncated download
    with pytest.raises(ValueError, match=r"image .*a.jpg cannot be read"):
        _pope_set(root)[0]
    with pytest.raises(ValueError, match=r"data.test_size=0: evaluate at least 1 question"):
        _pope_set(root, size=0)


def test_an_empty_test_split_is_refused_with_the_setting(tmp_path):
    with pytest.raises(ValueError, match=r"the evaluation split is empty \(data.test_size=0\)"):
        _evaluate(tmp_path, "data.test_size=0", "methods=[none]")


def test_training_on_evaluation_only_data_says_so_before_loading_anything(tmp_path):
    from helpers import compose_train

    from learned_prune.run import build

    with pytest.raises(ValueError, match=r"data=vqa reads benchmarks for evaluation only.*data=shapes"):
        build(compose_train(tmp_path, ["module=atp", "data=vqa"]))


def test_a_run_folder_that_cannot_be_written_fails_in_one_line(tmp_path):
    import os

    folder = Path("/sys/learned_prune_test") if os.geteuid() == 0 else tmp_path / "ro" / "run"
    if os.geteuid() != 0:
        folder.parent.mkdir()
        folder.parent.chmod(0o555)
    result = subprocess.run([sys.executable, "eval.py", f"hydra.run.dir={folder}", "methods=[none]"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    reason = "Operation not permitted" if os.geteuid() == 0 else "Permission denied"
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: the run folder {folder} cannot be written ({reason}): choose a writable one with "
        "hydra.run.dir=<folder> (or paths.log_dir=<folder>)")
