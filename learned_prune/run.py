"""What ``train.py`` does: compose -> instantiate -> fit -> test -> export -> summary.

Kept out of ``train.py`` so that tests and sweeps can call :func:`train` on a composed config.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf

from .modules.callbacks import ExportOnTrainEnd, LastCheckpoint

# Lightning messages that tell the user nothing here: the frozen backbone is in eval mode on purpose, the
# litlogger advertisement, and the `weights_only` default announced at every checkpoint save
_QUIET_WARNINGS = (r"Found \d+ module\(s\) in eval mode at the start of training",
                   r"`isinstance\(treespec, LeafSpec\)` is deprecated")
_QUIET_LOGS = ("💡 Tip: For seamless cloud logging", "`weights_only` was not set, defaulting to")


class _DropMessages(logging.Filter):
    """Drops log records whose message starts with one of ``_QUIET_LOGS``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_QUIET_LOGS)


def quiet_lightning() -> None:
    """Silence Lightning's messages that say nothing to the user (only those, by filter; idempotent)."""
    for pattern in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("pytorch_lightning.utilities.rank_zero", "pytorch_lightning.trainer.connectors.checkpoint_connector",
                 "lightning.pytorch.utilities.rank_zero", "lightning.pytorch.trainer.connectors.checkpoint_connector"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages())


class CheckRunFolder(HydraCallback):
    """A Hydra callback: before the run, make sure its folder (``hydra.run.dir``; ``hydra.sweep.dir`` for a
    multirun) can be created and written, so a read-only place ends the program with one line naming the
    folder and the override that changes it (Hydra turns a callback's exceptions into warnings, so this
    exits)."""

    def _check(self, config: DictConfig, key: str) -> None:
        from hydra.core.hydra_config import HydraConfig

        HydraConfig.instance().set_config(config)
        try:
            check_writable(Path(str(OmegaConf.select(config, key))), key)
        except PermissionError as e:
            raise SystemExit(f"error: {e}") from None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.sweep.dir")


def check_writable(folder: Path, key: str = "hydra.run.dir") -> None:
    """Create ``folder`` and write and remove a probe file in it; raise :class:`PermissionError` naming the
    folder and ``key`` (the override that moves it) otherwise."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"the run folder {folder} cannot be written ({e.strerror or e}): choose a writable "
                              f"one with {key}=<folder> (or paths.log_dir=<folder>)") from None


def _instantiate_all(section: DictConfig | None) -> list[Any]:
    if not section:
        return []
    return [hydra.utils.instantiate(c) for c in section.values() if c and "_target_" in c]


def build(cfg: DictConfig) -> dict[str, Any]:
    """Instantiate backbone, data, module, callbacks, logger and trainer from a composed config."""
    quiet_lightning()
    target = cfg.data.get("_target_") if cfg.get("data") else None
    refusal = getattr(hydra.utils.get_class(target), "EVALUATION_ONLY", None) if target else None
    if cfg.get("train", True) and refusal:  # before anything loads: e.g. data=vqa, which has no training split
        raise ValueError(refusal)
    pl.seed_everything(cfg.seed, workers=True)
    model, processor = hydra.utils.instantiate(cfg.backbone)
    datamodule = hydra.utils.instantiate(cfg.data, processor=processor)
    module = hydra.utils.instantiate(cfg.module, model=model, processor=processor)
    callbacks = _instantiate_all(cfg.get("callbacks"))
    logger_cfg = cfg.get("logger")
    logger = hydra.utils.instantiate(logger_cfg) if logger_cfg and "_target_" in logger_cfg else False
    trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=logger, default_root_dir=cfg.paths.output_dir
    )
    if logger:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return dict(model=model, processor=processor, datamodule=datamodule, module=module, trainer=trainer)


def optimized_value(metrics: dict[str, float], name: str | None) -> float | None:
    """``metrics[name]``: the value a sweep optimises; None when no metric is named. A named metric the
    run did not log is an error listing the logged names (a sweep must not optimise a missing value)."""
    if not name:
        return None
    if name not in metrics:
        logged = ", ".join(sorted(metrics)) or "none"
        raise KeyError(f"optimized_metric={name!r} was not logged by this run; logged metrics: {logged}. "
                       "Set optimized_metric to one of them (e.g. in configs/experiment/<recipe>.yaml)")
    return metrics[name]


def train(cfg: DictConfig) -> float | None:
    """Fit (resuming from ``ckpt_path`` if set), test the best checkpoint, export, print a summary.

    Returns the value of ``cfg.optimized_metric`` (what sweeps optimise; None when it is null) and
    raises, after writing the summary, when that metric was not logged.
    """
    start = time.time()
    parts = build(cfg)
    trainer, module, datamodule = parts["trainer"], parts["module"], parts["datamodule"]
    if cfg.get("train", True):
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.get("test", True):
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") if trainer.checkpoint_callback else ""
        ckpt = best if best and not trainer.fast_dev_run else None
        trainer.test(module, datamodule=datamodule, ckpt_path=ckpt, weights_only=True) if ckpt else \
            trainer.test(module, datamodule=datamodule)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    summary = {
        "metrics": metrics,
        "best_checkpoint": getattr(trainer.checkpoint_callback, "best_model_path", None) if trainer.checkpoint_callback else None,
        "last_checkpoint": next((str(c.path) for c in trainer.callbacks if isinstance(c, LastCheckpoint)), None),
        "exported_to": next((str(c.exported_to) for c in trainer.callbacks
                             if isinstance(c, ExportOnTrainEnd) and c.exported_to), None),
        "output_dir": cfg.paths.output_dir,
        "global_step": trainer.global_step,
        "minutes": round((time.time() - start) / 60, 2),
    }
    Path(cfg.paths.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.paths.output_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n== summary ==")
    for k, v in sorted(metrics.items()):
        print(f"  {k:28s} {v:.4f}")
    for k in ("best_checkpoint", "last_checkpoint", "exported_to", "output_dir", "global_step", "minutes"):
        print(f"  {k:28s} {summary[k]}")
    return optimized_value(metrics, cfg.get("optimized_metric"))
