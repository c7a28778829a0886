"""Lightning callbacks of the training stack."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info


class ExportOnTrainEnd(pl.Callback):
    """At the end of training, load the best checkpoint's weights and call ``pl_module.export(dir)``.

    ``dir`` is ``pl_module.hparams.export_dir``. A ``fast_dev_run`` never writes there (it would
    overwrite a shipped checkpoint with an untrained one): it exports under the run directory.
    Runs on every rank (ZeRO-3 must gather partitioned weights collectively); ``export`` writes on
    rank 0.
    """

    def __init__(self, use_best: bool = True) -> None:
        self.use_best = use_best
        self.exported_to: Path | None = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not hasattr(pl_module, "export"):
            return
        target = getattr(pl_module.hparams, "export_dir", None)
        if trainer.fast_dev_run or not target:
            target = Path(trainer.default_root_dir) / "export"
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") if trainer.checkpoint_callback else ""
        if self.use_best and best and Path(best).is_file() and not trainer.fast_dev_run:
            state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
            pl_module.load_state_dict(state, strict=False)
            rank_zero_info(f"export: weights from the best checkpoint {best}")
        self.exported_to = Path(pl_module.export(target))
        rank_zero_info(f"export: wrote {self.exported_to}")


class LastCheckpoint(pl.Callback):
    """Keep ``<dirpath>/last.ckpt`` current: every ``every_n_steps`` optimizer steps and when training
    ends (also on an exception or Ctrl-C), so an interrupted run resumes with ``ckpt_path=.../last.ckpt``."""

    def __init__(self, dirpath: str, every_n_steps: int = 100) -> None:
        self.path = Path(dirpath) / "last.ckpt"
        self.every_n_steps = every_n_steps

    def _save(self, trainer: pl.Trainer) -> None:
        if trainer.fast_dev_run or trainer.sanity_checking:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(self.path)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self._save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._save(trainer)
