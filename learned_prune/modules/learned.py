"""The base LightningModule of learned pruning: a frozen backbone and a trainable head.

* The backbone is frozen (``requires_grad_(False)``, ``eval()``), is not in the optimizer, and is
  not written to Lightning checkpoints: they hold the head (and LoRA adapters, if trained) plus
  ``backbone_ref``, the name or path the backbone came from.
* Training runs the engine in **soft** mode (keep-probabilities as log-masks, gradients reach the
  head); validation and test run it in **hard** mode (tokens removed, greedy answers).
* Loss = task loss (next-token CE on answer tokens only) + ``budget_weight`` x the head's budget
  loss + ``distill_weight`` x KL(unpruned frozen backbone || pruned) on the answer tokens
  (DynamicViT's recipe; 0 disables it).
* ``lora`` (``module.lora.enabled=true``): peft LoRA adapters on the LLM train beside the head
  (ATP's fine-tuned variant); the base weights stay frozen and bit-identical, the teacher of the
  distillation term runs with the adapters disabled, and the export adds
  ``adapter_model.safetensors``, applied whenever the loaded head is installed.
* Logs: ``train/`` and ``val/`` losses, accuracy (torchmetrics), kept-token fraction per site and
  budget error. Method-specific code lives in the head, not here.
* The head and the optimizer come from the config (``configs/module/<name>.yaml``), as
  lightning-hydra-template modules receive their net and optimizer: ``module.head`` is the head
  class with its hyper-parameters and ``_partial_: true`` (the module supplies the backbone sizes,
  :meth:`LearnedPrunerModule.head_sizes`); ``module.optimizer`` is ``torch.optim.AdamW`` with
  ``_partial_: true``, given the trainable parameters in :meth:`configure_optimizers`. A head's
  hyper-parameters are written once, in its config; the export saves them (``config.json``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from ..evaluation.vqa import AnswerAccuracy, greedy_answers
from ..pruners.learned import LearnedHead
from ..pruners.lora import LoraSettings, add_lora, lora_disabled, lora_state_dict
from .lr_schedule import schedule_length, warmup_cosine

HeadFactory = Callable[..., LearnedHead]  # the head class, or a partial of it: called with the backbone sizes
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]  # e.g. partial(AdamW, lr=1e-3)


def _plain_hparams(hparams: Any) -> None:
    """Turn OmegaConf containers in ``hparams`` into plain dicts/lists in place, so checkpoints load
    with ``torch.load(weights_only=True)``."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    for key, value in list(hparams.items()):
        if isinstance(value, (DictConfig, ListConfig)):
            hparams[key] = OmegaConf.to_container(value, resolve=True)


