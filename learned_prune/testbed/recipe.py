"""``module=backbone``: train the whole tiny LLaVA on ShapesVQA (the embedded default backbone).

A from-scratch LLaVA does not learn this task from the answer loss alone in a CPU budget: the vision
tower learns shapes slowly, and the LLM must route from the question through the answer token to the
right patches before any of it pays off. The recipe therefore teaches each link directly, in two
stages of one run (what each part bought: the backbone's card and ``docs/history/``):

1. **Tower stage** (the first ``tower_steps`` steps): only the vision tower trains, through a
   per-patch probe on the feature layer LLaVA feeds its projector — foreground, and the colour,
   shape, size and centre of the object covering each patch (``patch_weight``). Its position
   embeddings start from a 2-D sin-cos table (``sincos_positions``) so locality is there from step 0.
2. **Full stage**: every part trains (the tower at ``tower_lr_scale`` of the LLM's rate) with
   next-token cross-entropy on the answer tokens, the patch probe, and two losses on the token that
   predicts the answer:

   * **grounding** (``ground_weight``): at ``ground_layers`` (default: the two middle layers) its
     head-mean attention over the visual tokens should fall on the patches of the objects the
     question names (``-log`` of that mass);
   * **read-out** (``readout_weight``): a linear probe on its hidden state after ``readout_layer``
     (default: 3/4 of the depth) must give the colour, shape, size and centre of the first and
     second named objects: grounding alone puts attention on the right patches without their
     features reaching the answer. For relative-position questions (``relation_weight``) the answer
     token must also name the asked relation after the middle layer and give the first object's
     signed offset from the second along it after ``readout_layer`` (positive when the answer is
     yes): without them the model locates both objects but never reads which relation is asked.

All probes are training-only; the exported model is a plain HF LLaVA (``save_pretrained``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..engine.attention import attention_rows
from ..evaluation.vqa import AnswerAccuracy, greedy_answers
from ..modules.lr_schedule import schedule_length, warmup_cosine_factor
from .stage import StageModule
from .scenes import QUESTION_TYPES, RELATIONS
from .training_aids import N_COLORS, N_SHAPES, N_SIZES, attribute_loss, jittered_positions, sincos_position_init


class BackboneModule(StageModule):
    """Trains every parameter of an HF LLaVA (vision tower, projector, LLM) on a VQA data module."""

    def __init__(
        self,
        model: nn.Module,
        processor: Any = None,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 200,
        max_steps: int | None = None,
        patch_weight: float = 0.5,
        ground_weight: float = 0.5,
        ground_layers: list[int] | None = None,
        readout_weight: float = 1.0,
        readout_layer: int | None = None,
        relation_weight: float = 0.0,
        tower_steps: int = 0,
        tower_lr: float = 3e-3,
        tower_lr_scale: float = 0.2,
        sincos_positions: bool = True,
        position_jitter: int = 0,
        export_dir: str | None = None,
    ) -> None:
        super().__init__(model, processor)
        self.save_hyperparameters(ignore=["model", "processor"])
        vdim = model.config.vision_config.hidden_size
        tdim = model.config.text_config.hidden_size
        # training-only probes, never exported: per patch fg + colour + shape + size + centre(2);
        # per answer token colour + shape + size + centre of two named objects
        self.patch_probe = nn.Linear(vdim, 1 + N_COLORS + N_SHAPES + N_SIZES + 2)
        self.readout_probe = nn.Linear(tdim, 2 * (N_COLORS + N_SHAPES + N_SIZES + 2))
        if relation_weight > 0:  # only then: checkpoints of runs without it keep loading strictly
            # position questions: the asked relation (middle layer), the offset along it (read-out layer)
            self.relation_probe = nn.Linear(tdim, len(RELATIONS))
            self.offset_probe = nn.Linear(tdim, 1)
        if sincos_positions:
            sincos_position_init(model.model.vision_tower)
        self.train_acc = AnswerAccuracy(QUESTION_TYPES)
        self.val_acc = AnswerAccuracy(QUESTION_TYPES)
        self.test_acc = AnswerAccuracy(QUESTION_TYPES)

    def setup(self, stage: str) -> None:
        if stage == "fit" and self._trainer is not None:
            check_ddp_allows_the_tower_stage(self.trainer.strategy, self.hparams.tower_steps)

    def trained(self) -> list[nn.Module]:
        return [self.model]  # every part: tower, projector, LLM

    # ---- steps -----------------------------------------------------------------------------
    def _positions(self, batch: dict) -> torch.Tensor | None:
        """Training position ids with the image-question distance jittered (``position_jitter``), else None."""
        if not self.training or self.hparams.position_jitter <= 0:
            return None
        return jittered_positions(batch["input_ids"], self.model.config.image_token_id, self.hparams.position_jitter)

    def _grounding_loss(self, hidden_states: tuple, batch: dict, positions: torch.Tensor | None = None) -> torch.Tensor:
        lm = self.model.model.language_model
        ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"].bool()
        target = batch["target_patches"]
        has = target.any(1)
        if not bool(has.any()):
            return torch.zeros((), device=ids.device)
        B, L = ids.shape
        query = (labels != -100).float().argmax(1) - 1  # the last prompt token predicts the answer
        visual = (ids == self.model.config.image_token_id).nonzero()[:, 1].view(B, -1)
        order = torch.arange(L, device=ids.device)[None].expand(B, L)
        pos = order if positions is None else positions  # the positions the forward used
        qpos, qvalid = query.clamp_min(0)[:, None], (query >= 0)[:, None]
        n = len(lm.layers)
        layers = self.hparams.ground_layers or [n // 2 - 1, n // 2]
        losses = []
        for li in layers:  # the head-mean attention row of the answer-predicting token, rebuilt from q/k
            probs = attention_rows(lm.layers[li], lm.rotary_emb, hidden_states[li], pos, mask, qpos, qvalid)[:, 0]
            on_target = (torch.gather(probs, 1, visual) * target).sum(1)
            losses.append(-torch.log(on_target[has] + 1e-6).mean())
        return torch.stack(losses).mean()

    def _patch_loss(self, vision: Any, batch: dict) -> torch.Tensor:
        if self.hparams.patch_weight <= 0 or "patch_attrs" not in batch:
            return torch.zeros((), device=batch["input_ids"].device)
        feats = vision.hidden_states[self.model.config.vision_feature_layer][:, 1:]
        logits = self.patch_probe(feats)
        fg = batch["patch_mask"]
        loss = F.binary_cross_entropy_with_logits(logits[..., 0], fg.float())
        return loss + attribute_loss(logits[..., 1:], batch["patch_attrs"], batch["patch_centres"], fg)

    def _readout_loss(self, hidden_states: tuple, batch: dict) -> torch.Tensor:
        n = len(self.model.model.language_model.layers)
        layer = self.hparams.readout_layer or (3 * n) // 4
        labels = batch["labels"]
        query = (labels != -100).float().argmax(1) - 1  # the token that predicts the answer
        h = hidden_states[layer][torch.arange(labels.shape[0], device=labels.device), query]
        logits = self.readout_probe(h).view(h.shape[0], 2, -1)
        centres = batch["target_centres"]
        named = ~centres.isnan().any(-1)
        loss = attribute_loss(logits, batch["target_attrs"], centres.nan_to_num(0.0), named)
        if self.hparams.relation_weight > 0 and "target_relation" in batch:
            loss = loss + self.hparams.relation_weight * self._relation_loss(hidden_states, batch, query, n)
        return loss

    def _relation_loss(self, hidden_states: tuple, batch: dict, query: torch.Tensor, n: int) -> torch.Tensor:
        """Position questions: the answer token names the asked relation after the middle layer and
        gives the first object's signed offset from the second along it after the read-out layer."""
        relation, offset = batch["target_relation"], batch["target_offset"]
        asked = relation != -100
        if not bool(asked.any()):
            return hidden_states[0].new_zeros(())
        rows = torch.arange(relation.shape[0], device=relation.device)[asked]
        middle = hidden_states[n // 2][rows, query[asked]]
        late = hidden_states[self.hparams.readout_layer or (3 * n) // 4][rows, query[asked]]
        named = F.cross_entropy(self.relation_probe(middle), relation[asked])
        return named + 10 * ((self.offset_probe(late).squeeze(-1) - offset[asked]) ** 2).mean()

    def _losses(self, batch: dict, stage: str = "full") -> tuple[torch.Tensor, dict[str, torch.Tensor], Any]:
        """(total loss, its parts, model output). ``stage="tower"``: the patch probe alone."""
        inner = self.model.model
        vision = inner.get_image_features(pixel_values=batch["pixel_values"], output_hidden_states=True)
        parts = {"patch_loss": self._patch_loss(vision, batch)}
        if stage == "tower":
            return self.hparams.patch_weight * parts["patch_loss"], parts, None
        ground = self.hparams.ground_weight > 0 and "target_patches" in batch
        readout = self.hparams.readout_weight > 0 and "target_attrs" in batch
        positions = self._positions(batch)
        out = self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=positions,
            mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=vision.pooler_output)},
            labels=batch["labels"],
            use_cache=False,
            output_hidden_states=ground or readout,
        )
        parts["lm_loss"] = out.loss
        loss = out.loss + self.hparams.patch_weight * parts["patch_loss"]
        if ground:
            parts["ground_loss"] = self._grounding_loss(out.hidden_states, batch, positions)
            loss = loss + self.hparams.ground_weight * parts["ground_loss"]
        if readout:
            parts["readout_loss"] = self._readout_loss(out.hidden_states, batch)
            loss = loss + self.hparams.readout_weight * parts["readout_loss"]
        return loss, parts, out

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        stage = "tower" if self.global_step < self.hparams.tower_steps else "full"
        loss, parts, out = self._losses(batch, stage)
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for k, v in parts.items():
            self.log(f"train/{k}", v, batch_size=bs)
        if out is not None:
            self.train_acc.update_from_logits(out.logits, batch["labels"], batch.get("qtypes"))
            self.log("train/acc", self.train_acc, prog_bar=True, on_step=True, on_epoch=False, batch_size=bs)
        return loss

    def _eval_step(self, batch: dict, metric: AnswerAccuracy, stage: str) -> None:
        answers = greedy_answers(self.model, self.processor, batch)
        metric.update(answers, batch["answers"], batch.get("qtypes"))
        _, parts, _ = self._losses(batch)
        self.log(f"{stage}/loss", parts["lm_loss"], batch_size=len(answers), sync_dist=True)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, self.val_acc, "val")

    def on_validation_epoch_end(self) -> None:
        for k, v in self.val_acc.compute_all().items():
            self.log(f"val/{k}", v, prog_bar=k == "acc", sync_dist=True)
        self.val_acc.reset()

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, self.test_acc, "test")

    def on_test_epoch_end(self) -> None:
        for k, v in self.test_acc.compute_all().items():
            self.log(f"test/{k}", v, sync_dist=True)
        self.test_acc.reset()

    # ---- optimisation --------------------------------------------------------------------
    def configure_optimizers(self) -> dict:
        """AdamW; the tower (and its probe) and the rest get their own schedules.

        Tower group: warm-up + cosine at ``tower_lr`` over the tower stage, then ``tower_lr_scale``
        of the LLM schedule (without a tower stage, ``tower_lr_scale`` of it from the start). Rest: zero during the tower stage (it gets no gradients there), then
        warm-up + cosine at ``lr`` to the end.
        """
        hp = self.hparams
        total = schedule_length(hp.max_steps, self.trainer)
        tower_ids = {id(p) for p in [*self.model.model.vision_tower.parameters(), *self.patch_probe.parameters()]}
        groups = []
        for is_tower in (True, False):
            decay, no_decay = [], []
            for n, p in self.named_parameters():
                if p.requires_grad and (id(p) in tower_ids) == is_tower:
                    (no_decay if p.dim() < 2 or "norm" in n or "embedding" in n else decay).append(p)
            base = hp.tower_lr if is_tower and hp.tower_steps else hp.lr
            groups += [{"params": decay, "weight_decay": hp.weight_decay, "lr": base},
                       {"params": no_decay, "weight_decay": 0.0, "lr": base}]
        opt = torch.optim.AdamW(groups, betas=(0.9, 0.98))
        T = hp.tower_steps
        full = warmup_cosine_factor(total - T, hp.warmup_steps, floor=0.05)
        tower = warmup_cosine_factor(T, hp.warmup_steps, floor=0.1) if T else full
        # after the tower stage (or from step 0 without one) the tower runs at tower_lr_scale of the LLM rate
        scale = hp.tower_lr_scale * hp.lr / hp.tower_lr if T else hp.tower_lr_scale

        def tower_factor(step: int) -> float:
            return tower(step) if step < T else scale * full(step - T)

        def rest_factor(step: int) -> float:
            return 0.0 if step < T else full(step - T)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, [tower_factor, tower_factor, rest_factor, rest_factor])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- export --------------------------------------------------------------------------


def check_ddp_allows_the_tower_stage(strategy: Any, tower_steps: int) -> None:
    """Fail before training when DDP would stop at the first tower-stage step: there the LLM and the
    answer probes get no gradient, which plain DDP rejects (``find_unused_parameters=False``)."""
    from pytorch_lightning.strategies import DDPStrategy

    if tower_steps and isinstance(strategy, DDPStrategy) and not strategy._ddp_kwargs.get("find_unused_parameters"):
        raise ValueError(
            f"module=backbone trains the vision tower alone for its first module.tower_steps={tower_steps} steps, "
            "where the LLM gets no gradient, and plain DDP fails on parameters without one: run it with "
            "trainer.strategy=ddp_find_unused_parameters_true (or module.tower_steps=0 to skip the tower stage)")
