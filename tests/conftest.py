"""Shared fixtures: tiny LLaVA-1.5 / LLaVA-NeXT models built in code and small batches."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
import torch
from PIL import Image

from learned_prune.testbed import testbed_llava

torch.set_num_threads(2)

PROMPTS = [
    "USER: <image>\nwhat is the color of the shape ? ASSISTANT:",
    "USER: <image>\nhow many ? ASSISTANT:",
    "USER: <image>\nis there a shape in this image ? describe the image . ASSISTANT:",
]


def make_images(n: int, seed: int = 0, size: int = 96) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = (size, size) if i % 2 == 0 else (size + 24, size - 16)  # NeXT: differing aspect ratios
        out.append(Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)))
    return out


@pytest.fixture(scope="session", params=["llava", "llava_next"])
def family(request) -> str:
    return request.param


_MODELS: dict = {}


def get_tiny(family: str):
    if family not in _MODELS:
        _MODELS[family] = testbed_llava(family, text_layers=4, seed=0)
    return _MODELS[family]


@pytest.fixture
def tiny(family):
    return get_tiny(family)


def make_batch(processor, n: int = 3, seed: int = 0) -> dict:
    images = make_images(n, seed)
    return dict(processor(images=images, text=PROMPTS[:n], return_tensors="pt", padding=True))


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as generate() derives them from a left-padded attention mask."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)
