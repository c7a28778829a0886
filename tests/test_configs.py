"""Every config group composes and instantiates; train.py runs a fast dev run (lightning-hydra-template style)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import open_dict

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.fixture
def compose_train(tmp_path):
    def _compose(*overrides: str):
        GlobalHydra.instance().clear()
        with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
            cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path)
            cfg.paths.root_dir = str(ROOT)
            cfg.paths.log_dir = str(tmp_path / "logs")
        return cfg

    yield _compose
    GlobalHydra.instance().clear()


@pytest.mark.parametrize("module", _options("module"))
def test_every_module_composes(compose_train, module):
    cfg = compose_train(f"module={module}")
    assert cfg.module._target_


@pytest.mark.parametrize("group", ["trainer", "logger", "callbacks", "data", "backbone"])
def test_every_option_composes(compose_train, group):
    for option in _options(group):
        cfg = compose_train("module=backbone", f"{group}={option}")
        assert group in cfg


@pytest.mark.parametrize("option", _options("trainer"))
def test_trainer_configs_instantiate(compose_train, option):
    cfg = compose_train("module=backbone", f"trainer={option}")
    if cfg.trainer.get("accelerator") == "gpu":
        pytest.skip("needs a GPU")
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert trainer.max_steps == cfg.trainer.max_steps


@pytest.mark.parametrize("option", _options("logger"))
def test_logger_configs_instantiate(compose_train, option):
    cfg = compose_train("module=backbone", f"logger={option}")
    if cfg.logger and "_target_" in cfg.logger:
        logger = instantiate(cfg.logger)
        assert logger.save_dir


def test_callbacks_instantiate(compose_train):
    cfg = compose_train("module=backbone")
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    assert len(callbacks) == len(cfg.callbacks)


def test_wrong_key_fails_early(compose_train):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose_train("module=backbone", "trainer.max_stepz=3")
    with pytest.raises(ConfigCompositionException):
        compose_train("module=no_such_module")


def test_train_backbone_fast_dev_run(tmp_path):
    """`python train.py module=backbone trainer.fast_dev_run=true` on a tiny config, as a subprocess."""
    cmd = [
        sys.executable, "train.py", "module=backbone", "trainer.fast_dev_run=true",
        "backbone.vision_hidden=32", "backbone.text_hidden=32", "backbone.text_layers=2", "backbone.vision_layers=2",
        "backbone.intermediate_size=64", "data.batch_size=4", "data.val_size=8", "data.test_size=8",
        f"paths.log_dir={tmp_path}", "logger=csv",
    ]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    summaries = list(tmp_path.rglob("summary.json"))
    assert summaries, out.stdout[-2000:]
    summary = json.loads(summaries[0].read_text())
    assert "test/acc" in summary["metrics"]
    exported = Path(summary["exported_to"])
    assert (exported / "model.safetensors").is_file() and (exported / "tokenizer.json").is_file()
    assert not str(exported).startswith(str(ROOT / "checkpoints"))  # a dev run never overwrites shipped weights


@pytest.mark.parametrize("option", ["deepspeed_zero2", "deepspeed_zero2_offload", "deepspeed_zero3"])
def test_deepspeed_strategies_instantiate_on_cpu(compose_train, option):
    cfg = compose_train("module=atp", f"trainer={option}")
    strategy = instantiate(cfg.trainer.strategy)
    zero = strategy.config["zero_optimization"]
    assert zero["stage"] == (3 if option.endswith("3") else 2)
    assert bool(zero.get("offload_optimizer")) == option.endswith("offload")


def test_every_registered_pruner_has_a_method_config():
    from learned_prune import PRUNERS, load_pruner
    from learned_prune.evaluate import method_options

    options = method_options(CONFIGS / "method")
    assert set(options) == set(PRUNERS)
    for name, kwargs in options.items():
        load_pruner(name, **kwargs)
