"""A second ShapesVQA question about a different object of the same scene (``eval.py data.turns=2``).

Pruning decided while answering the first question must not break a follow-up about another part of
the image: the follow-up is asked in the same conversation, on the KV cache the first turn left
(:mod:`learned_prune.evaluation.multiturn`). The follow-up is an attribute question (colour, shape or
size) built with the testbed's own :func:`~.scenes.ask`, about an object the first question does not
concern (its objects are read from the sample's ``target_patches`` / ``patch_objects``), drawn from
``numpy.random.default_rng([split_seed, index, 2])``: reproducible per sample, independent of the
scene's own draw. A scene where no such question exists (every object is the first question's, or no
object is named uniquely) has no follow-up and is left out of the two-turn set; how many were left out
is on the data set (``dropped``) and in the evaluation record's sample count.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
from torch.utils.data import DataLoader, Dataset

from .scenes import Obj, ShapesVQADataset, ask

FOLLOWUP_TYPES = ("color", "shape", "size")
FOLLOWUP_STREAM = 2  # the third seed entry: the scene uses [split_seed, index]
TRIES = 24


def followup(item: dict[str, Any], split_seed: int) -> tuple[str, str, str, list[int]] | None:
    """(question, answer, qtype, indices of the objects it is about) about an object the sample's first
    question is not about, or None."""
    objects = [Obj(**o) for o in item["objects"]]
    first = set(item["patch_objects"][item["target_patches"]].tolist())
    rng = np.random.default_rng([split_seed, int(item["index"]), FOLLOWUP_STREAM])
    for _ in range(TRIES):
        qtype = FOLLOWUP_TYPES[rng.integers(len(FOLLOWUP_TYPES))]
        qa = ask(rng, objects, qtype)
        if qa is not None and qa[2] and not first & set(qa[2]):
            return qa[0], qa[1], qtype, list(qa[2])
    return None


class FollowupDataset(Dataset):
    """The samples of ``base`` that have a follow-up, each with ``followup_question``, ``followup_answer``
    and ``followup_qtype``; ``dropped`` counts those without one."""

    def __init__(self, base: ShapesVQADataset) -> None:
        self.base = base
        self.items: list[tuple[int, tuple[str, str, str, list[int]]]] = []
        for i in range(len(base)):
            f = followup(base[i], base.split_seed)
            if f is not None:
                self.items.append((i, f))
        self.dropped = len(base) - len(self.items)
        if not self.items:
            raise ValueError(f"no sample of the {base.split!r} split has a follow-up question: data.turns=2 needs "
                             "scenes with at least two objects")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        index, (question, answer, qtype, _) = self.items[i]
        return {**self.base[index], "followup_question": question, "followup_answer": answer, "followup_qtype": qtype}


class FollowupCollator:
    """The data module's collator plus ``followup_prompts`` (the second user turn in the prompt template's
    format, without its ``<image>``), ``followup_answers`` and ``followup_qtypes``."""

    def __init__(self, collate: Callable[[list[dict]], dict]) -> None:
        template = getattr(collate, "template", None)
        if template is None:
            raise ValueError("data.turns=2 needs the data module's VQA collator (its prompt template)")
        self.collate = collate
        self.turn = template.replace("<image>\n", "").replace("<image>", "")

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate(samples)
        batch["followup_prompts"] = [self.turn.format(question=s["followup_question"]) for s in samples]
        batch["followup_answers"] = [s["followup_answer"] for s in samples]
        batch["followup_qtypes"] = [s["followup_qtype"] for s in samples]
        return batch


def followup_loader(datamodule: Any) -> DataLoader:
    """The two-turn evaluation loader of a ShapesVQA data module (its test split)."""
    if not isinstance(getattr(datamodule, "test_set", None), ShapesVQADataset):
        raise ValueError(f"data.turns=2 is ShapesVQA's two-turn mode (data=shapes); {type(datamodule).__name__} "
                         "has no second question per image: set data.turns=1")
    return DataLoader(FollowupDataset(datamodule.test_set), batch_size=datamodule.eval_batch_size, shuffle=False,
                      num_workers=datamodule.num_workers, collate_fn=FollowupCollator(datamodule.collate))
