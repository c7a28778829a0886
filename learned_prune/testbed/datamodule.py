"""``ShapesVQADataModule``: ShapesVQA splits as Lightning data loaders."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from ..data.collate import VQACollator
from ..data.sampling import ResumableShuffle
from ..evaluation.vqa import AnswerAccuracy
from .scenes import QUESTION_TYPES, ShapesVQADataset


def _as_list(samples: list) -> list:
    return samples


class ShapesVQADataModule(pl.LightningDataModule):
    """Train / val / test (``eval_split``: ``test``, ``hard``, the shifted ``shift`` or ``val``) loaders over ShapesVQA
    scenes (``scenes``: ``redundant`` or the earlier ``sparse``, see :class:`ShapesVQADataset`).

    With a ``processor`` batches are model inputs (:class:`VQACollator`); without one they are lists
    of raw sample dicts. Training order is seeded (``seed``), so runs are reproducible.
    """

    def __init__(
        self,
        processor: Any = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        train_size: int = 100_000,
        val_size: int = 512,
        test_size: int = 1000,
        seed: int = 0,
        image_size: int = 96,
        patch_size: int = 8,
        prompt_template: str = "USER: <image>\n{question} ASSISTANT:",
        eval_split: str = "test",
        question_weights: dict[str, float] | None = None,
        scenes: str = "sparse",
    ) -> None:
        super().__init__()
        if eval_split not in ("test", "hard", "shift", "val"):
            raise ValueError(f"eval_split must be 'test', 'hard', 'shift' or 'val', got {eval_split!r}")
        self.processor = processor
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        common = dict(seed=seed, image_size=image_size, patch_size=patch_size, scenes=scenes,
                      question_weights=dict(question_weights) if question_weights else None)
        self.train_set = ShapesVQADataset("train", train_size, **common)
        self.val_set = ShapesVQADataset("val", val_size, **common)
        self.test_set = ShapesVQADataset(eval_split, test_size, **common)
        self.collate = VQACollator(processor, prompt_template) if processor is not None else _as_list

    def _loader(self, dataset, shuffle: bool, batch_size: int) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=ResumableShuffle(len(dataset), self.seed) if shuffle else None,
            # the workers' base seed comes from this generator, not from the global RNG (as before the sampler)
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=self.collate,
        )

    def train_dataloader(self) -> DataLoader:
        """Seeded shuffled batches; in a run resumed mid-epoch, the epoch goes on from the first sample
        the interrupted run had not trained on (single process: under DDP Lightning shards the order
        itself and the resumed epoch starts over). A run that reached ``max_steps`` ended its epoch,
        so extending it starts the next one, as Lightning counts it."""
        loader = self._loader(self.train_set, True, self.batch_size)
        trainer = self.trainer  # None outside a Trainer
        if trainer is not None and trainer.world_size == 1:
            loader.sampler.set_epoch(trainer.current_epoch)
            epoch = trainer.fit_loop.epoch_progress.current
            if epoch.started > epoch.completed:  # restored mid-epoch (a crash, Ctrl-C, a periodic checkpoint)
                done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
                loader.sampler.skip = min(done * self.batch_size, len(self.train_set))
        return loader

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False, self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    def metric(self) -> AnswerAccuracy:
        """The metric of this data: exact-match answer accuracy, overall and per ShapesVQA question type."""
        return AnswerAccuracy(QUESTION_TYPES)


class ShapesStageDataModule(ShapesVQADataModule):
    """ShapesVQA for a recipe stage that is not VQA: batches from ``collator(processor)`` (when set), and
    no answer metric (the stage's module logs its own)."""

    collator: Any = None

    def __init__(self, processor: Any = None, **kwargs: Any) -> None:
        super().__init__(processor, **kwargs)
        if processor is None:
            raise ValueError(f"{type(self).__name__} needs the backbone's processor (its tokenizer and images)")
        if self.collator is not None:
            self.collate = self.collator(processor)

    def metric(self) -> None:
        """No answer metric: this stage has no answers to score."""
        return None

