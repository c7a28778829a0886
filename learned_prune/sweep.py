"""Hyper-parameter searches of the learned heads: ``python train.py -m hparams_search=<head>``.

The search itself is Hydra's Optuna sweeper plugin (``hydra-optuna-sweeper``; its search space is
``hydra.sweeper.params`` in ``configs/hparams_search/<head>.yaml``, written in Hydra's override grammar:
``choice(...)``, ``interval(...)``, ``tag(log, interval(...))``). This module adds what the plugin lacks here:

* :class:`BudgetScore` (a Lightning callback): the metric a search optimises is accuracy *at a budget*,
  not accuracy alone (an adaptive head would otherwise learn to keep everything). It logs
  ``<stage>/acc_at_budget = acc - penalty * max(0, cost / budget - 1)``. ``cost="layers"`` (a FLOPs
  budget: ATP, DyVTE) is the mean fraction of the original visual tokens that enter the LLM's layers,
  averaged over the layers, so a head that prunes inside the LLM is charged for the layers it leaves
  whole, as the prefill FLOPs are (text tokens and the head's own FLOPs are not counted);
  ``cost="tokens"`` is the fraction left after the head's last site. It is read from what the head logs: per-site
  ``kept_frac/llm:K`` (ATP, LVPruning), per-layer ``exit_frac/llm:K`` (DyVTE), or else the kept-token count
  (vision-site heads and compressors: BAViT, FlashSloth, QueCC) over the image's visual tokens.
* :class:`ResumeStudy` (a Hydra callback): the study lives in the sweep folder
  (``sqlite:///<hydra.sweep.dir>/optuna.db``); running the same command with
  ``hydra.sweep.dir=<that folder>`` resumes it. A trial that was running when the search was interrupted
  is marked failed, ``n_trials`` counts the trials already finished (a resumed search runs only the
  rest; a seeded sampler is re-seeded with the seed plus the trials so far, so it does not propose
  the first trials' parameters again), and each trial's run folder is named after its Optuna trial number (``trial_<n>``), so a
  resumed search never writes into an earlier trial's folder. The plugin itself creates the study with
  ``load_if_exists=True``, but counts ``n_trials`` anew and numbers its run folders from 0 at every start.
* Progress: Optuna logs every finished trial with its value and the best so far; :class:`ResumeStudy`
  prints where the study stands at the start and the best trial (value, parameters, run folder) at the end;
  the plugin writes ``optimization_results.yaml`` into the sweep folder.

Trials run one after another in this process (Hydra's basic launcher). ``train.py`` returns the last
validation's value of the metric, not the best checkpoint's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger(__name__)

TRIAL_DIR = "trial_{}"
_trial_offset = 0  # trials in the study before this process started (set by ResumeStudy)


def _trial_number(job_num: Any) -> int:
    """The Optuna trial number of Hydra job ``job_num`` of this process (``${lp_trial:${hydra.job.num}}``)."""
    return int(job_num) + _trial_offset


if not OmegaConf.has_resolver("lp_trial"):
    OmegaConf.register_new_resolver("lp_trial", _trial_number)


def visual_fraction(metrics: dict[str, float], stage: str, num_layers: int, n_visual: int | None,
                    cost: str = "layers") -> float:
    """The cost of a run from its logged ``<stage>/...`` metrics (module docstring): ``cost="layers"``, the
    mean over the LLM's ``num_layers`` layers of the fraction of original visual tokens entering each layer
    (a FLOPs budget); ``cost="tokens"``, the fraction that reaches the layers after the head's last site."""
    if cost not in ("layers", "tokens"):
        raise ValueError(f"callbacks.budget_score.cost={cost!r}: 'layers' (a FLOPs budget) or 'tokens'")
    sites = {int(k.rsplit(":", 1)[1]): v for k, v in metrics.items() if k.startswith(f"{stage}/kept_frac/llm:")}
    if sites and cost == "tokens":
        return sites[max(sites)]
    if sites:
        frac, current = 0.0, 1.0
        for layer in range(num_layers):
            current = sites.get(layer, current)
            frac += current
        return frac / num_layers
    exits = {int(k.rsplit(":", 1)[1]): v for k, v in metrics.items() if k.startswith(f"{stage}/exit_frac/llm:")}
    if exits and cost == "tokens":
        raise ValueError("callbacks.budget_score.cost=tokens: an exiting head (DyVTE) keeps every visual token until "
                         "it exits; give it a FLOPs budget, cost=layers")
    if exits:  # an exit at layer K removes every visual token from layers K..L-1
        return 1.0 - sum(p * (num_layers - k) / num_layers for k, p in exits.items())
    kept = metrics.get(f"{stage}/kept_tokens")
    if kept is None:
        raise KeyError(f"BudgetScore: the run logged neither {stage}/kept_frac/llm:K, {stage}/exit_frac/llm:K nor "
                       f"{stage}/kept_tokens, so its cost is unknown; logged: {sorted(metrics)}")
    if not n_visual:
        raise ValueError("BudgetScore needs n_visual (the visual tokens of one image) for this backbone: "
                         "set callbacks.budget_score.n_visual=<count>")
    return kept / n_visual  # a vision-site head: the same count enters every layer


