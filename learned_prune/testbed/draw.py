"""Vectorised numpy drawing of ShapesVQA scenes: textured backgrounds and filled shapes."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

SHAPES = ["circle", "square", "triangle", "cross"]
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 50, 200),
    "cyan": (40, 210, 220),
}
SIZES = {"small": 0.12, "large": 0.19}  # radius as a fraction of the image side: objects span 6-16 patches
SPARSE_SIZES = {"small": 0.09, "large": 0.15}  # the earlier, sparser scenes (scenes="sparse")


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A desaturated textured background: smooth low-frequency noise, a gradient and faint stripes."""
    base = rng.uniform(95, 165)
    tint = rng.uniform(-12, 12, size=3)
    coarse = rng.normal(0, 14, size=(6, 6, 3))
    # bilinear upsampling of the coarse noise, done with separable interpolation
    grid = np.linspace(0, 5, size)
    i0 = np.floor(grid).astype(int).clip(0, 4)
    f = (grid - i0)[:, None]
    rows = coarse[i0] * (1 - f[..., None]) + coarse[i0 + 1] * f[..., None]  # (size, 6, 3)
    smooth = rows[:, i0] * (1 - f.T[..., None]) + rows[:, i0 + 1] * f.T[..., None]  # (size, size, 3)
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle = rng.uniform(0, np.pi)
    gradient = rng.uniform(-18, 18) * (np.cos(angle) * xx + np.sin(angle) * yy)
    period = rng.uniform(5, 11)
    stripes = rng.uniform(3, 8) * np.sin(2 * np.pi * (xx * np.cos(angle + 1) + yy * np.sin(angle + 1)) * size / period)
    fine = rng.normal(0, 5, size=(size, size, 3))
    img = base + tint + smooth + (gradient + stripes)[..., None] + fine
    grey = img.mean(-1, keepdims=True)
    img = grey + 0.35 * (img - grey)  # keep it desaturated so objects stand out by colour
    return img


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Boolean (size, size) mask of one filled shape centred at (cx, cy) with radius r."""
    yy, xx = _grid(size)
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.15 * r
    if shape == "triangle":  # pointing up, base at cy + 0.8r
        top, bottom = cy - r, cy + 0.8 * r
        half = (yy - top) / (bottom - top) * r
        return (yy >= top) & (yy <= bottom) & (np.abs(dx) <= half)
    if shape == "cross":
        t = r / 2.8
        return ((np.abs(dx) <= t) & (np.abs(dy) <= r)) | ((np.abs(dy) <= t) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape!r}")


def clutter(rng: np.random.Generator, img: np.ndarray, n: int) -> None:
    """Draw ``n`` distractors in place: small desaturated blobs that are not objects (no colour name,
    never asked about), so that not every high-contrast patch is an object."""
    size = img.shape[0]
    yy, xx = _grid(size)
    for _ in range(n):
        cx, cy = rng.uniform(0, size, size=2)
        rx, ry = rng.uniform(0.03, 0.07, size=2) * size
        blob = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
        grey = rng.uniform(60, 200)
        img[blob] = 0.7 * img[blob] + 0.3 * (grey + rng.uniform(-10, 10, size=3))


def texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A multiplicative (size, size) texture for one object: stripes, checks or mottling around 1.

    Real objects are not flat colour: the texture changes many pixels inside an object without
    changing its colour name, so neighbouring patches of one object look alike but not identical.
    """
    yy, xx = _grid(size)
    kind = rng.integers(3)
    period = rng.uniform(4, 9)
    if kind == 0:  # stripes at a random angle
        a = rng.uniform(0, np.pi)
        pattern = np.sin(2 * np.pi * (np.cos(a) * xx + np.sin(a) * yy) / period)
    elif kind == 1:  # checks
        pattern = np.sign(np.sin(2 * np.pi * xx / period) * np.sin(2 * np.pi * yy / period))
    else:  # mottling
        coarse = rng.standard_normal((size // 8 + 2, size // 8 + 2))
        pattern = np.clip(coarse[(yy // 8).astype(int), (xx // 8).astype(int)], -1.5, 1.5) / 1.5
    return 1 + rng.uniform(0.06, 0.14) * pattern + 0.05 * rng.standard_normal((size, size))


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    yy.flags.writeable = xx.flags.writeable = False
    return yy, xx
