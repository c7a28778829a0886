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
from omegaconf import OmegaConf, open_dict

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


def _has_gpu() -> bool:
    """Whether a CUDA device is present: the GPU trainer configs are then instantiated, not skipped."""
    import torch

    return torch.cuda.is_available()


@pytest.mark.parametrize("option", _options("trainer"))
def test_trainer_configs_instantiate(compose_train, option):
    cfg = compose_train("module=backbone", f"trainer={option}")
    if cfg.trainer.get("accelerator") == "gpu" and not _has_gpu():
        pytest.skip(f"trainer={option} needs a GPU and torch.cuda.is_available() is False here")
    strategy = cfg.trainer.get("strategy")
    if OmegaConf.is_dict(strategy) and "DeepSpeed" in strategy.get("_target_", ""):
        pytest.importorskip("deepspeed", reason=f"trainer={option} needs the deepspeed package")
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


# ---- recipes from config: the head and the optimizer come from configs/module/<name>.yaml -----------------

LEARNED = ["atp", "bavit", "dyvte", "lvpruning"]
# one head argument per recipe, changed on the command line, with a value other than the shipped one
HEAD_OVERRIDE = {"atp": ("stride", 3), "bavit": ("width", 32), "dyvte": ("min_layer", 2), "lvpruning": ("tau", 0.5)}


def _head_class(cfg):
    from hydra.utils import get_class

    return get_class(cfg.module.head._target_)


@pytest.mark.parametrize("module", LEARNED)
def test_a_head_hyper_parameter_lives_in_one_place_and_reaches_the_export(compose_train, module, tmp_path):
    """``module.head`` holds the head's arguments (and nothing else names them); overriding one on the
    command line builds the head with it and the exported config.json carries it."""
    import inspect

    from learned_prune.testbed import testbed_llava
    from learned_prune.pruners.learned import LearnedHead

    arg, value = HEAD_OVERRIDE[module]
    cfg = compose_train(f"module={module}", f"module.head.{arg}={value}")
    head_cfg = {k: v for k, v in OmegaConf.to_container(cfg.module.head).items() if not k.startswith("_")}
    assert cfg.module.head._partial_ and issubclass(_head_class(cfg), LearnedHead)
    assert set(head_cfg) <= set(inspect.signature(_head_class(cfg).__init__).parameters)
    assert not set(head_cfg) & set(cfg.module), "a head argument is also a module argument"
    assert cfg.module.optimizer._target_ == "torch.optim.AdamW" and cfg.module.optimizer._partial_
    assert "lr" in cfg.module.optimizer and "lr" not in cfg.module

    model, processor = testbed_llava("llava", text_layers=8, seed=0)
    with open_dict(cfg):
        cfg.module.export_dir = str(tmp_path / "head")
    built = instantiate(cfg.module, model=model, processor=processor)
    assert isinstance(built.head, _head_class(cfg)) and getattr(built.head, arg) == value
    exported = json.loads((built.export(tmp_path / "head") / "config.json").read_text())["hparams"]
    assert exported[arg] == value
    for key, given in head_cfg.items():  # every configured argument is exported as configured (null: resolved)
        assert given is None or exported[key] == given, key
    opt = built.make_optimizer([p for p in built.parameters() if p.requires_grad])
    assert opt.defaults["lr"] == cfg.module.optimizer.lr and opt.defaults["weight_decay"] == cfg.module.optimizer.weight_decay


def test_a_head_argument_the_head_refuses_fails_naming_the_config_node(compose_train):
    from learned_prune.testbed import testbed_llava

    model, processor = testbed_llava("llava", text_layers=4, seed=0)
    cfg = compose_train("module=dyvte")  # seven thresholds: one per router of an 8-layer LLM
    from hydra.errors import InstantiationException

    with pytest.raises(InstantiationException, match=r"module.head: DyVTE threshold.*one per router site llm:1..llm:3"):
        instantiate(cfg.module, model=model, processor=processor)


@pytest.mark.parametrize("module", LEARNED + ["backbone"])
def test_a_recipe_takes_its_trainer_and_data_from_its_experiment_config(compose_train, module):
    """configs/module/<name>.yaml holds no trainer/data values; configs/experiment/<name>.yaml does, and
    `module=<name>` selects it (an explicit experiment=... still comes last)."""
    import yaml

    own = yaml.safe_load((CONFIGS / "module" / f"{module}.yaml").read_text())
    assert not {"trainer", "data", "optimized_metric"} & set(own)
    recipe = yaml.safe_load((CONFIGS / "experiment" / f"{module}.yaml").read_text())
    cfg = compose_train(f"module={module}")
    for group in ("trainer", "data"):
        for key, value in recipe[group].items():
            assert cfg[group][key] == value
    if "optimized_metric" in recipe:
        assert cfg.optimized_metric == recipe["optimized_metric"]
    assert compose_train(f"module={module}", "trainer.max_steps=7").trainer.max_steps == 7


def test_an_experiment_given_on_the_command_line_overrides_the_recipe(compose_train):
    cfg = compose_train("experiment=backbone_fast")
    assert cfg.module._target_.endswith("BackboneModule") and cfg.trainer.max_steps == 200
    assert cfg.module.tower_steps == 50 and cfg.data.val_size == 128


# ---- configs/method: instantiable pruner configs --------------------------------------------------------

@pytest.mark.parametrize("method", _options("method"))
def test_every_method_config_instantiates_its_registered_pruner(method):
    """`+method=<name>` composes in eval.py's config; hydra.utils.instantiate builds the registry's class
    with the same arguments eval.py gives load_pruner (method_options)."""
    import dataclasses

    from learned_prune import PRUNERS
    from learned_prune.evaluate import method_options

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
            cfg = compose("eval", overrides=[f"+method={method}"])
    finally:
        GlobalHydra.instance().clear()
    pruner = instantiate(cfg.method)
    assert type(pruner) is PRUNERS[method]
    options = method_options(CONFIGS / "method")[method]
    assert "_target_" not in options and "name" not in options and "keep" not in options
    fields = {f.name: getattr(pruner, f.name) for f in dataclasses.fields(pruner)} if dataclasses.is_dataclass(pruner) else {}
    for key, value in options.items():
        assert fields[key] == value, key
