"""Short-answer VQA accuracy (overall and per question type) and greedy answering."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import Metric


def normalize_answer(text: str) -> str:
    """Lowercase, strip punctuation at the ends, keep the first word (ShapesVQA answers are one word)."""
    words = text.strip().lower().replace("</s>", " ").split()
    return words[0].strip(".,!?;:") if words else ""


class AnswerAccuracy(Metric):
    """Exact-match accuracy after :func:`normalize_answer`, overall and per question type.

    ``types`` (the data module's question types; none: overall accuracy only) fix the per-type slots;
    ``compute_all()`` gives ``{"acc": ..., "acc_<type>": ...}``. Synchronises across processes (counts
    are summed per type slot).
    """

    full_state_update = False

    def __init__(self, types: Sequence[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.types = list(types or [])
        n = len(self.types) + 1  # last slot: types not in the list
        self.add_state("correct", default=torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")

    def _slot(self, qtype: str | None) -> int:
        return self.types.index(qtype) if qtype in self.types else len(self.types)

    def update(self, predictions: Sequence[str], targets: Sequence[str], qtypes: Sequence[str] | None = None) -> None:
        qtypes = qtypes or [None] * len(targets)
        for p, t, q in zip(predictions, targets, qtypes):
            s = self._slot(q)
            self.total[s] += 1
            self.correct[s] += int(normalize_answer(p) == normalize_answer(t))

    def update_from_logits(self, logits: torch.Tensor, labels: torch.Tensor, qtypes: Sequence[str] | None = None) -> None:
        """Teacher-forced accuracy: a sample is right when every answer token is the argmax."""
        if logits.shape[1] != labels.shape[1]:
            return
        pred = logits[:, :-1].argmax(-1)
        tgt = labels[:, 1:]
        mask = tgt != -100
        ok = ((pred == tgt) | ~mask).all(1) & mask.any(1)
        qtypes = qtypes or [None] * len(ok)
        self._update_count += 1
        for o, q in zip(ok.tolist(), qtypes):
            s = self._slot(q)
            self.total[s] += 1
            self.correct[s] += int(o)

    def compute(self) -> torch.Tensor:
        return self.correct.sum().float() / self.total.sum().clamp_min(1)

    def compute_all(self) -> dict[str, torch.Tensor]:
        """Overall and per-type accuracy from the counts summed over all processes (when distributed),
        so every process returns the same keys and values: a type seen by one rank only is still
        reported by all, which ``self.log(..., sync_dist=True)`` of the result needs (different key
        sets across ranks would hang its all-reduce)."""
        with self.sync_context():
            correct, total = self.correct.clone(), self.total.clone()
        out = {"acc": correct.sum().float() / total.sum().clamp_min(1)}
        for i, t in enumerate(self.types):
            if total[i] > 0:
                out[f"acc_{t}"] = correct[i].float() / total[i]
        return out


@torch.no_grad()
def greedy_answers(model: torch.nn.Module, processor: Any, batch: dict, max_new_tokens: int = 2) -> list[str]:
    """Greedy answers to the prompts of a collated batch (``prompt_input_ids``/``prompt_attention_mask``)."""
    from ..data.collate import prompt_inputs

    inputs = prompt_inputs(batch)  # ids, mask, pixels and the family's image inputs
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=processor.tokenizer.pad_token_id)
    new = out[:, inputs["input_ids"].shape[1]:]
    return processor.tokenizer.batch_decode(new, skip_special_tokens=True)