class BudgetScore(pl.Callback):
    """Logs ``<stage>/acc_at_budget`` after each validation and test (module docstring).

    ``budget``: the allowed fraction of the visual tokens (e.g. 0.111 or 0.056), per LLM layer on average
    (``cost="layers"``, a FLOPs budget) or after the head's last site (``cost="tokens"``);
    ``penalty``: accuracy lost per unit of relative overshoot (1: 10% over the budget costs 0.1);
    ``n_visual``: visual tokens of one image (default: the tower's patch grid, LLaVA-1.5-style backbones).
    """

    def __init__(self, budget: float, cost: str = "layers", penalty: float = 1.0, n_visual: int | None = None,
                 name: str = "acc_at_budget") -> None:
        if not 0 < budget <= 1:
            raise ValueError(f"callbacks.budget_score.budget={budget}: a fraction of the visual tokens in (0, 1]")
        if penalty < 0:
            raise ValueError(f"callbacks.budget_score.penalty={penalty}: must be >= 0")
        if cost not in ("layers", "tokens"):
            raise ValueError(f"callbacks.budget_score.cost={cost!r}: 'layers' (a FLOPs budget) or 'tokens'")
        self.budget, self.cost, self.penalty, self.n_visual, self.name = budget, cost, penalty, n_visual, name

    def _n_visual(self, pl_module: pl.LightningModule) -> int | None:
        if self.n_visual:
            return self.n_visual
        config = getattr(getattr(pl_module, "model", None), "config", None)
        vc = getattr(config, "vision_config", None)
        if vc is None or getattr(config, "image_grid_pinpoints", None):
            return None  # any-resolution images: the count varies, ask for it
        return (vc.image_size // vc.patch_size) ** 2

    def score(self, metrics: dict[str, float], stage: str, num_layers: int, n_visual: int | None) -> dict[str, float]:
        """``{<stage>/acc_at_budget, <stage>/visual_fraction}`` from logged ``metrics``; {} without ``<stage>/acc``."""
        if f"{stage}/acc" not in metrics:
            return {}
        cost = visual_fraction(metrics, stage, num_layers, n_visual, self.cost)
        value = metrics[f"{stage}/acc"] - self.penalty * max(0.0, cost / self.budget - 1.0)
        return {f"{stage}/{self.name}": value, f"{stage}/visual_fraction": cost}

    def _publish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        num_layers = pl_module.model.config.text_config.num_hidden_layers
        out = self.score(metrics, stage, num_layers, self._n_visual(pl_module))
        for key, value in out.items():
            trainer.callback_metrics[key] = torch.tensor(value)  # what ModelCheckpoint and train.py read
        if out and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(out, step=trainer.global_step)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._publish(trainer, pl_module, "val")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._publish(trainer, pl_module, "test")


class ResumeStudy(HydraCallback):
    """Resume an interrupted Optuna study in ``hydra.sweeper.storage``, and print the search's progress
    (module docstring). Hydra turns a callback's exceptions into warnings, so failures here exit."""

    def __init__(self) -> None:
        self.best: tuple[float, int] | None = None  # (value, trial number) of the best finished trial
        self.total = 0  # trials the search runs in all
        self.finished = 0  # trials finished so far, earlier runs of the search included

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            self._resume(config)
        except Exception as e:  # noqa: BLE001 - anything that stops the study from resuming ends the search
            raise SystemExit(f"error: hparams_search could not open its study: {type(e).__name__}: {e}") from None

    def _resume(self, config: DictConfig) -> None:
        global _trial_offset
        import optuna

        sweeper = config.hydra.sweeper
        storage, name = sweeper.get("storage"), sweeper.get("study_name")
        if not storage or not name:
            raise ValueError("hparams_search needs hydra.sweeper.storage and hydra.sweeper.study_name "
                             "(the study is stored in the sweep folder so that it can resume)")
        Path(str(config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        self.total = int(sweeper.n_trials)
        try:
            study = optuna.load_study(study_name=name, storage=storage)
        except KeyError:  # a new study
            _trial_offset = 0
            print(f"hparams_search: new study {name!r} in {storage}, {self.total} trials; resume an interrupted "
                  f"search with the same command and hydra.sweep.dir={config.hydra.sweep.dir}")
            return
        states = optuna.trial.TrialState
        stale = [t for t in study.get_trials(deepcopy=False) if t.state == states.RUNNING]
        for trial in stale:  # left running by an interrupted search (trials run in this one process)
            study._storage.set_trial_state(trial._trial_id, states.FAIL)
        done = study.get_trials(deepcopy=False, states=(states.COMPLETE,))
        _trial_offset = len(study.get_trials(deepcopy=False))
        self.finished = len(done)
        if done:
            self.best = max((t.value, t.number) for t in done)
        with read_write(config.hydra.sweeper), open_dict(config.hydra.sweeper):  # Hydra's node is read-only
            config.hydra.sweeper.n_trials = max(0, self.total - len(done))
            seed = OmegaConf.select(config, "hydra.sweeper.sampler.seed")
            if seed is not None:  # a seeded sampler would propose the first trials' parameters again
                config.hydra.sweeper.sampler.seed = int(seed) + _trial_offset
        print(f"hparams_search: resuming study {name!r} in {storage}: {len(done)} of {self.total} trials finished, "
              f"{len(stale)} interrupted (marked failed), {config.hydra.sweeper.n_trials} to run")

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        """One line per finished trial: its value and the best so far (the plugin tells Optuna afterwards)."""
        number = _trial_number(config.hydra.job.num)
        try:
            value = float(job_return.return_value)
        except Exception:  # noqa: BLE001 - a failed trial: its error follows from the plugin
            print(f"hparams_search: trial {number} failed")
            return
        if self.best is None or value > self.best[0]:
            self.best = (value, number)
        self.finished += 1
        print(f"hparams_search: trial {number} finished ({self.finished} of {self.total}): {config.optimized_metric} = "
              f"{value:.4f}; best so far: trial {self.best[1]} = {self.best[0]:.4f}")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        import optuna

        study = optuna.load_study(study_name=config.hydra.sweeper.study_name, storage=config.hydra.sweeper.storage)
        done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if not done:
            print("hparams_search: no trial finished")
            return
        best = study.best_trial
        folder = Path(str(config.hydra.sweep.dir)) / TRIAL_DIR.format(best.number)
        print(f"\n== hparams_search: best of {len(done)} finished trials: trial {best.number}, "
              f"{config.optimized_metric} = {best.value:.4f} ==\n  folder: {folder}")
        for key, value in best.params.items():
            print(f"  {key}={value}")
