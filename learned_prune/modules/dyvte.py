"""``module=dyvte``: train DyVTE's exit routers on labels the frozen backbone makes itself.

Each training step (as the official ``finetune_visual_gate`` recipe, several layers at once):

1. run the frozen model on the teacher-forced batch (A) and read every layer's input states;
2. for each sampled layer l, the run B_l with all visual tokens removed from layer l on
   (:class:`~learned_prune.pruners.dyvte.VisualExit`): layers before l are A's, so B_l starts from
   A's states at layer l and runs only the text rows through layers l..L-1;
3. label a sample *exit at l* when B_l's greedy answer tokens all agree with A's and its answer loss
   is within the margin: ``loss_B <= (1 + rel_margin) * loss_A + margin`` (the official code uses
   ``1.03 * loss_A`` alone; on a small, confident model both losses are near 0 and a purely relative
   margin would label nothing, hence the absolute term);
4. train router l by cross-entropy on [mean instruction state, last prompt state] of A at layer l,
   detached (the backbone is frozen and gets no gradient).

Labels are the expensive part (one full and up to L-1 partial forwards per batch); a router update
is a few small matmuls. ``replay`` (not in the official code, which trains the routers once on each
labelled batch) adds that many earlier labelled samples, drawn uniformly from a FIFO buffer of the
last ``replay_capacity`` ones, to every step's loss, so the routers see each label several times at
no extra forward cost (what it gains on the embedded backbone: checkpoints/dyvte-tiny/README.md).
The buffer lives in CPU memory (``replay_capacity x (L-1) x 2C`` float32 values, so lower
``replay_capacity`` for a wide, deep LLM), is not saved in checkpoints and refills after a resume. The class defaults to ``replay=0``
(the official recipe); ``configs/module/dyvte.yaml`` ships ``replay=224`` with lr 3e-3 (``module.optimizer.lr``).

Validation runs the head in hard mode (first exit wins) and logs accuracy, the exit-layer
distribution and ``llm_flops_saved``, the fraction of LLM prefill FLOPs the exits save.
"""

from __future__ import annotations

import random
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from ..engine import run_layers
from ..evaluation.flops import llm_layer_flops
from ..evaluation.vqa import AnswerAccuracy
from ..pruners.dyvte import DyVTEHead, router_features
from .learned import HeadFactory, LearnedHead, LearnedPrunerModule


