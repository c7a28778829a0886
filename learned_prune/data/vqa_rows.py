"""Benchmark annotation files of ``data=vqa`` read into questions: JSON or JSONL, one row or many, each row
checked for the fields its benchmark needs (a missing one fails naming the file and the row)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SHORT_ANSWER = "Answer the question using a single word or phrase."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."

NEEDS = {"gqa": "question (or text), answer and image (or imageId)", "pope": "text (or question), label and image",
         "scienceqa": "question, choices and answer", "textvqa": "question, answers and image_id (or image)"}


class RowError(ValueError):
    """A benchmark row lacks what its benchmark needs (raised with the file and the row named)."""


def read_annotations(path: Path) -> tuple[Any, bool]:
    """The file's JSON value, or its JSON lines (POPE's official ``.json`` files are JSONL); and whether it was
    read line by line. A line that is not JSON fails naming the file and the line."""
    text = path.read_text()
    if path.suffix != ".jsonl":
        try:
            return json.loads(text), False
        except json.JSONDecodeError:
            pass
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {n}: not valid JSON ({e.msg}, column {e.colno}); the file is "
                                 "neither one JSON document nor one JSON object per line") from None
    return rows, True


def _get(row: dict[str, Any], *names: str) -> Any:
    for name in names:
        if row.get(name) is not None:
            return row[name]
    raise RowError(" or ".join(repr(n) for n in names))


def _rows(benchmark: str, data: Any, lines: bool) -> list[tuple[str, Any]]:
    """``(where, row)`` pairs of a benchmark file; a single row (a one-line JSONL read as one JSON object)
    is one row, not a mapping of rows."""
    keyed = isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values())
    if benchmark == "textvqa" and isinstance(data, dict) and "data" in data:
        data = data["data"]
    elif keyed and benchmark in ("gqa", "scienceqa"):
        return [(f"question {k!r}", {"question_id": k, **v}) for k, v in data.items()]
    if isinstance(data, dict):
        data = [data] if data else []
    if not isinstance(data, list):
        raise ValueError(f"a {benchmark} file holds a list of questions or one per line, not {type(data).__name__}")
    if benchmark == "scienceqa":  # a list's position is the question id (its image folder)
        data = [{"question_id": str(i), **r} if isinstance(r, dict) else r for i, r in enumerate(data)]
    return [(f"line {i}" if lines else f"entry {i}", r) for i, r in enumerate(data, 1 if lines else 0)]


def _row(benchmark: str, r: dict[str, Any], split: str, default_qtype: str) -> dict[str, Any] | None:
    """One benchmark row as ``{question, answer, gold, image, qtype}`` (None: not in this split)."""
    if benchmark == "gqa":
        return {"question": f"{_get(r, 'question', 'text')}\n{SHORT_ANSWER}", "answer": _get(r, "answer"),
                "image": str(_get(r, "image", "imageId")), "qtype": "gqa"}
    if benchmark == "pope":
        label = str(_get(r, "label")).strip().lower()
        if label not in ("yes", "no"):
            raise RowError(f"a yes/no label (got label={r['label']!r}; POPE scores yes/no answers)")
        return {"question": _get(r, "text", "question"), "answer": label, "image": _get(r, "image"),
                "qtype": r.get("category", default_qtype)}
    if benchmark == "scienceqa":
        if not r.get("image") or r.get("split", split) != split:
            return None
        choices = list(_get(r, "choices"))
        letter = chr(ord("A") + int(_get(r, "answer")))
        letters = "\n".join(f"{chr(ord('A') + i)}. {c}" for i, c in enumerate(choices))
        return {"question": f"{_get(r, 'question')}\n{letters}\n{LETTER_ANSWER}", "answer": letter,
                "gold": f"{letter}|{len(choices)}", "image": f"{split}/{r.get('question_id', '0')}/{r['image']}",
                "qtype": r.get("subject", "scienceqa")}
    answers = list(_get(r, "answers"))
    return {"question": f"{_get(r, 'question')}\n{SHORT_ANSWER}", "answer": max(set(answers), key=answers.count),
            "gold": answers, "image": str(_get(r, "image", "image_id")), "qtype": "textvqa"}


def benchmark_records(benchmark: str, data: Any, split: str, source: Path, lines: bool = False) -> list[dict[str, Any]]:
    """Normalise one benchmark's annotation structure to ``{question, answer, gold, image, qtype}``; a row
    that lacks a field fails naming the file, the row and the fields the benchmark needs."""
    default = next((c for c in ("adversarial", "popular", "random") if c in source.name), "pope")
    out = []
    for where, r in _rows(benchmark, data, lines):
        try:
            if not isinstance(r, dict):
                raise RowError(f"a JSON object (got {type(r).__name__})")
            row = _row(benchmark, r, split, default)
        except RowError as e:
            raise ValueError(f"{source}, {where}: needs {e}; a {benchmark} row has {NEEDS[benchmark]}") from None
        if row is not None:
            row.setdefault("gold", row["answer"])
            out.append(row)
    return out
