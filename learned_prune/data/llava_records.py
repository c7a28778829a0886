"""LLaVA-format instruction records (``llava_v1_5_mix665k.json`` style) read and checked.

A record is ``{"id", "image" (a path under the image folder, a list of them, or absent for a
text-only record), "conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...]}``, with
one ``<image>`` placeholder per image in the human turns (LLaVA, arXiv 2304.08485 / 2310.03744;
``llava/train/train.py``). Records come from a JSON list, JSON lines, or a saved Hugging Face
dataset folder (``datasets.load_from_disk``; an ``image`` column may then hold PIL images).

Every record is checked when the data module is built, before training: an empty or missing
conversation, an unknown role, no assistant turn, a ``<image>`` count that differs from the
number of images (none where an image is given, two for one image, one in a text-only record,
one in an assistant turn), or an image file that does not exist fails with the record's index,
its ``id`` and the key to fix; with ``skip_bad=True`` such records are left out and counted
(:class:`Checked` lists why), never silently. Images are only opened later, in the loader workers.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .vqa_files import load_saved_dataset
from .vqa_rows import read_annotations

IMAGE = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class BadRecord(ValueError):
    """A record that cannot be trained on; ``kind`` names the fault (counted when records are skipped)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class Record:
    """One checked record: ``messages`` as ``(role, text)`` pairs (roles user/assistant/system) and
    ``images`` (file paths, or PIL images from an HF dataset), in placeholder order."""

    index: int
    messages: list[tuple[str, str]]
    images: list[Any]
    id: str | None = None

    def length(self, image_cost: int) -> int:
        """A cheap length estimate (words + ``image_cost`` per image) for length-grouped batching."""
        return sum(len(text.split()) for _, text in self.messages) + image_cost * len(self.images)


@dataclass
class Checked:
    """The records that passed, and how many were skipped for each fault (with the first message)."""

    records: list[Record]
    skipped: Counter = field(default_factory=Counter)
    first_error: str | None = None

    def summary(self, total: int) -> str:
        if not self.skipped:
            return f"{len(self.records)} records, none skipped"
        kinds = ", ".join(f"{k}: {n}" for k, n in sorted(self.skipped.items()))
        return (f"skipped {sum(self.skipped.values())} of {total} records (data.skip_bad=true; {kinds}); "
                f"first: {self.first_error}")


def load_rows(path: Path, split: str = "train") -> list[dict[str, Any]] | Any:
    """Rows of a JSON list / JSON lines file, or a saved HF dataset folder (needs ``datasets``)."""
    if path.is_dir():
        return load_saved_dataset(path, split, name=f"data.annotations={str(path)!r}",
                                  instead="a LLaVA JSON/JSONL file")
    if not path.is_file():
        raise FileNotFoundError(f"data.annotations={str(path)!r} does not exist: point it at a LLaVA-format JSON/JSONL "
                                "file (e.g. llava_v1_5_mix665k.json) or a saved HF dataset folder")
    data, _ = read_annotations(path)
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise ValueError(f"{path}: a LLaVA file holds a list of records (or one per line), not {type(data).__name__}")
    return data


def _image_list(value: Any) -> list[Any]:
    if value is None or value == "" or value == []:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def check_record(index: int, row: Any, image_folder: Path | None) -> Record:
    """The record at ``index`` as a :class:`Record`, or :class:`BadRecord` naming the index, id and key to fix."""
    rid = row.get("id") if isinstance(row, dict) else None
    where = f"record {index}" + (f" (id {rid!r})" if rid is not None else "")
    if not isinstance(row, dict):
        raise BadRecord("not an object", f"{where}: a record is a JSON object, got {type(row).__name__}")
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise BadRecord("empty conversation", f"{where}: 'conversations' is missing or empty; give it a list of "
                        "{'from': 'human'|'gpt', 'value': ...} turns, or remove the record")
    messages = []
    for t, turn in enumerate(turns):
        role = ROLES.get(str(turn.get("from", "")).lower()) if isinstance(turn, dict) else None
        if role is None or not isinstance(turn.get("value"), str):
            raise BadRecord("bad turn", f"{where}: conversations[{t}] needs 'from' (one of {sorted(ROLES)}) and a "
                            f"string 'value', got {turn!r:.120}")
        if role == "assistant" and not turn["value"].strip():
            raise BadRecord("empty answer", f"{where}: conversations[{t}].value (an assistant turn) is empty; give "
                            "the answer or remove the record")
        if role == "assistant" and IMAGE in turn["value"]:
            raise BadRecord("<image> in an answer", f"{where}: conversations[{t}].value (an assistant turn) holds "
                            f"{IMAGE}; placeholders belong in human turns")
        messages.append((role, turn["value"]))
    if not any(r == "assistant" for r, _ in messages):
        raise BadRecord("no answer", f"{where}: 'conversations' has no 'gpt' turn to train on; add one or remove "
                        "the record")
    images = _image_list(row.get("image"))
    placeholders = sum(text.count(IMAGE) for _, text in messages)
    if placeholders != len(images):
        if not images:
            kind, fix = "<image> without image", f"add the 'image' key or remove the {IMAGE} placeholder"
        elif placeholders == 0:
            kind, fix = "image without <image>", f"add {IMAGE} to the first human turn (conversations[0].value)"
        else:
            kind, fix = "<image> count", f"give one {IMAGE} per image in the human turns"
        raise BadRecord(kind, f"{where}: {placeholders} {IMAGE} placeholder(s) for {len(images)} image(s) in 'image': "
                        f"{fix}")
    for image in images:
        if isinstance(image, str):
            path = (image_folder / image) if image_folder is not None else Path(image)
            if not path.is_file():
                raise BadRecord("missing image", f"{where}: image {str(path)!r} not found: fix the record's 'image' "
                                f"key or data.image_folder (now {str(image_folder)!r})")
    return Record(index=index, messages=messages, images=images, id=None if rid is None else str(rid))


def check_records(rows: Any, image_folder: Path | None, skip_bad: bool) -> Checked:
    """Check every row (see :func:`check_record`); raise at the first bad one unless ``skip_bad``."""
    out = Checked(records=[])
    for i in range(len(rows)):
        try:
            out.records.append(check_record(i, rows[i], image_folder))
        except BadRecord as e:
            if not skip_bad:
                raise ValueError(f"{e} (or set data.skip_bad=true to leave bad records out, counted in the log)") \
                    from None
            out.skipped[e.kind] += 1
            out.first_error = out.first_error or str(e)
    return out
