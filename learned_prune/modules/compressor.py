"""``module=flashsloth`` / ``module=quecc``: train a learned compressor (``pruners/compress.py``) on a frozen backbone.

A compressor's tokens exist only in hard mode, so training runs the engine in **hard** mode (the other
heads train in soft mode): the answer loss of the pruned forward (next-token CE on the answer tokens, the
engine maps the labels onto the shorter sequence) reaches the head through the values of its new tokens.
``distill_weight`` adds KL(unpruned frozen backbone || compressed) on the answer tokens, matched row by row
through ``engine.output_index`` (the answer tokens are text, so they are all kept and keep their order).
There is no budget term (the token count is fixed by the head). LoRA adapters, export, validation and
test are the base module's (:class:`~learned_prune.modules.learned.LearnedPrunerModule`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..pruners.compress import CompressorHead
from .learned import HeadFactory, LearnedPrunerModule


def answer_rows(labels: torch.Tensor, index: torch.Tensor | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(B, R) bool: output rows that predict an answer token; ``index``/``valid`` map a pruned output's rows to
    input positions (``engine.output_index`` / ``output_valid``), None for an unpruned output."""
    predicts = F.pad(labels, (0, 1), value=-100)[:, 1:] != -100  # position p predicts labels[p + 1]
    if index is None:
        return predicts
    rows = torch.gather(predicts, 1, index.to(labels.device))
    return rows if valid is None else rows & valid.to(labels.device)


class CompressorModule(LearnedPrunerModule):
    """Trains a :class:`~learned_prune.pruners.compress.CompressorHead` (``module.head`` in
    ``configs/module/<flashsloth|quecc>.yaml``) in hard mode; see the module docstring."""

    def __init__(self, model: nn.Module, head: CompressorHead | HeadFactory, processor: Any = None,
                 **kwargs: Any) -> None:
        kwargs.setdefault("budget_weight", 0.0)
        super().__init__(model, head, processor=processor, **kwargs)
        if not isinstance(self.head, CompressorHead):
            raise TypeError(f"module.head: CompressorModule trains compressors (FlashSloth, QueCC), got "
                            f"{type(self.head).__name__}; use the head's own module")

    def head_sizes(self, model: nn.Module) -> dict[str, int]:
        """The tower's and the LLM's widths and the side of the patch grid (and QueCC's tower depth)."""
        vc, tc = model.config.vision_config, model.config.text_config
        sizes = {"vision_hidden": vc.hidden_size, "hidden_size": tc.hidden_size, "grid": vc.image_size // vc.patch_size}
        return sizes

    def build_head(self, head: HeadFactory, model: nn.Module) -> CompressorHead:
        import inspect

        sizes = self.head_sizes(model)
        target = getattr(head, "func", head)
        if "vision_layers" in inspect.signature(target).parameters and "vision_layers" not in getattr(head, "keywords", {}):
            sizes["vision_layers"] = model.config.vision_config.num_hidden_layers
        try:
            return head(**sizes)
        except ValueError as e:
            raise ValueError(f"module.head: {e}") from e

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        labels = batch["labels"]
        with self.head(self.model, mode="hard") as engine:
            out = self.model(**self._inputs(batch), labels=labels, use_cache=False)
            index, valid = engine.output_index, engine.output_valid
        loss = out.loss
        bs = labels.shape[0]
        self.log("train/task_loss", out.loss, batch_size=bs)
        if self.hparams.distill_weight > 0:
            with torch.no_grad(), self._teacher():
                teacher = self.model(**self._inputs(batch), use_cache=False).logits
            s = F.log_softmax(out.logits[answer_rows(labels, index, valid)].float(), -1)
            t = F.log_softmax(teacher[answer_rows(labels)].float(), -1)
            if s.shape != t.shape:
                raise RuntimeError(f"compressed and unpruned forwards disagree on the answer rows ({s.shape[0]} vs "
                                   f"{t.shape[0]}): the engine must keep every text token")
            distill = F.kl_div(s, t, log_target=True, reduction="batchmean")
            loss = loss + self.hparams.distill_weight * distill
            self.log("train/distill_loss", distill, batch_size=bs)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        return loss
