"""ShapesVQA's questions: object attributes, question types and :func:`ask`, which poses a question of a
given type about a scene's objects (with its one-word answer and the objects it is about)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .draw import COLORS, SHAPES, SIZES

COLOR_NAMES = list(COLORS)
SIZE_NAMES = list(SIZES)
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
QUESTION_TYPES = ["color", "shape", "size", "count", "exist", "position"]
DEFAULT_WEIGHTS = {"color": 0.2, "shape": 0.2, "size": 0.1, "count": 0.1, "exist": 0.2, "position": 0.2}
RELATIONS = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}
HARD_WEIGHTS = {"color": 0.3, "shape": 0.3, "size": 0.2, "exist": 0.2}  # questions about one object


def plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")


@dataclass
class Obj:
    shape: str
    color: str
    size: str
    cx: float
    cy: float
    r: float

    def name(self, with_size: bool = False) -> str:
        return f"{self.size} {self.color} {self.shape}" if with_size else f"{self.color} {self.shape}"


def _unique(objects: list[Obj], key) -> list[int]:
    values = [key(o) for o in objects]
    return [i for i, v in enumerate(values) if values.count(v) == 1]


def ask(rng: np.random.Generator, objects: list[Obj], qtype: str) -> tuple[str, str, list[int]] | None:
    """(question, answer, indices of the objects it is about) of type ``qtype``, or None if the scene
    cannot support it."""
    if qtype == "color":
        ids = _unique(objects, lambda o: o.shape)
        if ids:
            o = objects[ids[rng.integers(len(ids))]]
            return f"what color is the {o.shape} ?", o.color, [objects.index(o)]
        ids = _unique(objects, lambda o: (o.size, o.shape))
        if ids:
            o = objects[ids[rng.integers(len(ids))]]
            return f"what color is the {o.size} {o.shape} ?", o.color, [objects.index(o)]
        return None
    if qtype == "shape":
        ids = _unique(objects, lambda o: o.color)
        if not ids:
            return None
        o = objects[ids[rng.integers(len(ids))]]
        return f"what shape is the {o.color} object ?", o.shape, [objects.index(o)]
    if qtype == "size":
        ids = _unique(objects, lambda o: (o.color, o.shape))
        if not ids:
            return None
        o = objects[ids[rng.integers(len(ids))]]
        return f"what size is the {o.color} {o.shape} ?", o.size, [objects.index(o)]
    if qtype == "count":
        if rng.random() < 0.5:
            c = COLOR_NAMES[rng.integers(len(COLOR_NAMES))]
            hits = [i for i, o in enumerate(objects) if o.color == c]
            return f"how many {c} objects are there ?", NUMBERS[len(hits)], hits
        s = SHAPES[rng.integers(len(SHAPES))]
        hits = [i for i, o in enumerate(objects) if o.shape == s]
        return f"how many {plural(s)} are there ?", NUMBERS[len(hits)], hits
    if qtype == "exist":
        present = {(o.color, o.shape) for o in objects}
        if rng.random() < 0.5:
            c, s = sorted(present)[rng.integers(len(present))]
            return f"is there a {c} {s} ?", "yes", [i for i, o in enumerate(objects) if (o.color, o.shape) == (c, s)]
        absent = [(c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in present]
        c, s = absent[rng.integers(len(absent))]
        return f"is there a {c} {s} ?", "no", []
    if qtype == "position":
        ids = _unique(objects, lambda o: (o.color, o.shape))
        rel = list(RELATIONS)[rng.integers(len(RELATIONS))]
        axis, sign = RELATIONS[rel]
        gap = 0.1 * 96  # a tenth of the default image side
        pairs = [(i, j) for i in ids for j in ids if i != j
                 and abs([objects[i].cx, objects[i].cy][axis] - [objects[j].cx, objects[j].cy][axis]) >= gap]
        if not pairs:
            return None
        i, j = pairs[rng.integers(len(pairs))]
        a, b = objects[i], objects[j]
        truth = sign * ([a.cx, a.cy][axis] - [b.cx, b.cy][axis]) > 0
        want = rng.random() < 0.5
        if truth != want:
            a, b = b, a  # swapping the pair flips the answer
        return f"is the {a.name()} {rel} the {b.name()} ?", "yes" if want else "no", [objects.index(a), objects.index(b)]
    raise ValueError(f"unknown question type {qtype!r}; choose from {QUESTION_TYPES}")
