"""Lightning callbacks of the training stack."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
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
        trainer.save_checkpoint(self.path, weights_only=False)  # the whole state: a run resumes from it

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self._save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._save(trainer)


class ValidateAtEnd(pl.Callback):
    """Validate at the last training step when the last validation is older than it: a run resumed
    between two validation intervals, or whose length is not a multiple of the interval, still ends
    with ``val/*`` metrics (what ``train()`` returns and sweeps optimise) and a best checkpoint that
    saw its final weights. It asks Lightning's own loop to validate there (``trainer.should_stop``
    at the step that ends training), so checkpointing and logging run as at any validation."""

    def __init__(self) -> None:
        self.validated_at: int | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.validated_at = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run or not trainer.enable_validation:
            return
        last_step = trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step
        last_epoch = trainer.max_epochs is not None and 0 < trainer.max_epochs <= trainer.current_epoch + 1
        last_batch = last_epoch and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        if (last_step or last_batch) and self.validated_at != trainer.global_step:
            trainer.should_stop = True  # Lightning validates at a step that stops training


class BestCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` that keeps its record of the best checkpoint (score and path) when a
    run resumes into another folder (a new ``hydra.run.dir``): Lightning's own forgets it there, so the
    resumed run's first validation became "best" however it scored, and testing and export used it.
    Checkpoints that no longer exist are left out of the record; files outside this run's folder are
    never deleted (Lightning removes only its own folder's)."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("dirpath", self.dirpath) == self.dirpath:
            return super().load_state_dict(state_dict)
        kept = {p: s for p, s in (state_dict.get("best_k_models") or {}).items() if Path(p).is_file()}
        self.best_k_models = kept
        if kept and len(kept) == self.save_top_k:
            self.kth_best_model_path = (max if self.mode == "min" else min)(kept, key=kept.get)
            self.kth_value = kept[self.kth_best_model_path]
        if kept:
            self.best_model_path = (min if self.mode == "min" else max)(kept, key=kept.get)
            self.best_model_score = kept[self.best_model_path]
            rank_zero_info(f"resumed from another folder: the best checkpoint so far is {self.best_model_path} "
                           f"({self.monitor}={float(self.best_model_score):.4f})")