class LearnedPrunerModule(pl.LightningModule):
    """Train ``head`` on a frozen ``model``; ``export()`` writes the head folder.

    ``head`` is a built head or a head factory (the class, or the config's partial of it), called
    with :meth:`head_sizes`; ``optimizer`` a factory of the optimizer over the trainable
    parameters (default ``AdamW(lr=1e-3, weight_decay=0)``).
    """

    def __init__(
        self,
        model: nn.Module,
        head: LearnedHead | HeadFactory,
        processor: Any = None,
        optimizer: OptimizerFactory | None = None,
        backbone_ref: str | None = None,
        warmup_steps: int = 50,
        max_steps: int | None = None,
        budget_weight: float = 2.0,
        distill_weight: float = 0.5,
        export_dir: str | None = None,
        lora: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model", "head", "processor", "optimizer"])
        _plain_hparams(self.hparams)  # subclasses' frames may hand Hydra containers to the checkpoint
        lora = self.hparams.get("lora", lora)
        self.model = model
        self.processor = processor
        # built before the LoRA adapters, whose initialisation draws from the same seeded generator
        self.head = head if isinstance(head, LearnedHead) else self.build_head(head, model)
        self.make_optimizer: OptimizerFactory = optimizer or partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.0)
        self.model.requires_grad_(False)
        self.model.eval()
        self.lora_settings = LoraSettings(**dict(lora)) if lora else LoraSettings()
        if self.lora_settings.enabled:
            add_lora(self.model, self.lora_settings)
        self.val_acc, self.test_acc = AnswerAccuracy(), AnswerAccuracy()
        self.val_kept, self.test_kept = MeanMetric(), MeanMetric()

    def head_sizes(self, model: nn.Module) -> dict[str, int]:
        """The backbone sizes a head factory is called with: the LLM's width and depth (heads inside the LLM)."""
        tc = model.config.text_config
        return {"hidden_size": tc.hidden_size, "num_layers": tc.num_hidden_layers}

    def build_head(self, head: HeadFactory, model: nn.Module) -> LearnedHead:
        """``head(**self.head_sizes(model))``; a hyper-parameter the head refuses fails naming the config node."""
        try:
            return head(**self.head_sizes(model))
        except ValueError as e:
            raise ValueError(f"module.head: {e}") from e

    def setup(self, stage: str) -> None:
        """Score answers with the data module's own metric (e.g. per question type), when it has one."""
        make = getattr(getattr(self.trainer, "datamodule", None), "metric", None)
        if callable(make):
            self.val_acc, self.test_acc = make(), make()

    # ---- the frozen backbone stays frozen and out of checkpoints ---------------------------------
    def train(self, mode: bool = True) -> "LearnedPrunerModule":
        super().train(mode)
        self.model.eval()  # frozen: never in training mode
        return self

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        state = super().state_dict(*args, **kwargs)
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in state.items() if not k.startswith("model.") or k in trainable}

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True, **kwargs: Any) -> Any:
        own = super().state_dict()
        missing = [k for k in own if k not in state_dict and not k.startswith("model.")]
        if strict and missing:
            raise KeyError(f"checkpoint lacks head weights {missing[:5]}")
        return super().load_state_dict(state_dict, strict=False)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["backbone_ref"] = self.hparams.backbone_ref

    # ---- losses ---------------------------------------------------------------------------
    def _inputs(self, batch: dict) -> dict:
        keys = ("input_ids", "attention_mask", "pixel_values", "image_sizes", "image_grid_thw", "mm_token_type_ids")
        return {k: batch[k] for k in keys if k in batch}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        labels = batch["labels"]
        with self.head(self.model, mode="soft") as engine:
            out = self.model(**self._inputs(batch), labels=labels, use_cache=False)
        task = out.loss
        budget, logs = self.head.budget_loss()
        loss = task + self.hparams.budget_weight * budget
        bs = labels.shape[0]
        if self.hparams.distill_weight > 0:
            with torch.no_grad(), self._teacher():
                teacher = self.model(**self._inputs(batch), use_cache=False).logits
            mask = labels[:, 1:] != -100
            s = F.log_softmax(out.logits[:, :-1][mask].float(), -1)
            t = F.log_softmax(teacher[:, :-1][mask].float(), -1)
            distill = F.kl_div(s, t, log_target=True, reduction="batchmean")
            loss = loss + self.hparams.distill_weight * distill
            self.log("train/distill_loss", distill, batch_size=bs)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/task_loss", task, batch_size=bs)
        self.log("train/budget_loss", budget, batch_size=bs)
        for k, v in logs.items():
            self.log(f"train/{k}", v, prog_bar=k == "budget_error", batch_size=bs)
        del engine
        return loss

    def _teacher(self) -> Any:
        """The unpruned frozen backbone: without LoRA adapters when they are trained."""
        return lora_disabled(self.model) if self.lora_settings.enabled else contextlib.nullcontext()

    def _eval_step(self, batch: dict, acc: AnswerAccuracy, kept: MeanMetric, stage: str) -> None:
        with self.head(self.model, mode="hard") as engine:
            answers = greedy_answers(self.model, self.processor, batch)
        acc.update(answers, batch.get("golds", batch["answers"]), batch.get("qtypes"))
        _, logs = self.head.budget_loss()
        bs = len(answers)
        for k, v in logs.items():
            self.log(f"{stage}/{k}", v, batch_size=bs, sync_dist=True)
        ids = batch["prompt_input_ids"]
        n_vis = ((ids == self.model.config.image_token_id) & batch["prompt_attention_mask"].bool()).sum(1)
        last = list(engine.kept_tokens.values())[-1] if engine.kept_tokens else n_vis
        kept.update(last.float().mean())
        self.log(f"{stage}/kept_tokens", kept, batch_size=bs)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, self.val_acc, self.val_kept, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, self.test_acc, self.test_kept, "test")

    def _epoch_end(self, acc: AnswerAccuracy, stage: str) -> None:
        if acc.update_count == 0:  # no answers this epoch (e.g. BAViT on mask-only data)
            return
        for k, v in acc.compute_all().items():
            self.log(f"{stage}/{k}", v, prog_bar=k == "acc", sync_dist=True)
        acc.reset()

    def on_validation_epoch_end(self) -> None:
        self._epoch_end(self.val_acc, "val")

    def on_test_epoch_end(self) -> None:
        self._epoch_end(self.test_acc, "test")

    # ---- optimisation: the head (and LoRA adapters) only ------------------------------------
    def configure_optimizers(self) -> dict:
        params = [p for p in self.parameters() if p.requires_grad]
        opt = self.make_optimizer(params)
        total = schedule_length(self.hparams.max_steps, self.trainer)
        sched = warmup_cosine(opt, total, self.hparams.warmup_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- export ---------------------------------------------------------------------------
    def export(self, directory: str | Path) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (head only) for ``load_pruner(directory)``.

        Call it on every rank: under DeepSpeed ZeRO-3 the head's parameters are partitioned, and
        saving them without gathering writes empty tensors; they are gathered here (a collective)
        and written by global rank 0 only.
        """
        self.head.backbone = {**self.head.backbone, "name_or_path": _portable(self.hparams.backbone_ref)}
        trainer = self._trainer
        strategy = trainer.strategy if trainer is not None else None
        lora_params = [p for n, p in self.model.named_parameters() if "lora_" in n]

        def save() -> None:
            lora = (self.lora_settings, lora_state_dict(self.model)) if self.lora_settings.enabled else None
            self.head.save_pretrained(directory, lora=lora)

        if getattr(strategy, "zero_stage_3", False):
            import deepspeed

            params = list(self.head.parameters()) + lora_params
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                if strategy.is_global_zero:
                    save()
            strategy.barrier("export")
            return Path(directory)
        if trainer is None or trainer.is_global_zero:
            save()
        return Path(directory)


def _portable(name_or_path: str) -> str:
    """A backbone reference fit for a shipped ``config.json``: local paths under the working
    directory are written relative to it (``checkpoints/tiny-llava-shapes``), never as this
    machine's absolute path; hub ids and other paths are kept as given."""
    path = Path(str(name_or_path))
    if path.is_absolute():
        try:
            return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
        except ValueError:
            return str(name_or_path)
    return str(name_or_path)
