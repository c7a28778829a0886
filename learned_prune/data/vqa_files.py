"""``data=vqa``: GQA, POPE, ScienceQA-IMG and TextVQA read from local files (never downloaded).

Layouts read (``root`` is a folder; ``annotations`` and ``image_folder`` are relative to it unless
absolute; the defaults are the files' official names):

* **gqa** — GQA's ``testdev_balanced_questions.json`` (a dict ``{question_id: {"imageId",
  "question", "answer", ...}}``) or a JSON/JSONL list of ``{"question_id", "image" | "imageId",
  "question" | "text", "answer"}``; images ``<image_folder>/<imageId>.jpg``.
* **pope** — POPE's JSONL (``{"question_id", "image", "text", "label"}`` per line; ``category``
  from a ``category`` field or else the file name: random / popular / adversarial).
* **scienceqa** — ScienceQA's ``problems.json`` (``{pid: {"question", "choices", "answer",
  "image", "split", "subject"}}``); only questions with an image in split ``split``; images
  ``<image_folder>/<split>/<pid>/<image>``.
* **textvqa** — ``TextVQA_0.5.1_val.json`` (``{"data": [{"question_id", "image_id", "question",
  "answers": [10 strings]}]}``); images ``<image_folder>/<image_id>.jpg``.
* any of them as a saved Hugging Face dataset (``datasets.load_from_disk``; columns ``question``,
  ``answer`` or ``answers``, ``image`` as a PIL image or file name, optional ``choices``).

Prompts follow LLaVA-1.5's evaluation prompts: short-answer benchmarks append "Answer the question
using a single word or phrase."; ScienceQA lists lettered options and asks for the letter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .vqa_metrics import BENCHMARKS, BenchmarkAccuracy
from .vqa_rows import LETTER_ANSWER, NEEDS, SHORT_ANSWER, RowError, benchmark_records, read_annotations
from .collate import VQACollator

DEFAULT_FILES = {
    "gqa": ("testdev_balanced_questions.json", "images"),
    "pope": ("coco_pope_random.json", "val2014"),
    "scienceqa": ("problems.json", "images"),
    "textvqa": ("TextVQA_0.5.1_val.json", "train_images"),
}


def _image_file(folder: Path, name: str) -> Path:
    path = folder / name
    if path.suffix:
        return path
    for ext in (".jpg", ".png", ".jpeg"):
        if (folder / (name + ext)).is_file():
            return folder / (name + ext)
    return folder / (name + ".jpg")



class VQABenchmarkDataset(Dataset):
    """One benchmark's questions from local files; items as ShapesVQA's (``image`` uint8 HxWx3,
    ``question``, ``answer``, ``qtype``, ``index``) plus ``gold`` (what the benchmark's metric scores
    against: the answer, TextVQA's human answers, or ScienceQA's ``"<letter>|<n_options>"``)."""

    def __init__(self, benchmark: str, root: str | Path, annotations: str | None = None,
                 image_folder: str | None = None, split: str = "test", size: int | None = None) -> None:
        if benchmark not in BENCHMARKS:
            raise ValueError(f"data.benchmark={benchmark!r} is not supported; choose from {BENCHMARKS}")
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"data.root={str(root)!r} is not a folder: set data.root (or VQA_ROOT) to the "
                                    f"folder holding the {benchmark} files")
        default_ann, default_img = DEFAULT_FILES[benchmark]
        ann = Path(annotations or default_ann)
        ann = ann if ann.is_absolute() else root / ann
        img = Path(image_folder or default_img)
        self.image_folder = img if img.is_absolute() else root / img
        self.benchmark = benchmark
        self.source = ann
        self.hf = None
        if size is not None and size < 1:
            raise ValueError(f"data.test_size={size}: evaluate at least 1 question (data.test_size=null: all of them)")
        if ann.is_dir():  # a saved HF dataset
            self.hf = load_saved_dataset(ann, split)
            self.records = None
            n = len(self.hf)
        elif ann.is_file():
            data, lines = read_annotations(ann)
            self.records = benchmark_records(benchmark, data, split, ann, lines)
            n = len(self.records)
        else:
            raise FileNotFoundError(f"{benchmark} annotations not found at {ann}: set data.annotations "
                                    f"(a JSON/JSONL file or a saved HF dataset folder, relative to data.root)")
        if n == 0:
            raise ValueError(f"{ann} holds no {benchmark} questions" + (f" with an image in split {split!r}"
                                                                       if benchmark == "scienceqa" else ""))
        self.size = min(n, size) if size else n

    def __len__(self) -> int:
        return self.size

    def _record(self, index: int) -> dict[str, Any]:
        if self.records is not None:
            return self.records[index]
        row = dict(self.hf[index])
        try:
            return self._hf_record(row)
        except (KeyError, RowError) as e:
            raise ValueError(f"{self.source}, row {index}: needs {e}; a {self.benchmark} row has "
                             f"{NEEDS[self.benchmark]}") from None

    def _hf_record(self, row: dict[str, Any]) -> dict[str, Any]:
        """One row of a saved HF dataset as ``{question, answer, gold, image, qtype}``."""
        answers = row.get("answers")
        answer = row.get("answer", answers[0] if answers else "")
        if "choices" in row and row["choices"]:
            letters = "\n".join(f"{chr(ord('A') + i)}. {c}" for i, c in enumerate(row["choices"]))
            letter = chr(ord("A") + int(answer)) if str(answer).isdigit() else str(answer)
            return {"question": f"{row['question']}\n{letters}\n{LETTER_ANSWER}", "answer": letter,
                    "gold": f"{letter}|{len(row['choices'])}", "image": row["image"], "qtype": self.benchmark}
        suffix = "" if self.benchmark == "pope" else f"\n{SHORT_ANSWER}"
        if self.benchmark == "pope" and str(answer).strip().lower() not in ("yes", "no"):
            raise RowError(f"a yes/no answer (got {answer!r}; POPE scores yes/no answers)")
        return {"question": f"{row['question']}{suffix}", "answer": str(answer).strip().lower()
                if self.benchmark == "pope" else str(answer), "gold": list(answers) if answers else str(answer),
                "image": row["image"], "qtype": row.get("category", self.benchmark)}

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.size:
            raise IndexError(index)
        r = self._record(index)
        image = r["image"]
        if not isinstance(image, Image.Image):
            path = _image_file(self.image_folder, str(image))
            if not path.is_file():
                raise FileNotFoundError(f"image {path} not found: set data.image_folder (relative to data.root) "
                                        f"to the folder holding the {self.benchmark} images")
            try:
                with Image.open(path) as img:
                    image = img.convert("RGB")
            except (OSError, SyntaxError, ValueError) as e:  # truncated, damaged or not an image
                raise ValueError(f"image {path} cannot be read ({e}): replace the file, or leave its question "
                                 f"out of {self.source.name}") from None
        return {"image": np.asarray(image.convert("RGB")), "question": r["question"], "answer": r["answer"],
                "gold": r["gold"], "qtype": r["qtype"], "index": index}


def load_saved_dataset(path: Path, split: str, name: str | None = None,
                       instead: str = "the benchmark's JSON file") -> Any:
    """A saved Hugging Face dataset folder (``datasets.load_from_disk``), the ``split`` of a DatasetDict.
    ``name`` is how errors name the folder (default: its path); ``instead`` what else data.annotations may be."""
    name = name or str(path)
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"{name} is a folder: reading a saved Hugging Face dataset needs `pip install datasets`; "
                          f"or point data.annotations at {instead}") from err
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise KeyError(f"{path} has splits {list(ds)}; set data.split to one of them")
        ds = ds[split]
    return ds


class BenchmarkCollator(VQACollator):
    """:class:`VQACollator` plus ``golds``: what :class:`BenchmarkAccuracy` scores against."""

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().__call__(samples)
        batch["golds"] = [s["gold"] for s in samples]
        return batch


class VQABenchmarkDataModule(pl.LightningDataModule):
    """An evaluation-only data module over one local benchmark (``python eval.py data=vqa``)."""

    EVALUATION_ONLY = ("data=vqa reads benchmarks for evaluation only (python eval.py data=vqa ...); train.py needs "
                       "training data: data=shapes (the testbed) or data=coco_masks (module=bavit)")

    def __init__(self, processor: Any = None, benchmark: str = "pope", root: str = "data/vqa",
                 annotations: str | None = None, image_folder: str | None = None, split: str = "test",
                 eval_batch_size: int = 16, batch_size: int | None = None, num_workers: int = 0,
                 test_size: int | None = None, max_new_tokens: int = 16,
                 prompt_template: str = "USER: <image>\n{question} ASSISTANT:", **_: Any) -> None:
        super().__init__()
        self.benchmark = benchmark
        self.eval_split = split
        self.name = f"{benchmark}:{split}"
        self.max_new_tokens = max_new_tokens
        self.processor = processor
        self.eval_batch_size = eval_batch_size or batch_size or 16
        self.num_workers = num_workers
        self.test_set = VQABenchmarkDataset(benchmark, root, annotations, image_folder, split, test_size)
        self.collate = BenchmarkCollator(processor, prompt_template) if processor is not None else list

    def metric(self) -> BenchmarkAccuracy:
        return BenchmarkAccuracy(self.benchmark)

    def train_dataloader(self) -> DataLoader:
        raise ValueError(self.EVALUATION_ONLY)

    def _loader(self, dataset: Dataset, shuffle: bool, batch_size: int) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=self.num_workers,
                          collate_fn=self.collate)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False, self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