def answer_loss_and_predictions(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mean next-token CE over answer tokens (B,) and greedy next-token predictions (B, L-1)."""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    mask = shift_labels != -100
    ce = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels.clamp_min(0), reduction="none")
    loss = (ce * mask).sum(1) / mask.sum(1).clamp_min(1)
    return loss, shift_logits.argmax(-1)


@torch.no_grad()
def logits_without_visual_from(model: nn.Module, hidden: torch.Tensor, layer: int, keep: torch.Tensor,
                               valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits of the run that removes the visual tokens from decoder layer ``layer`` on (``VisualExit(layer)``),
    computed from that layer's input states ``hidden`` (B, L, D) of the full run: layers before ``layer``
    are the same in both runs, so only the text rows (``keep`` (B, L)) go through layers ``layer..L-1``,
    at their original positions. Returns the logits (B, L', V), each slot's row in the input (B, L') and
    which slots hold a real row (B, L'; the others are left padding).
    """
    out = run_layers(model, hidden, valid, start=layer, keep=keep, final_norm=True)  # rows at their original positions
    return model.lm_head(out.hidden), out.index, out.valid


class LabelBuffer:
    """FIFO store of labelled router inputs (CPU): features (N, R, 2C) and labels (N, R), -1 = unlabelled."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.size = self.next = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.x is None:
            self.x = torch.zeros(self.capacity, *x.shape[1:], dtype=torch.float32)
            self.y = torch.full((self.capacity, *y.shape[1:]), -1, dtype=torch.long)
        slots = (self.next + torch.arange(len(x))) % self.capacity
        self.x[slots], self.y[slots] = x.detach().float().cpu(), y.cpu()
        self.next = int(slots[-1] + 1) % self.capacity
        self.size = min(self.size + len(x), self.capacity)

    def sample(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` stored samples drawn uniformly with replacement; call only once something was added."""
        idx = torch.randint(0, self.size, (n,))
        return self.x[idx].to(device), self.y[idx].to(device)


class DyVTEModule(LearnedPrunerModule):
    """Trains the routers of a :class:`~learned_prune.pruners.dyvte.DyVTEHead` for ``model`` (the head's
    hyper-parameters: ``module.head`` in ``configs/module/dyvte.yaml``) on labels the frozen model makes."""

    def __init__(
        self,
        model: nn.Module,
        processor: Any = None,
        head: LearnedHead | HeadFactory = DyVTEHead,
        layers_per_step: int | None = None,
        margin: float = 0.2,
        rel_margin: float = 0.03,
        replay: int = 0,
        replay_capacity: int = 8192,
        **kwargs: Any,
    ) -> None:
        if replay < 0 or (replay and replay_capacity < 1):
            raise ValueError(f"module.replay={replay}, module.replay_capacity={replay_capacity}: replay is a number of "
                             f"earlier labelled samples per step (0 disables it) and needs replay_capacity >= 1")
        kwargs.setdefault("distill_weight", 0.0)
        kwargs.setdefault("budget_weight", 0.0)
        super().__init__(model, head, processor=processor, **kwargs)
        self.val_saved, self.test_saved = MeanMetric(), MeanMetric()
        self.buffer = LabelBuffer(replay_capacity) if replay else None

    def label_layers(self) -> list[int]:
        layers = list(range(self.head.min_layer, self.head.num_layers))
        k = self.hparams.layers_per_step
        return layers if not k or k >= len(layers) else sorted(random.sample(layers, k))

    @torch.no_grad()
    def make_labels(self, batch: dict, layers: list[int]) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Router features and exit labels per layer, from the frozen model run with and without visual tokens.

        One full forward (A) gives every layer's input states; each exit run B_l re-uses A's states at
        layer l and runs only the text rows through the remaining layers
        (:func:`logits_without_visual_from`, equal to running A under ``VisualExit(l)``).
        """
        inputs, labels = self._inputs(batch), batch["labels"]
        full = self.model(**inputs, output_hidden_states=True, use_cache=False)
        loss_a, pred_a = answer_loss_and_predictions(full.logits, labels)
        ids, valid = inputs["input_ids"], inputs["attention_mask"].bool()
        idx = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        is_image = ids == self.model.config.image_token_id
        prompt = valid & (labels == -100)
        last_image = torch.where(is_image, idx, -1).amax(1, keepdim=True)
        instruction = prompt & ~is_image & (idx > last_image)
        feats, targets = {}, {}
        for layer in layers:
            feats[layer] = router_features(full.hidden_states[layer].detach(), instruction, prompt)
            logits_b, rows, rows_valid = logits_without_visual_from(self.model, full.hidden_states[layer], layer,
                                                                    ~is_image, valid)
            lab = torch.gather(labels, 1, rows).masked_fill(~rows_valid, -100)
            loss_b, pred_b = answer_loss_and_predictions(logits_b, lab)
            pred_a_rows = torch.gather(pred_a, 1, rows[:, :-1])
            answer = lab[:, 1:] != -100
            agree = ((pred_a_rows == pred_b) | ~answer).all(1)
            close = loss_b <= (1 + self.hparams.rel_margin) * loss_a + self.hparams.margin
            targets[layer] = (agree & close).long()
        return feats, targets

    def router_loss(self, batch: dict, layers: list[int], stage: str, replay: int = 0) -> torch.Tensor:
        """Cross-entropy of the routers against the labels the frozen model makes for ``batch`` (plus
        ``replay`` samples drawn from the label buffer, which this batch then joins); logs the routers'
        accuracy and each layer's exit-label rate on ``batch`` under ``stage``."""
        feats, targets = self.make_labels(batch, layers)
        sites = list(range(self.head.min_layer, self.head.num_layers))
        bs = batch["labels"].shape[0]
        x = next(iter(feats.values())).new_zeros(bs, len(sites), 2 * self.head.hidden_size, dtype=torch.float32)
        y = torch.full((bs, len(sites)), -1, dtype=torch.long, device=x.device)  # -1: not labelled this step
        for layer in layers:
            x[:, layer - self.head.min_layer], y[:, layer - self.head.min_layer] = feats[layer], targets[layer]
        correct = []
        for layer in layers:
            pred = self.head.exit_logits(layer, feats[layer]).detach().argmax(-1)
            correct.append((pred == targets[layer]).float().mean())
            self.log(f"{stage}/label_exit/llm:{layer}", targets[layer].float().mean(), batch_size=bs)
        if replay and self.buffer is not None:
            if self.buffer.size:
                old_x, old_y = self.buffer.sample(replay, x.device)
                self.buffer.add(x, y)
                x, y = torch.cat([x, old_x]), torch.cat([y, old_y])
            else:
                self.buffer.add(x, y)
        losses = []
        for j, layer in enumerate(sites):
            if (y[:, j] >= 0).any():
                losses.append(F.cross_entropy(self.head.exit_logits(layer, x[:, j]), y[:, j], ignore_index=-1))
        loss = torch.stack(losses).mean()
        self.log(f"{stage}/router_loss", loss, prog_bar=stage == "train", batch_size=bs)
        self.log(f"{stage}/router_acc", torch.stack(correct).mean(), prog_bar=True, batch_size=bs)
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.router_loss(batch, self.label_layers(), "train", replay=self.hparams.replay)
        self.log("train/loss", loss, batch_size=batch["labels"].shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Answers with the head pruning (accuracy, exits, FLOPs saved) and the routers' accuracy against
        validation labels at every layer: the checkpoint metric of ``module=dyvte`` (``val/router_acc``),
        which does not depend on the inference threshold."""
        super().validation_step(batch, batch_idx)
        with torch.no_grad():
            self.router_loss(batch, list(range(self.head.min_layer, self.head.num_layers)), "val")

    def _eval_step(self, batch: dict, acc: AnswerAccuracy, kept: MeanMetric, stage: str) -> None:
        super()._eval_step(batch, acc, kept, stage)
        saved = self.val_saved if stage == "val" else self.test_saved
        saved.update(self.flops_saved(batch))
        self.log(f"{stage}/llm_flops_saved", saved, prog_bar=True, batch_size=len(batch["answers"]))

    def flops_saved(self, batch: dict) -> torch.Tensor:
        """Per-sample fraction of LLM prefill FLOPs saved by the exits of the last forward, (B,)."""
        tc = self.model.config.text_config
        ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"].bool()
        n_vis = ((ids == self.model.config.image_token_id) & mask).sum(1).tolist()
        n_all = mask.sum(1).tolist()
        exits = self.head.exit_layer.tolist()
        out = []
        for nv, n, e in zip(n_vis, n_all, exits):
            full = tc.num_hidden_layers * llm_layer_flops(n, tc.hidden_size, tc.intermediate_size)
            pruned = (e * llm_layer_flops(n, tc.hidden_size, tc.intermediate_size)
                      + (tc.num_hidden_layers - e) * llm_layer_flops(n - nv, tc.hidden_size, tc.intermediate_size))
            out.append(1 - pruned / full)
        return torch.tensor(out)
