"""What ``train.py`` does: compose -> instantiate -> fit -> test -> export -> summary.

Kept out of ``train.py`` so that tests and sweeps can call :func:`train` on a composed config.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from .modules.callbacks import ExportOnTrainEnd, LastCheckpoint


def _instantiate_all(section: DictConfig | None) -> list[Any]:
    if not section:
        return []
    return [hydra.utils.instantiate(c) for c in section.values() if c and "_target_" in c]


def build(cfg: DictConfig) -> dict[str, Any]:
    """Instantiate backbone, data, module, callbacks, logger and trainer from a composed config."""
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
