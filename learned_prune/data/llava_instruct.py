"""``data=llava_instruct``: train pruning heads on LLaVA-format instruction data (e.g. LLaVA-665K).

``python train.py module=atp data=llava_instruct data.annotations=llava_v1_5_mix665k.json
data.image_folder=/data/llava`` reads the records (:mod:`.llava_records`: JSON, JSONL or a saved HF
dataset folder; every record checked up front, bad ones fail or, with ``skip_bad``, are counted),
renders each conversation with the backbone's chat template and labels only the assistant turns
(:mod:`.chat`). Images are opened in the loader workers, when a record is drawn.

* ``val_size`` records with an image (a count, or a fraction of the file) are held out by a seeded
  draw for validation and test; validation scores the first word of the greedy answer to the last
  turn against the record's last answer (the learned modules' default ``AnswerAccuracy``), a
  proxy that is meaningful for the short-answer parts of LLaVA-665K (VQAv2, GQA, OCR-VQA...).
* ``group_by_length``: batches of similar length, as LLaVA's ``group_by_modality_length``
  (megabatches of 50 batches sorted by estimated length within a seeded shuffle; not split by
  modality); the order is resumable mid-epoch like the testbed's.
* ``text_only=false`` drops text-only records (LVPruning trains without them), ``single_turn_only``
  keeps records with one question and one answer, ``fraction`` a seeded share of the file (DyVTE
  trains on 1% of the single-turn image records).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .chat import InstructCollator
from .llava_records import Record, check_records, load_rows
from .sampling import ResumableShuffle

log = logging.getLogger(__name__)


class InstructDataset(Dataset):
    """Checked records; items ``{"messages", "images" (PIL, opened here), "index"}``. An image that cannot
    be read fails naming the record (or, with ``skip_bad``, the item is None and the collator drops it)."""

    def __init__(self, records: list[Record], image_folder: Path | None, skip_bad: bool = False) -> None:
        self.records, self.image_folder, self.skip_bad = records, image_folder, skip_bad

    def __len__(self) -> int:
        return len(self.records)

    def _open(self, r: Record, image: Any) -> Image.Image:
        if isinstance(image, Image.Image):
            return image.convert("RGB")
        path = self.image_folder / image if self.image_folder is not None else Path(image)
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except (OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"record {r.index} (id {r.id!r}): image {str(path)!r} cannot be read ({e}); replace it, "
                             "fix the record's 'image' key, or set data.skip_bad=true") from None

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        r = self.records[i]
        try:
            images = [self._open(r, im) for im in r.images]
        except ValueError as e:
            if not self.skip_bad:
                raise
            log.warning("skipped: %s", e)
            return None
        return {"messages": r.messages, "images": images, "index": r.index}


class LengthGroupedShuffle(ResumableShuffle):
    """:class:`ResumableShuffle`'s seeded order, regrouped so that each megabatch of ``50 x batch_size``
    indices is sorted by ``lengths`` (longest first): batches hold records of similar length."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, mega: int = 50) -> None:
        super().__init__(len(lengths), seed)
        self.lengths, self.size = lengths, batch_size * mega

    def order(self, epoch: int) -> list[int]:
        base = super().order(epoch)
        chunks = [base[i: i + self.size] for i in range(0, len(base), self.size)]
        return [j for c in chunks for j in sorted(c, key=lambda k: -self.lengths[k])]


class LlavaInstructDataModule(pl.LightningDataModule):
    """LLaVA-format conversations as train / validation (/ test: the same held-out slice) loaders."""

    def __init__(self, processor: Any = None, annotations: str = "", image_folder: str | None = None,
                 batch_size: int = 16, eval_batch_size: int | None = None, num_workers: int = 0,
                 val_size: float = 256, seed: int = 0, skip_bad: bool = False, group_by_length: bool = False,
                 template: str = "auto", text_only: bool = True, single_turn_only: bool = False,
                 fraction: float = 1.0, split: str = "train", **_: Any) -> None:
        super().__init__()
        if processor is None:
            raise ValueError("LlavaInstructDataModule needs the backbone's processor (its chat template and images)")
        if not annotations:
            raise ValueError("data.annotations is not set: point it at a LLaVA-format JSON/JSONL file "
                             "(llava_v1_5_mix665k.json) or a saved HF dataset folder")
        if not 0 < fraction <= 1:
            raise ValueError(f"data.fraction={fraction}: a share of the records in (0, 1]")
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.seed, self.group_by_length = num_workers, seed, group_by_length
        folder = Path(image_folder) if image_folder else None
        if folder is not None and not folder.is_dir():
            raise FileNotFoundError(f"data.image_folder={image_folder!r} is not a folder: set it to the folder the "
                                    "records' 'image' paths are relative to")
        rows = load_rows(Path(annotations), split)
        checked = check_records(rows, folder, skip_bad)
        log.info("llava_instruct %s: %s", annotations, checked.summary(len(rows)))
        records = [r for r in checked.records if (text_only or r.images)
                   and (not single_turn_only or sum(role == "assistant" for role, _ in r.messages) == 1)]
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(records), generator=g).tolist()
        if fraction < 1:
            order = sorted(order[: max(1, round(fraction * len(order)))])
        records = [records[i] for i in order]
        with_image = [i for i, r in enumerate(records) if r.images]
        n_val = int(val_size * len(records)) if isinstance(val_size, float) and val_size < 1 else int(val_size)
        if n_val < 1 or n_val >= len(with_image):
            raise ValueError(f"data.val_size={val_size}: hold out at least 1 and fewer than the {len(with_image)} "
                             "records with an image (validation answers questions about images)")
        held = set(with_image[-n_val:])
        self.train_records = [r for i, r in enumerate(records) if i not in held]
        self.val_records = [records[i] for i in sorted(held)]
        self.skipped = checked.skipped
        self.train_set = InstructDataset(self.train_records, folder, skip_bad)
        self.val_set = self.test_set = InstructDataset(self.val_records, folder, skip_bad)
        self.collate = InstructCollator(processor, template)
        self.image_cost = int(getattr(processor, "num_image_tokens", None) or 576)

    def _loader(self, dataset: Dataset, sampler: Any, batch_size: int) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, collate_fn=self.collate,
                          generator=torch.Generator().manual_seed(self.seed) if sampler is not None else None)

    def train_dataloader(self) -> DataLoader:
        """Seeded shuffled (or length-grouped) batches; a run resumed mid-epoch goes on where it stopped."""
        if self.group_by_length:
            sampler = LengthGroupedShuffle([r.length(self.image_cost) for r in self.train_records], self.batch_size,
                                           self.seed)
        else:
            sampler = ResumableShuffle(len(self.train_set), self.seed)
        trainer = self.trainer
        if trainer is not None and trainer.world_size == 1:
            sampler.set_epoch(trainer.current_epoch)
            epoch = trainer.fit_loop.epoch_progress.current
            if epoch.started > epoch.completed:
                done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
                sampler.skip = min(done * self.batch_size, len(self.train_set))
        return self._loader(self.train_set, sampler, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, None, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
