"""ShapesVQA: a seeded, synthetic VQA testbed generated on the fly (no files).

Scenes hold several textured, coloured shapes of two sizes (each spanning several patches, so
neighbouring tokens are redundant as in real images), some overlapping, among grey distractor blobs
on textured backgrounds. The ``hard`` split holds many objects and asks about one of them, so that a
small token budget cannot cover every object and *which* tokens survive decides the answer. These are
``scenes="redundant"``; ``scenes="sparse"`` draws the earlier scenes (fewer, smaller, flat objects). Questions (attribute, count, existence,
relative position) have one-word answers and refer to different objects, so *which* visual tokens
matter depends on the question — the property visual-token pruning methods are judged on. Each
sample also carries a per-patch foreground mask, per-patch object labels and object boxes (for
BAViT, auxiliary losses and oracle baselines). A tiny LLaVA trained on it is the project's
embedded default backbone.

Sample ``i`` of a split is drawn from ``numpy.random.default_rng([split_seed, i])``: any index is
reproducible on its own, workers need no coordination, and splits never share a seed. Generating
one 96x96 sample takes about 1 ms on one core.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .draw import COLORS, SHAPES, SIZES, SPARSE_SIZES, background, clutter, shape_mask, texture
from .questions import (  # noqa: F401  (re-exported: the testbed's names live here for its users)
    COLOR_NAMES, DEFAULT_WEIGHTS, HARD_WEIGHTS, NUMBERS, QUESTION_TYPES, RELATIONS, SIZE_NAMES, Obj, ask, plural,
)

SPLIT_OFFSETS = {"train": 1, "val": 2, "test": 3, "shift": 4, "hard": 5}


@dataclass(frozen=True)
class SceneStyle:
    """How a split's scenes are drawn: object count range, object scale, distractor count range,
    object radii per size name, textured objects (else a faint per-pixel shade)."""

    min_objects: int
    max_objects: int
    scale: float
    min_clutter: int = 2
    max_clutter: int = 5
    sizes: tuple = tuple(SIZES.items())
    textured: bool = True


_SPARSE = dict(min_clutter=0, max_clutter=0, sizes=tuple(SPARSE_SIZES.items()), textured=False)
SCENES = {
    # objects spanning many patches, textured, among distractors; a crowded hard split
    "redundant": {"default": SceneStyle(2, 6, 1.0), "hard": SceneStyle(6, 9, 0.75), "shift": SceneStyle(4, 8, 0.6)},
    # the earlier scenes (backbones shipped before 2026-12-04 were trained on them): fewer, smaller,
    # flat objects, no distractors; its hard split is the same crowding of its own objects
    "sparse": {"default": SceneStyle(2, 5, 1.0, **_SPARSE), "hard": SceneStyle(6, 9, 0.8, **_SPARSE),
               "shift": SceneStyle(4, 8, 0.7, **_SPARSE)},
}
# redundant scenes: train draws hard-style scenes this often, so the backbone knows crowded scenes;
# val/test never do (sparse scenes never mix)
TRAIN_HARD_SHARE = {"redundant": 0.3, "sparse": 0.0}
# prompt template words, question words, attribute names, plurals, numbers, answers
VOCAB = sorted(
    {"user", "assistant", ":", "?", "what", "color", "shape", "size", "is", "the", "object", "how", "many",
     "objects", "are", "there", "a", "of", "yes", "no", "left", "right", "above", "below"}
    | set(SHAPES) | {plural(s) for s in SHAPES} | set(COLOR_NAMES) | set(SIZE_NAMES) | set(NUMBERS)
)


def draw_scene(rng: np.random.Generator, image_size: int, n_objects: int, scale: float, n_clutter: int = 0,
               sizes: dict[str, float] | None = None, textured: bool = True):
    """Place and draw ``n_objects`` objects over ``n_clutter`` distractors; returns (image uint8 HxWx3,
    objects, owner map). ``sizes``: radius per size name as a fraction of the side (default ``SIZES``)."""
    sizes = sizes or SIZES
    img = background(rng, image_size)
    clutter(rng, img, n_clutter)
    owner = np.full((image_size, image_size), -1, dtype=np.int16)
    objects: list[Obj] = []
    for _ in range(n_objects):
        for _attempt in range(60):
            size = SIZE_NAMES[rng.integers(len(SIZE_NAMES))]
            r = sizes[size] * image_size * scale
            cx, cy = rng.uniform(r + 1, image_size - r - 1, size=2)
            # partial overlaps allowed, but every object stays mostly visible
            if all((cx - o.cx) ** 2 + (cy - o.cy) ** 2 >= (0.85 * (r + o.r)) ** 2 for o in objects):
                break
        else:
            continue
        obj = Obj(SHAPES[rng.integers(len(SHAPES))], COLOR_NAMES[rng.integers(len(COLOR_NAMES))], size, cx, cy, r)
        mask = shape_mask(obj.shape, cx, cy, r, image_size)
        rgb = np.array(COLORS[obj.color], dtype=np.float64) + rng.normal(0, 8, size=3)
        shade = texture(rng, image_size) if textured else 1 + 0.08 * rng.standard_normal(mask.shape)
        img[mask] = rgb[None, :] * shade[mask][:, None]
        owner[mask] = len(objects)
        objects.append(obj)
    return np.clip(img, 0, 255).astype(np.uint8), objects, owner


class ShapesVQADataset(Dataset):
    """ShapesVQA split ``split`` in {train, val, test, hard, shift}.

    ``test``/``val``: 2-6 objects; ``hard``: 6-9 smaller objects and questions about one of them
    (colour, shape, size, existence); ``train``: test-style scenes with a share of hard-style ones;
    ``shift``: 4-8 still smaller objects, never trained on. ``min_objects``, ``max_objects`` and
    ``object_scale`` override the split's style. ``scenes``: ``"redundant"`` (the description above)
    or ``"sparse"``, the earlier scenes, exactly (2-5 small flat objects, no distractors; what the
    shipped backbone was trained on, hence still the default until a redundant-scenes backbone ships).

    Items are dicts: ``image`` (uint8 HxWx3), ``question``, ``answer``, ``qtype``, ``patch_mask``
    (bool, grid*grid), ``patch_labels`` (long, colour*5+shape of the object covering most of each
    patch, -100 on background), ``target_patches`` (bool, the patches of the objects the question
    is about; empty when it is about nothing in the scene), ``patch_objects`` (long, index into
    ``objects`` of the object covering most of each patch, -1 on background), ``patch_attrs`` (long
    grid*grid x 3: colour, shape, size index of that object, -100 on background), ``patch_centres``
    (its centre in [0, 1] image coordinates), ``target_attrs`` / ``target_centres`` (2 x 3 / 2 x 2:
    the objects the question names, in order; -100 / NaN where there is none; count questions name
    none), ``target_offset`` (position questions: the first named object's signed offset from the
    second along the asked relation, in image widths, positive when the answer is yes; NaN for other
    types), ``target_relation`` (index of the asked relation in ``RELATIONS``; -100 for other types),
    ``boxes`` (float n x 4, x0 y0 x1 y1),
    ``objects`` and ``index``.
    """

    def __init__(
        self,
        split: str = "train",
        size: int | None = None,
        seed: int = 0,
        image_size: int = 96,
        patch_size: int = 8,
        min_objects: int | None = None,
        max_objects: int | None = None,
        object_scale: float | None = None,
        question_weights: dict[str, float] | None = None,
        fg_threshold: float = 0.25,
        scenes: str = "sparse",
    ) -> None:
        if split not in SPLIT_OFFSETS:
            raise ValueError(f"split must be one of {list(SPLIT_OFFSETS)}, got {split!r}")
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} must be a multiple of patch_size={patch_size}")
        self.split = split
        self.size = size if size is not None else {"train": 100_000, "val": 512}.get(split, 1000)
        self.split_seed = seed * 1000 + SPLIT_OFFSETS[split]
        self.image_size, self.patch_size = image_size, patch_size
        if scenes not in SCENES:
            raise ValueError(f"scenes must be one of {list(SCENES)}, got {scenes!r}")
        self.scenes = scenes
        styles = SCENES[scenes]
        self.styles = [styles[split if split in styles else "default"]]
        self.hard_share = TRAIN_HARD_SHARE[scenes] if split == "train" else 0.0
        if self.hard_share:
            self.styles.append(styles["hard"])
        self.styles = [replace(st, min_objects=min_objects or st.min_objects, max_objects=max_objects or st.max_objects,
                               scale=object_scale or st.scale) for st in self.styles]
        weights = question_weights or (HARD_WEIGHTS if split == "hard" else DEFAULT_WEIGHTS)
        unknown = set(weights) - set(QUESTION_TYPES)
        if unknown:
            raise ValueError(f"unknown question types {sorted(unknown)}; choose from {QUESTION_TYPES}")
        self.qtypes = list(weights)
        p = np.array([weights[q] for q in self.qtypes], dtype=np.float64)
        self.qprobs = p / p.sum()
        self.fg_threshold = fg_threshold

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.size:
            raise IndexError(index)
        rng = np.random.default_rng([self.split_seed, index])
        style = self.styles[int(self.hard_share > 0 and rng.random() < self.hard_share)]
        while True:
            n = int(rng.integers(style.min_objects, style.max_objects + 1))
            # (no draw when a style has no distractors: sparse scenes reproduce their earlier images exactly)
            clutter = int(rng.integers(style.min_clutter, style.max_clutter + 1)) if style.max_clutter else 0
            image, objects, owner = draw_scene(rng, self.image_size, n, style.scale, clutter, dict(style.sizes),
                                               style.textured)
            qtype = self.qtypes[rng.choice(len(self.qtypes), p=self.qprobs)]
            qa = ask(rng, objects, qtype)
            if qa is not None and objects:
                break
        g, ps = self.image_size // self.patch_size, self.patch_size
        blocks = owner.reshape(g, ps, g, ps).transpose(0, 2, 1, 3).reshape(g * g, ps * ps)
        counts = np.stack([(blocks == i).sum(1) for i in range(len(objects))], 1)  # (patches, objects)
        fg = counts.sum(1) >= self.fg_threshold * ps * ps
        top = counts.argmax(1)
        labels = np.array([COLOR_NAMES.index(o.color) * len(SHAPES) + SHAPES.index(o.shape) for o in objects])
        patch_labels = np.where(fg, labels[top], -100)
        patch_objects = np.where(fg, top, -1)
        target = fg & np.isin(top, qa[2])  # patches of the objects the question is about
        # what the auxiliary losses of module=backbone teach: per patch, the covering object's colour,
        # shape, size and centre; per question, the attributes and centres of the objects it names
        attrs = np.array([[COLOR_NAMES.index(o.color), SHAPES.index(o.shape), SIZE_NAMES.index(o.size)]
                          for o in objects])
        centres = np.array([[o.cx / self.image_size, o.cy / self.image_size] for o in objects], dtype=np.float32)
        patch_attrs = np.where(fg[:, None], attrs[top], -100)
        patch_centres = np.where(fg[:, None], centres[top], 0.0).astype(np.float32)
        named = list(qa[2])[:2] if qtype != "count" else []
        target_attrs = np.full((2, 3), -100)
        target_centres = np.full((2, 2), np.nan, dtype=np.float32)
        for j, i in enumerate(named):
            target_attrs[j], target_centres[j] = attrs[i], centres[i]
        target_offset, target_relation = np.float32(np.nan), -100  # position questions only
        if qtype == "position":
            target_relation = next(k for k, r in enumerate(RELATIONS) if f" {r} " in qa[0])
            axis, sign = list(RELATIONS.values())[target_relation]
            target_offset = np.float32(sign * (target_centres[0, axis] - target_centres[1, axis]))
        boxes = np.array([[o.cx - o.r, o.cy - o.r, o.cx + o.r, o.cy + o.r] for o in objects], dtype=np.float32)
        return {
            "image": image,
            "question": qa[0],
            "answer": qa[1],
            "qtype": qtype,
            "patch_mask": torch.from_numpy(fg),
            "patch_labels": torch.from_numpy(patch_labels).long(),
            "patch_objects": torch.from_numpy(patch_objects).long(),
            "patch_attrs": torch.from_numpy(patch_attrs).long(),
            "patch_centres": torch.from_numpy(patch_centres),
            "target_attrs": torch.from_numpy(target_attrs).long(),
            "target_centres": torch.from_numpy(target_centres),
            "target_offset": torch.tensor(target_offset),
            "target_relation": torch.tensor(target_relation),
            "target_patches": torch.from_numpy(target),
            "boxes": torch.from_numpy(boxes.clip(0, self.image_size)),
            "pixel_mask": torch.from_numpy(owner >= 0),
            "objects": [o.__dict__ for o in objects],
            "index": index,
        }


N_PATCH_CLASSES = len(COLOR_NAMES) * len(SHAPES)
